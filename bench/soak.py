"""Soak: steady mixed traffic on the Serve application while a reaper kills a random actor every few minutes.

Run: python -m bench.soak [--minutes 30] [--kill-every-s 180] [--clients 6] [--max-tokens 48] [--config PATH]
     python -m bench.soak --from-json bench/reports/soak.json   (render the report again)

The application `specfleet up` runs (the zoo by default) on a local Ray
cluster, reached by gRPC (streaming and unary) and HTTP (streaming completions)
clients that each send one request after another: greedy (70%) and sampled,
every target, held-out code prompts. Every few minutes a reaper kills the
controller's replica, a front door's replica, the drafter or a target replica.
The report counts requests served and failed (by code), tokens lost (missing, or
different from the target's own greedy output: must be 0) and plots each actor's
memory over time. Writes bench/reports/soak.{json,md,png}.
"""

import argparse
import json
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import ray
from ray import serve

from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from bench.baselines.cluster_process import free_port
from bench.machine import describe_machine
from bench.plots import _pyplot
from bench.prompts import heldout_code_prompts
from bench.soak_traffic import Client, MemorySampler, Reaper, Workload, outcome_dicts
from cluster.config import ClusterConfig, default_config, load_config
from cluster.serve.app import build_app_from_config
from cluster.up_run import APP_NAME, start_local_ray

REPORTS = Path(__file__).parent / "reports"
MEMORY_EVERY_S = 10.0
KILL_LOG_SLACK_S = 1.0  # a kill is logged once `ray.kill` returned: requests it failed may end just before
PROMPTS = 6


def workload(config: ClusterConfig, max_tokens: int) -> Workload:
    """Held-out prompts and each target's own greedy output for them, decoded in this process."""
    prompts = heldout_code_prompts(PROMPTS, 48)
    params = make_sampling_params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    expected = {}
    for name, target in config.targets.items():
        results = SpeculativeGenerator(ModelRunner.from_pretrained(target.path)).generate(prompts, params)
        expected |= {(name, index): result.tokens for index, result in enumerate(results)}
    return Workload(prompts, expected, max_tokens)


def soak(args: argparse.Namespace) -> dict:
    config = load_config(args.config) if args.config else default_config()
    work = workload(config, args.max_tokens)
    machine = describe_machine()
    start_local_ray(config)
    try:
        grpc_port, http_port = free_port(), free_port()  # after Ray's processes took theirs
        serve.start(http_options={"host": "127.0.0.1", "port": http_port}, proxy_location="HeadOnly")
        serve.run(build_app_from_config(config, "127.0.0.1", grpc_port), name=APP_NAME, route_prefix="/")
        controller = serve.get_deployment_handle("FleetController", app_name=APP_NAME)
        stop, outcomes, began = threading.Event(), [], time.monotonic()
        clients = [Client(i, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}/v1", work, began, stop, outcomes)
                   for i in range(args.clients)]
        reaper = Reaper(controller, APP_NAME, args.kill_every_s, args.seed, began, stop)
        sampler = MemorySampler(controller, MEMORY_EVERY_S, began, stop)
        for thread in (*clients, reaper, sampler):
            thread.start()
        time.sleep(args.minutes * 60)
        stop.set()
        for thread in (*clients, reaper, sampler):
            thread.join()
        serve.shutdown()
    finally:
        ray.shutdown()
    return {"machine": machine, "minutes": args.minutes, "kill_every_s": args.kill_every_s, "clients": args.clients,
            "max_tokens": args.max_tokens, "targets": sorted(config.targets), "kills": reaper.kills,
            "memory": sampler.samples, "outcomes": outcome_dicts(outcomes)}


