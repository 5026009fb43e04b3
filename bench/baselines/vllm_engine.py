"""vLLM (CPU build): autoregressive decoding, or its own `draft_model` speculative decoding.

Runs under vLLM's own interpreter (a separate venv; see bench/vllm_check.py),
one engine per process: the parent starts one child for each mode. The engine
is vLLM's `AsyncLLM` with streamed deltas, so each request's tokens are timed
as they arrive, with `concurrency` requests in flight (a closed loop, as for
every system). The drafter is the single-exit export of the same exit
specfleet drafts with, proposing k tokens a step.

vLLM counts speculation in Prometheus counters (drafts, draft tokens,
accepted tokens); a cell's counts are the difference across the cell. Its MAL
is 1 + accepted / drafts, the bonus token included as in specfleet's.
"""

import asyncio
import json
import os
import time
import uuid
from pathlib import Path

from bench.metrics import RequestTrace, SpeculationCounts

COUNTERS = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "drafted",
            "vllm:spec_decode_num_accepted_tokens": "accepted"}


class Session:
    def __init__(self, settings: dict, modes: list[str]):
        if len(modes) != 1:
            raise ValueError("a vLLM benchmark process runs one mode (one engine)")
        self.settings, self.mode = settings, modes[0]
        self.loop = asyncio.new_event_loop()
        started = time.perf_counter()
        self.engine = self.loop.run_until_complete(self._start())
        self.load_s = time.perf_counter() - started

    async def _start(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        target = self.settings["target"]
        extra = {}
        if self.mode == "speculative":
            extra["speculative_config"] = {"method": "draft_model", "model": self.settings["drafter_export"],
                                           "num_speculative_tokens": self.settings["k"]}
        args = AsyncEngineArgs(
            model=target, dtype="float32", enforce_eager=True, seed=self.settings["seed"],
            max_model_len=json.loads((Path(target) / "config.json").read_text())["max_position_embeddings"],
            max_num_seqs=max(self.settings["max_concurrency"], 1), disable_log_stats=False, **extra,
        )
        return AsyncLLM.from_engine_args(args)

    def info(self) -> dict:
        import vllm

        env = {name: os.environ.get(name) for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")}
        return {"load_s": self.load_s, "vllm": vllm.__version__, "mode": self.mode, "env": env,
                "drafter": self.settings["drafter_export"] if self.mode == "speculative" else None}

    def run(self, mode: str, cell: dict) -> tuple[list[RequestTrace], SpeculationCounts | None]:
        before = _counters()
        try:
            traces = self.loop.run_until_complete(self._closed_loop(cell))
        except Exception:
            self._restart_if_dead()
            raise  # this cell is reported failed, with vLLM's error
        return traces, self._counts(before, _counters(), traces)

    def _restart_if_dead(self) -> None:
        """A cell that kills vLLM's engine (e.g. vllm-cpu 0.32.0's seeded sampling at 64 streams: "CPU Generator
        does not use offset") would fail every later cell with EngineDeadError; they get a fresh engine instead."""
        if getattr(self.engine, "errored", False):
            self.engine.shutdown()
            self.engine = self.loop.run_until_complete(self._start())

    async def _closed_loop(self, cell: dict) -> list[RequestTrace]:
        traces: list[RequestTrace | None] = [None] * len(cell["prompts"])
        waiting = asyncio.Queue()
        for index in range(len(cell["prompts"])):
            waiting.put_nowait(index)

        async def client() -> None:
            while not waiting.empty():
                index = waiting.get_nowait()
                traces[index] = await self._request(cell["prompts"][index], cell["temperature"], cell["seed"] + index)

        await asyncio.gather(*(client() for _ in range(cell["concurrency"])))
        await asyncio.sleep(0.05)  # let the stat logger record the last step's counters
        return traces

    async def _request(self, prompt: list[int], temperature: float, seed: int) -> RequestTrace:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(temperature=temperature, top_p=1.0, top_k=0, max_tokens=self.settings["max_tokens"],
                                ignore_eos=True, seed=seed, output_kind=RequestOutputKind.DELTA)
        trace = RequestTrace(time.perf_counter())
        stream = self.engine.generate({"prompt_token_ids": prompt}, params, request_id=f"bench-{uuid.uuid4().hex}")
        async for output in stream:
            new = list(output.outputs[0].token_ids)
            trace.record(time.perf_counter(), len(new), new)
        return trace

    def _counts(self, before: dict, after: dict, traces: list[RequestTrace]) -> SpeculationCounts:
        tokens = sum(t.num_tokens for t in traces)
        if self.mode != "speculative":
            return SpeculationCounts(0, 0, tokens, tokens)  # one token per forward
        delta = {name: after.get(name, 0) - before.get(name, 0) for name in COUNTERS.values()}
        return SpeculationCounts(delta["drafted"], delta["accepted"], delta["drafts"], delta["drafts"] + delta["accepted"])

    def close(self) -> None:
        self.engine.shutdown()
        self.loop.close()


def _counters() -> dict:
    from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

    totals: dict[str, int] = {}
    for metric in get_metrics_snapshot():
        if isinstance(metric, Counter) and metric.name in COUNTERS:
            totals[COUNTERS[metric.name]] = totals.get(COUNTERS[metric.name], 0) + metric.value
    return totals
