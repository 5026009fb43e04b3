"""`specfleet generate` without `--server`: the prompt through the in-process speculative engine."""

import argparse
from pathlib import Path

from actors.drafters import Drafter, ModelDrafter, NgramDrafter
from actors.errors import InvalidRequest
from actors.generator import SpeculativeGenerator
from actors.foreign_drafter import pair_drafter
from actors.loading import load_tokenizer
from actors.runner import ModelRunner
from actors.sampling import make_sampling_params
from cluster.defaults import default_drafter, default_target
from cluster.generate_command import summary_fields


def run_local(args: argparse.Namespace) -> tuple[str, list[int], str, dict]:
    """(text, token ids, finish reason, summary) of the completion."""
    params = make_sampling_params(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, max_tokens=args.max_tokens
    )
    target_path = args.target or default_target()
    tokenizer = load_tokenizer(target_path)
    prompt = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    if not prompt:
        raise InvalidRequest("prompt is empty: give some text to complete")
    target = ModelRunner.from_pretrained(target_path, args.dtype, args.device)
    drafter, exit_layer, drafter_name = _build_drafter(args, tokenizer, target.vocab_size)
    generator = SpeculativeGenerator(target, drafter, k=4 if args.k is None else args.k, exit_layer=exit_layer)
    result = generator.generate([prompt], params)[0]
    stats = result.stats
    summary = summary_fields(len(result.tokens), stats.target_forwards, stats.mean_accepted_length, stats.acceptance_rate,
                             generator.elapsed_s, drafter_name, exit_layer, generator.k)
    return tokenizer.decode(result.tokens), result.tokens, result.finish_reason, summary


def _build_drafter(args, target_tokenizer, target_vocab_size: int) -> tuple[Drafter | None, int | None, str]:
    """The drafter the options name; one of another vocabulary drafts across it (`actors.foreign_drafter`)."""
    if args.no_spec:
        return None, None, "none"
    if args.ngram:
        return NgramDrafter(), None, "ngram"
    path, exit_layer = parse_drafter_spec(args.drafter) if args.drafter else (default_drafter(), None)
    runner = ModelRunner.from_pretrained(path, args.dtype, args.device)
    drafter = pair_drafter(ModelDrafter(runner), target_tokenizer, load_tokenizer(path), target_vocab_size)
    return drafter, exit_layer or drafter.default_exit, str(path)


def parse_drafter_spec(spec: str) -> tuple[Path, int | None]:
    """'PATH' or 'PATH:EXIT' -> (path, exit layers or None)."""
    path, sep, exit_text = spec.rpartition(":")
    if not sep or not exit_text.isdigit():
        return Path(spec), None
    return Path(path), int(exit_text)