def render(result: dict, plot: str | None) -> str:
    outcomes = result["outcomes"]
    codes = Counter(o["code"] for o in outcomes)
    served = codes.get("OK", 0)
    lost = sum(o["lost"] for o in outcomes if o["code"] == "OK")
    by_transport = Counter((o["transport"], o["code"]) for o in outcomes)
    machine = result["machine"]
    lines = [
        "# Soak: mixed traffic while a reaper kills actors",
        "",
        f"`python -m bench.soak --minutes {result['minutes']} --kill-every-s {result['kill_every_s']} "
        f"--clients {result['clients']} --max-tokens {result['max_tokens']}` on {machine['cpu']} "
        f"({machine['usable_cpus']} CPUs), commit {machine['git_commit']}, load average at start "
        f"{machine['load_average_at_start']}. Targets: {', '.join(result['targets'])}; requests ignore end-of-sequence, "
        "so each must return exactly max_tokens tokens; greedy ones (70%) must equal the target's own greedy output.",
        "",
        f"- requests: {len(outcomes)}, served {served}, failed {len(outcomes) - served}",
        f"- **tokens lost** in served requests (missing, or unlike the target's own greedy tokens): **{lost}**",
        f"- kills: {len(result['kills'])}; median request seconds (served): "
        f"{statistics.median([o['seconds'] for o in outcomes if o['code'] == 'OK'] or [0]):.2f}",
        "",
        "| transport | outcome | requests |",
        "|---|---|---:|",
    ]
    lines += [f"| {transport} | {code} | {count} |" for (transport, code), count in sorted(by_transport.items())]
    lines += ["", "| at (s) | killed |", "|---:|---|"]
    lines += [f"| {k['at_s']} | {k['victim']}{' (skipped: ' + k['skipped'] + ')' if 'skipped' in k else ''} |"
              for k in result["kills"]]
    lines += ["", "Failed requests after each kill: a request fails when its front door dies under it, or "
              "when it reaches one that is restarting (each client sends its next request a second after a "
              "failure, so a door's outage counts about one failure per client per second):", ""]
    lines += _failures_by_kill(result)
    if plot:
        lines += ["", f"![memory of each actor over time]({plot})"]
    return "\n".join(lines) + "\n"


def _failures_by_kill(result: dict) -> list[str]:
    """Per kill: the requests that failed after it (a failure ending up to a second before the kill was logged is
    its own: the kill is logged once done), and how long until every transport served a request started after it."""
    outcomes, kills = result["outcomes"], result["kills"]
    starts = [k["at_s"] - KILL_LOG_SLACK_S for k in kills] + [float("inf")]
    failed = [o for o in outcomes if o["code"] != "OK"]
    rows = ["| kill at (s) | victim | failed requests | until every transport served again (s) |", "|---:|---|---:|---:|"]
    before = sum(o["started_s"] + o["seconds"] < starts[0] for o in failed)
    rows.append(f"| - | (before the first kill) | {before} | - |")
    for kill, start, end in zip(kills, starts, starts[1:]):
        count = sum(start <= o["started_s"] + o["seconds"] < end for o in failed)
        rows.append(f"| {kill['at_s']} | {kill['victim']} | {count} | {_recovery(outcomes, kill['at_s'])} |")
    return rows


def _recovery(outcomes: list[dict], at_s: float) -> str:
    """Seconds from `at_s` to the latest, over the transports served before it, of each one's first served request
    started after it; "not again" if one never served again in the run."""
    firsts = []
    for transport in {o["transport"] for o in outcomes if o["code"] == "OK" and o["started_s"] < at_s}:
        served = [o["started_s"] for o in outcomes if o["transport"] == transport and o["code"] == "OK" and o["started_s"] > at_s]
        firsts.append(min(served) - at_s if served else float("inf"))
    worst = max(firsts, default=0.0)
    return "not again" if worst == float("inf") else f"{worst:.1f}"


def plot_memory(result: dict, path: Path) -> Path | None:
    if not result["memory"]:
        return None
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(9, 4))
    actors = sorted({actor for sample in result["memory"] for actor in sample["rss_mib"]})
    for actor in actors:
        points = [(s["at_s"] / 60, s["rss_mib"].get(actor)) for s in result["memory"]]
        ax.plot([t for t, v in points if v is not None], [v for _, v in points if v is not None], label=actor)
    for kill in result["kills"]:
        ax.axvline(kill["at_s"] / 60, color="grey", linewidth=0.5)
    ax.set_xlabel("minutes (grey: a kill)")
    ax.set_ylabel("private resident memory (MiB)")
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the traffic runs")
    parser.add_argument("--kill-every-s", type=float, default=180.0, help="seconds between two kills")
    parser.add_argument("--clients", type=int, default=6, help="clients sending one request after another")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reaper's choices")
    parser.add_argument("--config", type=Path, help="cluster config YAML (default: the embedded zoo)")
    parser.add_argument("--out", type=Path, default=REPORTS, help="folder of soak.json, soak.md and soak.png")
    parser.add_argument("--from-json", type=Path, help="only render the report of an earlier soak.json")
    args = parser.parse_args()
    result = json.loads(args.from_json.read_text()) if args.from_json else soak(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    plot = plot_memory(result, args.out / "soak.png")
    (args.out / "soak.md").write_text(render(result, plot.name if plot else None))
    print((args.out / "soak.md").read_text())


if __name__ == "__main__":
    main()
