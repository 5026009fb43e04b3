"""Loading checkpoints from local paths, with errors a user can read.

Only local paths are accepted: specfleet never downloads weights at run time.
"""

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from actors.errors import IncompatibleModels, ModelNotFound
from actors.families import LENGTH_DEPENDENT_ROPE, SUPPORTED_MODEL_TYPES  # what the runner's forward reproduces
hf_logging.disable_progress_bar()  # a per-shard progress bar is noise in a server log

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def load_causal_lm(path: str | Path, dtype: str = "float32", device: str = "cpu") -> nn.Module:
    """Load a causal LM of a supported family (`actors.families`) from a local Hugging Face folder."""
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelNotFound(
            f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    rope_type = rope_type_of(config)
    if rope_type in LENGTH_DEPENDENT_ROPE:
        raise ModelNotFound(f"{path}: rope type {rope_type!r} is not supported: its rotation depends on the sequence's "
                            "length, and the runner rotates by position alone")
    if dtype not in DTYPES:
        raise ModelNotFound(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelNotFound(f"{path}: cannot load weights: {err}") from None
    return model.to(device)


def rope_type_of(config: dict) -> str:
    """The checkpoint's RoPE variant ("default" when it names none)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope.get("rope_type") or rope.get("type") or "default"


def read_config(path: str | Path) -> dict:
    """The checkpoint's config.json, or `ModelNotFound` saying what is missing."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelNotFound(f"model path {str(path)!r} is not a directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelNotFound(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelNotFound(f"{config_file}: not valid JSON ({err})") from None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a checkpoint."""
    read_config(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelNotFound(f"{path}: cannot load its tokenizer: {err}") from None


def check_same_vocabulary(target: PreTrainedTokenizerBase, drafter: PreTrainedTokenizerBase) -> None:
    """Speculation compares token ids, so both models must read ids the same way."""
    if target.get_vocab() != drafter.get_vocab():
        raise IncompatibleModels(
            f"drafter and target tokenizers differ ({len(drafter)} vs {len(target)} tokens): "
            "a drafter must share the target's vocabulary"
        )
