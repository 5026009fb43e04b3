"""Three targets served at once by one shared drafter, against a dedicated drafter each.

One `specfleet up` cluster serves each zoo target twice: as `<target>`, paired
with one drafter actor that the three share, and as `<target>-own`, paired with
a drafter actor of its own (the same checkpoint, exit and k). Three phases,
interleaved (`bench.interleave`: every repeat runs each once, in a rotating
order): plain (the `<target>`s with speculation off), shared (the `<target>`s
speculating) and dedicated (the `<target>-own`s speculating). In each phase the
three targets stream concurrently, each its requests one after another
(greedy). A target's speedup is its speculative over its plain tokens/s in the
same repeat; shared over dedicated is the shared phase's tokens/s over the
dedicated phase's, in the same repeat, so a drift of the machine's load between
repeats cancels. The goal: shared >= 90% of dedicated on the worst target.
"""

import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from bench.baselines.cluster_process import ClusterProcess, write_config
from bench.baselines.grpc_client import stream, stream_request
from bench.closed_loop import run_closed_loop
from bench.interleave import paired_speedups, run_interleaved
from bench.metrics import summarize
from specfleet.v1 import generation_pb2_grpc as pb_grpc

OWN = "-own"  # suffix of a target's copy that has a drafter of its own
SHARED_DRAFTER = "shared-drafter"


def run_whole_job(job: dict) -> dict:
    settings = job["settings"]
    targets: dict[str, str] = settings["multi_targets"]
    prompts = job["cells"][0]["prompts"]
    folder = Path(tempfile.mkdtemp(prefix="specfleet-bench-multi-target-"))
    cluster = ClusterProcess(_config(folder, targets, settings), settings["threads"], folder / "up.log")
    try:
        with grpc.insecure_channel(cluster.address) as channel:
            phases = _phases(pb_grpc.GenerationStub(channel), list(targets), prompts, settings)
            for phase in phases.values():
                phase()  # warm-up, not counted
            results = run_interleaved(phases, settings["multi_target_repeats"])
        peaks = cluster.peaks()
    finally:
        cluster.stop()
    return {"targets": list(targets), "requests_per_target": len(prompts), "repeats": settings["multi_target_repeats"],
            **_summaries(list(targets), results), "processes": {"cluster": peaks}}


def _config(folder: Path, targets: dict[str, str], settings: dict) -> Path:
    drafters = {SHARED_DRAFTER: settings["drafter"]} | {f"drafter-for-{t}": settings["drafter"] for t in targets}
    pairing = {t: SHARED_DRAFTER for t in targets} | {t + OWN: f"drafter-for-{t}" for t in targets}
    served = targets | {t + OWN: path for t, path in targets.items()}
    return write_config(folder, served, drafters, pairing, settings["exit_layer"], settings["k"],
                        (settings["compile"], settings["drafter_compile"]))


def _phases(stub, targets: list[str], prompts, settings: dict) -> dict:
    """plain, shared and dedicated: each a callable returning {target: summary of its requests}."""
    speculation = {"exit_layer": settings["exit_layer"], "k": settings["k"]}
    shared = {t: (t, speculation | {"drafter": SHARED_DRAFTER}) for t in targets}
    dedicated = {t: (t + OWN, speculation | {"drafter": f"drafter-for-{t}"}) for t in targets}
    plain = {t: (t, None) for t in targets}
    return {name: (lambda served=served: _all_targets_at_once(stub, served, prompts, settings))
            for name, served in (("plain", plain), ("shared", shared), ("dedicated", dedicated))}


def _all_targets_at_once(stub, served: dict[str, tuple[str, dict | None]], prompts, settings) -> dict[str, dict]:
    """Each target's own closed loop (one stream at a time), all targets concurrently.

    `served` maps a target to the model name it is reached by and its
    speculation (None: off). Leaving the pool waits for every target, so an
    error is raised only after the others are done.
    """

    def serve(target: str) -> dict:
        model, speculation = served[target]

        def send(index, prompt):
            return stream(stub, stream_request(model, prompt, settings["max_tokens"], 0.0, index, speculation))

        return summarize(run_closed_loop(prompts, 1, send))

    with ThreadPoolExecutor(len(served)) as pool:
        futures = {target: pool.submit(serve, target) for target in served}
    return {target: future.result() for target, future in futures.items()}


def _summaries(targets: list[str], results: dict[str, list[dict]]) -> dict:
    """Per layout and target: runs, median tokens/s and MAL, paired speedups; shared over dedicated per target."""
    tokens_per_s = {phase: {t: [run[t]["tokens_per_s"] for run in runs] for t in targets} for phase, runs in results.items()}
    layouts = {layout: {t: {"plain_tokens_per_s": statistics.median(tokens_per_s["plain"][t]),
                            "tokens_per_s": statistics.median(tokens_per_s[layout][t]),
                            "mal": results[layout][0][t]["mal"],
                            "speedup": paired_speedups(tokens_per_s[layout][t], tokens_per_s["plain"][t]),
                            "runs": [run[t] for run in results[layout]]}
                        for t in targets}
               for layout in ("shared", "dedicated")}
    ratio = {t: paired_speedups(tokens_per_s["shared"][t], tokens_per_s["dedicated"][t]) for t in targets}
    return {**layouts, "plain_runs": {t: [run[t] for run in results["plain"]] for t in targets}, "ratio": ratio}
