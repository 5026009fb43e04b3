"""Resident memory of one target actor over many requests in a row (issue 14: at most 16 MiB growth after 100).

Starts a local Ray instance with one drafter actor and one target actor, as
placement builds them (runner settings 'auto': compiled on a CPU), sends
`--requests` short greedy requests one after another through the target
actor's streaming `generate`, and reads the actor process's resident set
(VmRSS) after every `--every` requests. Writes a JSON and a Markdown report.

    python -m bench.request_memory [--requests 1000] [--every 50] [--out bench/reports]
"""

import argparse
import json
import os
import time
from pathlib import Path

import ray

from actors.ray_actors import DrafterActor, TargetActor
from actors.runner import RunnerSettings
from actors.sampling import make_sampling_params
from cluster.defaults import models_dir

PROC = Path("/proc")
BASELINE_REQUESTS = 100  # growth is measured from here: the first requests warm allocators and caches up
GOAL_MIB = 16.0


def rss_mib(pid: int) -> float:
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def measure(target_path: Path, drafter_path: Path, requests: int, every: int, max_tokens: int) -> dict:
    """Run the requests (at least `BASELINE_REQUESTS`) on a started Ray; the report as a dict."""
    env = {"env_vars": {"OMP_NUM_THREADS": "1"}}
    drafter = ray.remote(DrafterActor).options(num_cpus=0, max_concurrency=256, runtime_env=env).remote(
        str(drafter_path), RunnerSettings())
    target = ray.remote(TargetActor).options(num_cpus=0, max_concurrency=256, runtime_env=env).remote(
        str(target_path), RunnerSettings(), drafter, 2, 4, 30.0, "target", "drafter")
    info = ray.get(target.info.remote())
    vocab = info["vocab_size"]
    prompts = [[(7 * i + j) % (vocab - 10) + 10 for j in range(24 + i % 16)] for i in range(requests)]
    params = make_sampling_params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    samples, started = [], time.perf_counter()
    for index, prompt in enumerate(prompts, start=1):
        for ref in target.generate.options(num_returns="streaming").remote(f"r{index}", prompt, params):
            ray.get(ref)
        if index % every == 0 or index == BASELINE_REQUESTS:
            samples.append({"requests": index, "rss_mib": round(rss_mib(info["pid"]), 1)})
    baseline = next(s["rss_mib"] for s in samples if s["requests"] == BASELINE_REQUESTS)
    growth = max(s["rss_mib"] for s in samples if s["requests"] >= BASELINE_REQUESTS) - baseline
    return {"requests": requests, "max_tokens": max_tokens, "seconds": round(time.perf_counter() - started, 1),
            "compile_mode": info["compile_mode"], "max_sequences": info["max_sequences"], "samples": samples,
            "growth_after_baseline_mib": round(growth, 1), "goal_mib": GOAL_MIB, "met": growth <= GOAL_MIB,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def markdown(report: dict) -> str:
    rows = "\n".join(f"| {s['requests']} | {s['rss_mib']} |" for s in report["samples"])
    verdict = "met" if report["met"] else "not met"
    return (f"# Target actor memory over {report['requests']} requests in a row\n\n"
            f"`python -m bench.request_memory`: target-l ({report['compile_mode']}, {report['max_sequences']} KV slots) "
            f"with the zoo's drafter, {report['requests']} greedy requests of {report['max_tokens']} tokens one after "
            f"another, {report['seconds']} s; load average at the end {report['load_average']}.\n\n"
            f"Growth of the target actor's resident set after the first {BASELINE_REQUESTS} requests: "
            f"**{report['growth_after_baseline_mib']} MiB** (goal <= {report['goal_mib']:g} MiB: {verdict}).\n\n"
            f"| requests | target actor RSS (MiB) |\n|---:|---:|\n{rows}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = measure(models_dir() / "target-l", models_dir() / "drafter", args.requests, args.every, args.max_tokens)
    finally:
        ray.shutdown()
    (args.out / "request_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "request_memory.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
