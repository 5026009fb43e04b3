"""specfleet in-process: a `SpeculationEngine` stepped by the benchmark itself.

The same runner serves both modes: plain decoding (the engine without a
drafter, the baseline of every specfleet speedup) and speculative decoding
with the multi-exit drafter at the configured exit and k. Concurrency is the
number of sequences live in the engine (continuous batching): when one ends
the next request joins at the following round.
"""

import time
import uuid
from collections import deque

import torch

from actors.drafters import ModelDrafter
from actors.engine import SpeculationEngine
from actors.runner import ModelRunner, RunnerSettings
from actors.sampling import make_sampling_params
from bench.metrics import RequestTrace, SpeculationCounts


class Session:
    def __init__(self, settings: dict, modes: list[str]):
        torch.set_num_threads(settings["threads"])
        started = time.perf_counter()
        self.target = ModelRunner.serving(settings["target"], RunnerSettings(device=settings["device"], compile=settings["compile"]))
        drafter = None
        if "speculative" in modes:
            drafter_settings = RunnerSettings(device=settings["device"], compile=settings["drafter_compile"])
            drafter = ModelDrafter(ModelRunner.serving(settings["drafter"], drafter_settings, drafts=True))
        self.engines = {"plain": SpeculationEngine(self.target)}
        if drafter is not None:
            self.engines["speculative"] = SpeculationEngine(self.target, drafter, settings["k"], settings["exit_layer"])
        self.load_s = time.perf_counter() - started
        self.settings = settings

    def info(self) -> dict:
        return {"load_s": self.load_s, "torch_threads": torch.get_num_threads(), "device": self.settings["device"],
                "torch": torch.__version__, "compile_mode": self.target.compile_mode}

    def run(self, mode: str, cell: dict) -> tuple[list[RequestTrace], SpeculationCounts | None]:
        return run_closed_loop(self.engines[mode], cell, self.settings), None

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def sampling(settings: dict, temperature: float, seed: int):
    return make_sampling_params(temperature=temperature, max_tokens=settings["max_tokens"], ignore_eos=True, seed=seed)


def run_closed_loop(engine: SpeculationEngine, cell: dict, settings: dict) -> list[RequestTrace]:
    """Keep `concurrency` sequences live until every request of the cell is done."""
    waiting = deque(enumerate(cell["prompts"]))
    traces: dict[str, RequestTrace] = {}
    order = []
    while waiting or engine.num_live:
        while waiting and engine.num_live < cell["concurrency"]:
            index, prompt = waiting.popleft()
            seq_id = f"bench-{uuid.uuid4().hex}"
            traces[seq_id] = RequestTrace(time.perf_counter())
            order.append(seq_id)
            engine.add(prompt, sampling(settings, cell["temperature"], cell["seed"] + index), seq_id=seq_id)
        updates = engine.step()
        now = time.perf_counter()
        for update in updates:
            trace = traces[update.seq_id]
            trace.record(now, len(update.new_tokens), update.new_tokens)
            stats = update.stats
            trace.counts = SpeculationCounts(stats.drafted, stats.accepted, stats.target_forwards, stats.emitted)
    return [traces[seq_id] for seq_id in order]
