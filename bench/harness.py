"""`specfleet bench`: every system on the same prompts, in one run, into one JSON report.

1. Build the prompt sets (token ids of the target's tokenizer) per category.
2. Run each system in its own process (`bench.child`): specfleet in-process,
   specfleet's cluster over gRPC (and HTTP once the app exists), vLLM
   autoregressive and draft_model (in vLLM's own interpreter), HF generate and
   assisted generation. Each measures every cell in plain and speculative mode.
3. Profile a speculation round, and measure one drafter shared by three
   targets against a dedicated drafter each.
4. Compute speedups (over the same system's plain decoding, same cell),
   greedy agreement with the target alone, and where the goals stand; write
   bench.json, then BENCHMARKS.md and its plots from that JSON.
"""

import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from actors.errors import InvalidRequest
from actors.loading import load_tokenizer, read_config
from bench.categories import DESCRIPTIONS, build_prompts, heldout_texts
from bench.goals import evaluate_goals
from bench.jobs import Job, job_settings, plan_jobs, run_job
from bench.machine import describe_machine, load_average
from bench.results import add_greedy_agreement, add_speedups, collect_rows, drop_completions
from bench.workloads import MAX_LOAD_TO_START, BenchConfig, prompt_length

ZOO_TARGETS = ("target-s", "target-m", "target-l")


def build_prompt_sets(config: BenchConfig) -> dict[str, list[list[int]]]:
    tokenizer = load_tokenizer(config.target)
    texts = heldout_texts(config.corpus_manifest)
    return {c: build_prompts(c, tokenizer, texts, config.prompts_per_category, prompt_length(config, c), config.seed)
            for c in config.categories}


def check_fits(config: BenchConfig) -> None:
    """Every request must fit the target's context, with room for a full draft."""
    context = read_config(config.target)["max_position_embeddings"]
    longest = max(prompt_length(config, c) for c in config.categories) + config.max_tokens + config.k + 1
    if longest > context:
        raise InvalidRequest(f"bench: prompts of up to {longest - config.max_tokens - config.k - 1} tokens + max_tokens "
                         f"{config.max_tokens} + k {config.k} + 1 exceed the target's context of {context}")


def check_quiet(config: BenchConfig) -> None:
    """Refuse to measure on a busy machine unless forced: the report records the load either way."""
    load = load_average()
    if load and load[0] > MAX_LOAD_TO_START and not config.force:
        raise InvalidRequest(f"bench: the 1-minute load average is {load[0]} (above {MAX_LOAD_TO_START}): stop other "
                             "work (other engines' idle processes too) or pass --force")


def run_benchmark(config: BenchConfig, command: str, log_dir: Path | None = None, echo=print) -> dict:
    """Run everything the config asks for; returns the report (not yet written)."""
    check_fits(config)
    check_quiet(config)
    started = time.perf_counter()
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="specfleet-bench-logs-"))
    settings = job_settings(config)
    report = {"preset": config.preset, "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": describe_machine(), "settings": settings,
              "categories": {c: DESCRIPTIONS[c] for c in config.categories}, "log_dir": str(log_dir), "systems": {}}
    prompts = build_prompt_sets(config)
    warmup = prompts[config.categories[0]][0]
    results = {}
    for job in plan_jobs(config, prompts):
        echo(f"bench: {job.name} ({len(job.cells)} cells x {len(job.modes)} modes)" + (f": not run, {job.not_run}" if job.not_run else ""))
        results[job.name] = run_job(job, settings, warmup, config.child_timeout_s, log_dir)
        report["systems"][job.name] = _system_entry(results[job.name])
        if results[job.name]["status"] == "failed":
            echo(f"bench: {job.name} failed: {results[job.name]['reason']}")
    report["rows"] = collect_rows(results)
    add_speedups(report["rows"])
    report["greedy_reference"] = add_greedy_agreement(report["rows"], {c: len(p) for c, p in prompts.items()})
    if not config.keep_tokens:
        drop_completions(report["rows"])
    report["profile"] = _profile(config, settings, prompts, log_dir, echo)
    report["multi_target"] = _multi_target(config, settings, prompts, log_dir, echo)
    report["gpu"] = _gpu_status(config)
    report["goals"] = evaluate_goals(report)
    report["machine"]["load_average_at_end"] = load_average()
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    return report


def _system_entry(result: dict) -> dict:
    keys = ("status", "reason", "mode_errors", "info", "processes", "elapsed_s")
    return {k: result[k] for k in keys if k in result}


def _profile(config: BenchConfig, settings: dict, prompts: dict, log_dir: Path, echo) -> dict:
    if not config.profile:
        return {"status": "not run", "reason": "profiling was switched off (--no-profile)"}
    category = "code" if "code" in prompts else next(iter(prompts))
    pool = prompts[category]
    cells = [{"category": category, "temperature": 0.0, "concurrency": c, "seed": config.seed,
              "prompts": [pool[i % len(pool)] for i in range(max(c, config.min_requests))]}
             for c in config.profile_concurrency]
    echo(f"bench: round profile (concurrency {config.profile_concurrency})")
    return run_job(Job("profile", "profile", ["profile"], Path(sys.executable), cells), settings, prompts[category][0],
                   config.child_timeout_s, log_dir)


def _multi_target(config: BenchConfig, settings: dict, prompts: dict, log_dir: Path, echo) -> dict:
    if not config.multi_target:
        return {"status": "not run", "reason": "switched off (--no-multi-target)"}
    folder = config.target.parent
    missing = [name for name in ZOO_TARGETS if not (folder / name).is_dir()]
    if missing:
        return {"status": "not run", "reason": f"needs the zoo's three targets beside the target; missing {missing} in {folder}"}
    category = "code" if "code" in prompts else next(iter(prompts))
    requests = [prompts[category][i % len(prompts[category])] for i in range(config.multi_target_requests)]
    job_settings_ = settings | {"multi_targets": {name: str(folder / name) for name in ZOO_TARGETS}}
    echo("bench: multi-target (one shared drafter vs a dedicated drafter per target)")
    cells = [{"category": category, "temperature": 0.0, "concurrency": 1, "seed": config.seed, "prompts": requests}]
    return run_job(Job("multi-target", "multi-target", ["plain", "speculative"], Path(sys.executable), cells),
                   job_settings_, requests[0], config.child_timeout_s, log_dir)


def _gpu_status(config: BenchConfig) -> dict:
    import torch

    command = "specfleet bench --preset gpu"
    if config.device.startswith("cuda") and torch.cuda.is_available():
        return {"status": "ran", "device": torch.cuda.get_device_name(0), "command": command}
    return {"status": "not run", "command": command,
            "reason": "no GPU on this machine (torch.cuda.is_available() is False); absolute tokens/s hold only on a GPU"}


def write_report(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    path.write_text(json.dumps(report, indent=1))
    return path
