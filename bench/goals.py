"""Where the issue's goals stand, computed from a report: met, not met, or not measured (and why)."""

from bench.results import pooled_speedup, pooled_view

GREEDY, SINGLE, SIXTEEN = 0.0, 1, 16


def evaluate_goals(report: dict) -> list[dict]:
    rows = report["rows"]
    return [
        _cluster_two_x(rows, report),
        _cluster_beats_vllm_spec(rows, report),
        _sixteen_streams(rows, report),
        _cluster_keeps_in_process(rows, report),
        _multi_target(report.get("multi_target") or {}),
    ]


def _goal(name: str, target: str, value: float | None, threshold: float, detail: str, missing: str) -> dict:
    if value is None:
        return {"goal": name, "target": target, "status": "not measured", "value": None, "detail": missing}
    return {"goal": name, "target": target, "status": "met" if value >= threshold else "not met",
            "value": round(value, 3), "detail": detail}


def _why_missing(report: dict, *jobs: str, concurrency: int = SINGLE) -> str:
    reasons = [f"{job}: {report['systems'][job].get('reason', report['systems'][job]['status'])}"
               for job in jobs if job in report["systems"] and report["systems"][job]["status"] != "ok"]
    absent = [job for job in jobs if job not in report["systems"]]
    measured = report.get("settings", {}).get("concurrency")
    return ("; ".join(reasons + [f"{job}: not among the measured systems" for job in absent])
            or f"no greedy rows at concurrency {concurrency} in this run (concurrency measured: {measured})")


def _cluster_two_x(rows, report) -> dict:
    value = pooled_speedup(rows, "specfleet-grpc", GREEDY, SINGLE)
    return _goal("single stream, greedy, full cluster path: speedup over the target alone", ">= 2.0x",
                 value, 2.0, "specfleet cluster (gRPC), all categories pooled, concurrency 1, temperature 0",
                 _why_missing(report, "specfleet-cluster"))


def _cluster_beats_vllm_spec(rows, report) -> dict:
    ours = pooled_view(rows, "specfleet-grpc", "speculative", GREEDY, SINGLE)
    theirs = pooled_view(rows, "vllm", "speculative", GREEDY, SINGLE)
    value = ours["tokens_per_s"] / theirs["tokens_per_s"] if ours and theirs else None
    return _goal("single stream, greedy: cluster path faster than vLLM draft_model (same pair)", "ratio >= 1.0",
                 value, 1.0, "tokens/s of specfleet cluster (gRPC, speculative) / vLLM draft_model, concurrency 1",
                 _why_missing(report, "specfleet-cluster", "vllm-draft_model"))


def _sixteen_streams(rows, report) -> dict:
    ours = pooled_view(rows, "specfleet-grpc", "speculative", GREEDY, SIXTEEN)
    theirs = pooled_view(rows, "vllm", "plain", GREEDY, SIXTEEN)
    value = ours["tokens_per_s"] / theirs["tokens_per_s"] if ours and theirs else None
    return _goal("16 concurrent streams: total tokens/s at least vLLM autoregressive", "ratio >= 1.0",
                 value, 1.0, "tokens/s of specfleet cluster (gRPC, speculative) / vLLM autoregressive, concurrency 16, greedy",
                 _why_missing(report, "specfleet-cluster", "vllm-autoregressive", concurrency=SIXTEEN))


def _cluster_keeps_in_process(rows, report) -> dict:
    cluster = pooled_speedup(rows, "specfleet-grpc", GREEDY, SINGLE)
    in_process = pooled_speedup(rows, "specfleet", GREEDY, SINGLE)
    value = cluster / in_process if cluster and in_process else None
    return _goal("cluster path keeps the in-process speedup (issue 4)", ">= 85%", value, 0.85,
                 "speedup of the cluster path / speedup in-process, concurrency 1, greedy",
                 _why_missing(report, "specfleet-cluster", "specfleet"))


def _multi_target(multi: dict) -> dict:
    ratios = {target: ratio["median"] for target, ratio in (multi.get("ratio") or {}).items()}
    value = min(ratios.values()) if ratios else None
    return _goal("three targets sharing one drafter keep their dedicated-drafter speedup", ">= 90% (worst target)",
                 value, 0.9, "per-target speedup with one shared drafter / with a dedicated drafter each "
                 "(median over interleaved repeats), worst target",
                 multi.get("reason") or "not measured")
