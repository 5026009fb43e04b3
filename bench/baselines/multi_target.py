"""Three targets served at once by one shared drafter, against a dedicated drafter each.

Two clusters are started in turn with `specfleet up`: in the first, one drafter
actor serves target-s, target-m and target-l; in the second, each target has
a drafter actor of its own (the same checkpoint and exit). In each, the three
targets stream concurrently (one client per target, greedy), first with
speculation off, then on; a target's speedup is its speculative over its plain
tokens/s. The goal: shared-drafter speedup >= 90% of the dedicated one.
"""

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from bench.baselines.cluster_process import ClusterProcess, write_config
from bench.baselines.grpc_client import stream, stream_request
from bench.closed_loop import run_closed_loop
from bench.metrics import speedup, summarize
from specfleet.v1 import generation_pb2_grpc as pb_grpc

LAYOUTS = ("shared", "dedicated")


def run_whole_job(job: dict) -> dict:
    settings = job["settings"]
    targets: dict[str, str] = settings["multi_targets"]
    prompts = job["cells"][0]["prompts"]
    layouts, processes = {}, {}
    for layout in LAYOUTS:
        layouts[layout], processes[layout] = _measure_layout(layout, targets, prompts, settings)
    ratio = {t: _ratio(layouts["shared"][t]["speedup"], layouts["dedicated"][t]["speedup"]) for t in targets}
    return {"targets": list(targets), "requests_per_target": len(prompts), **layouts, "ratio": ratio,
            "processes": processes}


def _ratio(shared: float | None, dedicated: float | None) -> float | None:
    return shared / dedicated if shared and dedicated else None


def _measure_layout(layout: str, targets: dict[str, str], prompts, settings) -> tuple[dict, list[dict]]:
    """Speculation is FIXED at the configured exit and k with each target's paired drafter, as in the main benchmark."""
    folder = Path(tempfile.mkdtemp(prefix=f"specfleet-bench-{layout}-"))
    if layout == "shared":
        drafters, pairing = {"drafter": settings["drafter"]}, {t: "drafter" for t in targets}
    else:
        drafters = {f"drafter-for-{t}": settings["drafter"] for t in targets}
        pairing = {t: f"drafter-for-{t}" for t in targets}
    config = write_config(folder, targets, drafters, pairing, settings["exit_layer"], settings["k"])
    cluster = ClusterProcess(config, settings["threads"], folder / "up.log")
    try:
        with grpc.insecure_channel(cluster.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            phases = {mode: _all_targets_at_once(stub, pairing, prompts, settings, mode == "speculative")
                      for mode in ("plain", "speculative")}
        peaks = cluster.peaks()
    finally:
        cluster.stop()
    per_target = {t: {"plain": phases["plain"][t], "speculative": phases["speculative"][t],
                      "speedup": speedup(phases["speculative"][t]["tokens_per_s"], phases["plain"][t]["tokens_per_s"])}
                  for t in targets}
    return per_target, peaks


def _all_targets_at_once(stub, pairing: dict[str, str], prompts, settings, speculate: bool) -> dict[str, dict]:
    """Each target's own closed loop (one stream at a time), all targets concurrently.

    Leaving the pool waits for every target, so an error is raised only after the others are done.
    """

    def serve(target: str) -> dict:
        speculation = {"drafter": pairing[target], "exit_layer": settings["exit_layer"], "k": settings["k"]}

        def send(index, prompt):
            return stream(stub, stream_request(target, prompt, settings["max_tokens"], 0.0, index,
                                               speculation if speculate else None))

        return summarize(run_closed_loop(prompts, 1, send))

    with ThreadPoolExecutor(len(pairing)) as pool:
        futures = {target: pool.submit(serve, target) for target in pairing}
    return {target: future.result() for target, future in futures.items()}
