"""A drafter of another vocabulary against the same-vocabulary drafter of the same size, in one process, side by side.

Run: python -m bench.foreign_vocabulary [--target PATH] [--drafter PATH] [--foreign PATH] [--exits L,L]
                                        [--k K] [--prompts N] [--repeats N] [--max-tokens N] [--temperatures T,T]

Arms, each decoding every held-out code prompt one stream at a time, interleaved within each
repeat (load from elsewhere falls on all arms alike):
- specfleet: the target alone; per exit, the sorted drafter of the target's vocabulary, and the
  foreign-vocabulary drafter (`drafter-8k`) through `ForeignVocabularyDrafter` (greedy: string-level
  exact match; sampled: token-level intersection), both with k draft tokens a round;
- Hugging Face `generate` (greedy only): alone, assisted by the same-vocabulary exit export, and
  assisted by the foreign exit export through universal assisted decoding (`tokenizer` and
  `assistant_tokenizer` given), k assistant tokens a round.

Reports per arm the median tokens/s of a request, acceptance (accepted / drafted, in target tokens)
and MAL for specfleet's arms, MAL for HF's (target forwards counted by a hook), and whether greedy
output equals the target's own. Writes bench/reports/foreign_vocabulary.{json,md}.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.drafters import ModelDrafter
from actors.engine import SpeculationStats
from actors.foreign_drafter import pair_drafter
from actors.generator import SpeculativeGenerator
from actors.runner import ModelRunner, RunnerSettings
from actors.sampling import make_sampling_params
from bench.machine import measure_and_report
from bench.prompts import heldout_code_prompts
from cluster.defaults import models_dir

REPORTS = Path(__file__).parent / "reports"
PLAIN, HF_PLAIN = "specfleet: target alone", "HF generate: target alone"


@dataclass
class Outcome:
    tokens: list[int]
    stats: SpeculationStats  # drafted and accepted stay 0 where not counted (HF)


@dataclass(frozen=True)
class Arm:
    name: str
    drafter: str  # "none", "same vocabulary" or "foreign vocabulary"
    exit_layer: int | None
    greedy_only: bool
    run: Callable[[list[int], float, int], Outcome]  # (prompt, temperature, seed) -> outcome


def specfleet_arms(args, target: ModelRunner) -> list[Arm]:
    same = ModelRunner.serving(args.drafter, RunnerSettings(compile=args.drafter_compile), drafts=True)
    foreign = ModelRunner.serving(args.foreign, RunnerSettings(compile=args.drafter_compile), drafts=True)
    target_tokenizer = AutoTokenizer.from_pretrained(args.target)
    foreign_tokenizer = AutoTokenizer.from_pretrained(args.foreign)

    def arm(name: str, kind: str, exit_layer: int | None, generator: SpeculativeGenerator) -> Arm:
        def run(prompt: list[int], temperature: float, seed: int) -> Outcome:
            params = make_sampling_params(temperature=temperature, seed=seed, max_tokens=args.max_tokens, ignore_eos=True)
            result = generator.generate([prompt], params)[0]
            return Outcome(result.tokens, result.stats)
        return Arm(name, kind, exit_layer, False, run)

    made = [arm(PLAIN, "none", None, SpeculativeGenerator(target))]
    for exit_layer in args.exit_layers:
        made.append(arm(f"specfleet: same vocabulary, exit {exit_layer}", "same vocabulary", exit_layer,
                        SpeculativeGenerator(target, ModelDrafter(same), k=args.k, exit_layer=exit_layer)))
        bridged = pair_drafter(ModelDrafter(foreign), target_tokenizer, foreign_tokenizer, target.vocab_size)
        made.append(arm(f"specfleet: foreign vocabulary, exit {exit_layer}", "foreign vocabulary", exit_layer,
                        SpeculativeGenerator(target, bridged, k=args.k, exit_layer=exit_layer)))
    return made


class _Forwards:
    """Counts a model's forward calls (HF reports no speculation counters)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def hf_arms(args) -> list[Arm]:
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    target, target_tokenizer = load(args.target), AutoTokenizer.from_pretrained(args.target)
    forwards = _Forwards(target)

    def arm(name: str, kind: str, exit_layer: int | None, assistant_path: str | None, foreign: bool) -> Arm:
        assistant = None if assistant_path is None else load(assistant_path)
        if assistant is not None:
            config = assistant.generation_config
            config.num_assistant_tokens, config.num_assistant_tokens_schedule = args.k, "constant"
            config.assistant_confidence_threshold = 0.0
        tokenizers = {"tokenizer": target_tokenizer, "assistant_tokenizer": AutoTokenizer.from_pretrained(assistant_path)} \
            if foreign else {}

        @torch.inference_mode()
        def run(prompt: list[int], temperature: float, seed: int) -> Outcome:
            before, ids = forwards.calls, torch.tensor([prompt])
            out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                  min_new_tokens=args.max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                                  assistant_model=assistant, **tokenizers)
            tokens = out[0, len(prompt):].tolist()
            return Outcome(tokens, SpeculationStats(target_forwards=forwards.calls - before - 1, emitted=len(tokens) - 1))
        return Arm(name, kind, exit_layer, True, run)

    made = [arm(HF_PLAIN, "none", None, None, False)]
    for exit_layer in args.exit_layers:
        made.append(arm(f"HF assisted: same vocabulary, exit {exit_layer}", "same vocabulary", exit_layer,
                        str(Path(args.drafter).parent / f"{Path(args.drafter).name}-exit-{exit_layer}"), False))
        made.append(arm(f"HF assisted (universal): foreign vocabulary, exit {exit_layer}", "foreign vocabulary", exit_layer,
                        str(Path(args.foreign).parent / f"{Path(args.foreign).name}-exit-{exit_layer}"), True))
    return made


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    target = ModelRunner.serving(args.target, RunnerSettings(compile=args.compile))
    arms = specfleet_arms(args, target) + ([] if args.no_hf else hf_arms(args))
    prompts = heldout_code_prompts(args.prompts, args.prompt_tokens, Path(args.zoo))
    cells = []
    for temperature in args.temperature_list:
        runnable = [a for a in arms if temperature == 0 or not a.greedy_only]
        for arm in runnable:  # a first pass compiles what warm-up left and is not timed
            arm.run(prompts[0], temperature, 0)
        speeds = {a.name: [] for a in runnable}
        stats = {a.name: SpeculationStats() for a in runnable}
        outputs = {a.name: [] for a in runnable}
        for _ in range(args.repeats):
            for index, prompt in enumerate(prompts):
                for arm in runnable:
                    started = time.perf_counter()
                    outcome = arm.run(prompt, temperature, index)
                    speeds[arm.name].append(len(outcome.tokens) / (time.perf_counter() - started))
                    stats[arm.name].add(outcome.stats)
                    outputs[arm.name].append(outcome.tokens)
        cells.append({"temperature": temperature, "arms": [_row(a, speeds, stats, outputs) for a in runnable]})
    return {"target": args.target, "drafter": args.drafter, "foreign": args.foreign, "k": args.k,
            "compile": target.compile_mode, "threads": args.threads, "prompts": len(prompts),
            "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "max_tokens": args.max_tokens, "cells": cells}


def _row(arm: Arm, speeds: dict, stats: dict, outputs: dict) -> dict:
    counted = stats[arm.name]
    return {"name": arm.name, "drafter": arm.drafter, "exit": arm.exit_layer,
            "median_tokens_per_s": statistics.median(speeds[arm.name]),
            "acceptance": counted.acceptance_rate if counted.drafted else None,
            "mal": counted.mean_accepted_length if arm.exit_layer is not None else 1.0,
            "greedy_identical": outputs[arm.name] == outputs[PLAIN]}


def render(result: dict) -> str:
    machine = result["machine"]
    lines = ["# A drafter of another vocabulary against the same-vocabulary drafter (in process)", "",
             f"`python -m bench.foreign_vocabulary` on {machine['cpu']} (load average at start "
             f"{machine['load_average_at_start']}, at end {result['load_average_at_end']}), commit {machine['git_commit']}. "
             f"Target `{result['target']}` ({result['compile']}); same-vocabulary drafter `{result['drafter']}`, "
             f"foreign-vocabulary drafter `{result['foreign']}`; k = {result['k']}; {result['threads']} thread(s); "
             f"{result['prompts']} held-out code prompts of {result['prompt_tokens']} tokens x {result['repeats']} "
             f"interleaved repeats, {result['max_tokens']} tokens each, one stream. Acceptance: accepted / drafted "
             "draft tokens, counted in target tokens. MAL: tokens per target forward, bonus included.", ""]
    for cell in result["cells"]:
        plain = {a["name"]: a["median_tokens_per_s"] for a in cell["arms"]}
        lines += [f"## Temperature {cell['temperature']}", "",
                  "| arm | acceptance | MAL | tokens/s (median) | over its target alone | output = target's |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for a in cell["arms"]:
            alone = plain[HF_PLAIN if a["name"].startswith("HF") else PLAIN]
            acceptance = "-" if a["acceptance"] is None else f"{a['acceptance']:.3f}"
            identical = a["greedy_identical"] if cell["temperature"] == 0 else "(sampled)"
            lines.append(f"| {a['name']} | {acceptance} | {a['mal']:.2f} | {a['median_tokens_per_s']:.0f} | "
                         f"{a['median_tokens_per_s'] / alone:.2f}x | {identical} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=str(models_dir() / "target-xl"))
    parser.add_argument("--drafter", default=str(models_dir() / "drafter"), help="the drafter of the target's vocabulary")
    parser.add_argument("--foreign", default=str(models_dir() / "drafter-8k"), help="the drafter of another vocabulary")
    parser.add_argument("--zoo", default=str(models_dir()), help="zoo folder whose held-out files give the prompts")
    parser.add_argument("--exits", default="1,2,4", help="drafter exits, comma-separated (both drafters have them)")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per round")
    parser.add_argument("--compile", default="auto", help="RunnerSettings.compile of the target")
    parser.add_argument("--drafter-compile", default="auto", help="RunnerSettings.compile of both drafters")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperatures", default="0,1", help="comma-separated; HF's arms run greedy only")
    parser.add_argument("--no-hf", action="store_true", help="leave out Hugging Face's arms")
    parser.add_argument("--out", default=str(REPORTS / "foreign_vocabulary"), help="report path without suffix")
    args = parser.parse_args()
    args.exit_layers = [int(e) for e in args.exits.split(",")]
    args.temperature_list = [float(t) for t in args.temperatures.split(",")]
    measure_and_report(lambda: measure(args), render, Path(args.out))


if __name__ == "__main__":
    main()
