"""Saving and loading zoo models as standalone Hugging Face folders (weights, tokenizer, card)."""

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

WEIGHTS_FILE = "model.safetensors"


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path, dtype: str, card: str) -> None:
    """Write safetensors weights in `dtype`, config, tokenizer and README.md into `path`.

    A copy is cast so the caller's model keeps training in float32.
    """
    path.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "README.md").write_text(card)


def load_model(path: Path) -> LlamaForCausalLM:
    """A saved model in float32 and eval mode (weights are stored as fp16/bf16)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def parameter_count(model: LlamaForCausalLM) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
