"""From the children's results to the report's rows: speedups, greedy agreement, pooled views.

A row is one (system, mode, category, temperature, concurrency) measurement.
Every speculative row's speedup is over the same system decoding the same
target alone (its plain row of the same cell) in the same run.
"""

from collections.abc import Iterable

from bench.metrics import speedup

LABELS = {
    ("specfleet", "plain"): "specfleet in-process, target alone",
    ("specfleet", "speculative"): "specfleet in-process, speculative",
    ("specfleet-grpc", "plain"): "specfleet cluster (gRPC), speculation off",
    ("specfleet-grpc", "speculative"): "specfleet cluster (gRPC), speculative",
    ("specfleet-http", "plain"): "specfleet cluster (HTTP), speculation off",
    ("specfleet-http", "speculative"): "specfleet cluster (HTTP), speculative",
    ("vllm", "plain"): "vLLM autoregressive",
    ("vllm", "speculative"): "vLLM draft_model",
    ("hf", "plain"): "HF generate",
    ("hf", "speculative"): "HF assisted generation",
}
SYSTEM_OF_JOB = {"vllm-autoregressive": "vllm", "vllm-draft_model": "vllm"}


def label(system: str, mode: str) -> str:
    return LABELS.get((system, mode), f"{system} {mode}")


def collect_rows(job_results: dict[str, dict]) -> list[dict]:
    """Rows of every job; the cluster job's modes "grpc/plain" etc. become systems specfleet-grpc / specfleet-http."""
    rows = []
    for name, result in job_results.items():
        for row in result.get("cells", []):
            system, mode = SYSTEM_OF_JOB.get(name, name), row["mode"]
            if "/" in mode:
                transport, mode = mode.split("/")
                system = f"specfleet-{transport}"
            rows.append({"system": system, **row, "mode": mode})
    return rows


def job_of(system: str, mode: str) -> str:
    """The report's key of the job that measured a system's mode."""
    if system == "vllm":
        return "vllm-draft_model" if mode == "speculative" else "vllm-autoregressive"
    return "specfleet-cluster" if system.startswith("specfleet-") else system


def _cell_key(row: dict) -> tuple:
    return row["category"], row["temperature"], row["concurrency"]


def add_speedups(rows: list[dict]) -> None:
    """Speedup of each speculative row over the plain row of the same system and cell."""
    plain = {(r["system"], *_cell_key(r)): r for r in rows if r["mode"] == "plain" and "error" not in r}
    for row in rows:
        if row["mode"] == "speculative" and "error" not in row:
            base = plain.get((row["system"], *_cell_key(row)))
            row["speedup"] = speedup(row["tokens_per_s"], base["tokens_per_s"]) if base else None


def add_greedy_agreement(rows: list[dict], prompts_per_category: dict[str, int]) -> str | None:
    """Compare every greedy row's completions with the reference's, request by request.

    The reference is specfleet's in-process plain decoding (the target alone);
    request i of a cell is prompt i mod P of its category. Sets
    greedy_identical / greedy_compared on each greedy row; returns the
    reference's label, or None when it did not run.
    """
    reference = _reference_completions(rows, prompts_per_category)
    if not reference:
        return None
    for row in rows:
        if row["temperature"] != 0 or "completions" not in row:
            continue
        count = prompts_per_category[row["category"]]
        pairs = [(c, reference.get((row["category"], i % count))) for i, c in enumerate(row["completions"])]
        compared = [(c, ref) for c, ref in pairs if ref is not None]
        row["greedy_compared"] = len(compared)
        row["greedy_identical"] = sum(c == ref for c, ref in compared)
    return label("specfleet", "plain")


def _reference_completions(rows: list[dict], prompts_per_category: dict[str, int]) -> dict[tuple, list[int]]:
    reference: dict[tuple, list[int]] = {}
    candidates = [r for r in rows if (r["system"], r["mode"]) == ("specfleet", "plain") and r["temperature"] == 0
                  and "completions" in r]
    for row in sorted(candidates, key=lambda r: -r["concurrency"]):  # the lowest concurrency wins
        for i, completion in enumerate(row["completions"]):
            reference[(row["category"], i % prompts_per_category[row["category"]])] = completion
    return reference


def drop_completions(rows: list[dict]) -> None:
    for row in rows:
        row.pop("completions", None)


def select(rows: Iterable[dict], **fields) -> list[dict]:
    return [r for r in rows if "error" not in r and all(r.get(k) == v for k, v in fields.items())]


def pooled_view(rows: list[dict], system: str, mode: str, temperature: float, concurrency: int) -> dict | None:
    """The row of all categories pooled (category "all") for one system, mode, temperature, concurrency."""
    chosen = select(rows, system=system, mode=mode, temperature=temperature, concurrency=concurrency, category="all")
    return chosen[0] if chosen else None


def pooled_speedup(rows: list[dict], system: str, temperature: float, concurrency: int) -> float | None:
    row = pooled_view(rows, system, "speculative", temperature, concurrency)
    return row.get("speedup") if row else None
