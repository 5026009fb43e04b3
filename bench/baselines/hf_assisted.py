"""Hugging Face transformers: plain `generate` and assisted generation (`assistant_model`).

The assistant is the single-exit export of the same drafter exit specfleet
drafts with, asked for exactly k tokens a round (constant schedule, no
confidence cut-off) so both systems run the same algorithm. HF's assisted
generation takes one sequence at a time, so only concurrency 1 runs.

HF does not report speculation counters; they are counted here: a forward
hook on the target counts verification rounds, one on the assistant counts
drafted tokens (one assistant forward per draft token), and accepted =
emitted - rounds (every round emits its accepted tokens plus one).
"""

import time

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from bench.metrics import RequestTrace, SpeculationCounts

DTYPE = torch.float32


class _TraceStreamer(BaseStreamer):
    """Records when each batch of new tokens arrives; the first `put` is the prompt and is skipped."""

    def __init__(self, trace: RequestTrace):
        self.trace, self._seen_prompt = trace, False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        tokens = value.reshape(-1).tolist()
        self.trace.record(time.perf_counter(), len(tokens), tokens)

    def end(self) -> None:
        pass


class _ForwardCounter:
    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        model.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.calls += 1


class Session:
    def __init__(self, settings: dict, modes: list[str]):
        torch.set_num_threads(settings["threads"])
        self.settings, self.device = settings, settings["device"]
        started = time.perf_counter()
        self.target = self._load(settings["target"])
        self.target_forwards = _ForwardCounter(self.target)
        self.assistant = None
        if "speculative" in modes:
            self.assistant = self._load(settings["drafter_export"])
            config = self.assistant.generation_config
            config.num_assistant_tokens = settings["k"]
            config.num_assistant_tokens_schedule = "constant"
            config.assistant_confidence_threshold = 0.0
            self.assistant_forwards = _ForwardCounter(self.assistant)
        self.load_s = time.perf_counter() - started

    def _load(self, path: str):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE, local_files_only=True)
        return model.to(self.device).eval()

    def info(self) -> dict:
        import transformers

        return {"load_s": self.load_s, "torch_threads": torch.get_num_threads(), "device": self.device,
                "transformers": transformers.__version__, "torch": torch.__version__,
                "assistant": self.settings["drafter_export"] if self.assistant is not None else None}

    def run(self, mode: str, cell: dict) -> tuple[list[RequestTrace], SpeculationCounts | None]:
        if cell["concurrency"] != 1:
            raise ValueError("HF assisted generation decodes one sequence at a time (concurrency 1 only)")
        assisted = mode == "speculative"
        counts = SpeculationCounts()
        traces = [self._generate(prompt, cell["temperature"], cell["seed"] + index, assisted, counts)
                  for index, prompt in enumerate(cell["prompts"])]
        return traces, counts

    @torch.inference_mode()
    def _generate(self, prompt: list[int], temperature: float, seed: int, assisted: bool,
                  counts: SpeculationCounts) -> RequestTrace:
        torch.manual_seed(seed)
        target_before = self.target_forwards.calls
        drafted_before = self.assistant_forwards.calls if assisted else 0
        input_ids = torch.tensor([prompt], device=self.device)
        trace = RequestTrace(time.perf_counter())
        self.target.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=self.settings["max_tokens"],
            do_sample=temperature > 0, temperature=temperature or 1.0, top_k=0, top_p=1.0,
            eos_token_id=None, pad_token_id=0, streamer=_TraceStreamer(trace),
            assistant_model=self.assistant if assisted else None,
        )
        rounds = self.target_forwards.calls - target_before
        drafted = self.assistant_forwards.calls - drafted_before if assisted else 0
        emitted = trace.num_tokens
        counts.add(SpeculationCounts(drafted, max(0, emitted - rounds) if assisted else 0, rounds, emitted))
        return trace

    def close(self) -> None:
        pass
