"""Loading checkpoints from local paths, with errors a user can read.

Only local paths are accepted: specfleet never downloads weights at run time.
"""

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from actors.errors import IncompatibleModels, ModelNotFound

SUPPORTED_MODEL_TYPES = ("llama",)  # the runner's forward reproduces exactly these architectures
hf_logging.disable_progress_bar()  # a per-shard progress bar is noise in a server log

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def load_llama(path: str | Path, dtype: str = "float32", device: str = "cpu") -> LlamaForCausalLM:
    """Load a Llama-family causal LM from a local Hugging Face folder."""
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelNotFound(
            f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if dtype not in DTYPES:
        raise ModelNotFound(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    try:
        model = LlamaForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelNotFound(f"{path}: cannot load weights: {err}") from None
    return model.to(device)


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
