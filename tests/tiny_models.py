"""Tiny seeded checkpoints for tests (Llama, and one of every supported family): built in seconds, saved as real HF folders."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, Gemma2Config, GemmaConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          Phi3Config, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

TOKENIZER_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n",
]


# What a tokenizer of another vocabulary learns from: some lines shared with TOKENIZER_TEXT, some not, so that
# the two vocabularies overlap without either containing the other.
FOREIGN_TOKENIZER_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "while True:\n    total += step\n    if total > limit:\n        break\n",
    "print('hello, world')\nvalues = [x * x for x in range(100)]\n",
    "import os\nfrom pathlib import Path\n",
]


def build_tokenizer(folder: Path, vocab_size: int = 320, texts: list[str] = TOKENIZER_TEXT) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few lines of Python, saved in HF format."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def build_llama(
    folder: Path,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    max_context: int = 256,
    exit_layers: list[int] | None = None,
    init_scale: float = 0.25,
) -> Path:
    """A randomly initialised Llama saved with safetensors beside its tokenizer.

    `init_scale` is large on purpose: with the usual 0.02 a random model's logits
    are nearly flat and greedy choices hinge on rounding noise.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_context,
        initializer_range=init_scale,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if exit_layers:
        config.exit_layers = exit_layers
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _round_to_float16(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _round_to_float16(model: torch.nn.Module) -> None:
    """Weights float16 holds exactly, as in the zoo's float16 checkpoints (loaded as float32, they are packed:
    `actors.packed_linear`)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())


# Each family with the features that set it apart from Llama switched on (small windows so that prompts pass them).
FAMILY_CONFIGS = {
    "llama": (LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
    "qwen2": (Qwen2Config, {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    "qwen3": (Qwen3Config, {"head_dim": 24}),
    "mistral": (MistralConfig, {"sliding_window": 6}),
    "gemma": (GemmaConfig, {"head_dim": 24, "hidden_act": "gelu_pytorch_tanh"}),
    "gemma2": (Gemma2Config, {"head_dim": 24, "sliding_window": 6, "query_pre_attn_scalar": 20,
                              "attn_logit_softcapping": 4.0, "final_logit_softcapping": 8.0}),
    "phi3": (Phi3Config, {"partial_rotary_factor": 0.5, "sliding_window": 6}),
}


def build_family(folder: Path, tokenizer: PreTrainedTokenizerFast, family: str, seed: int, layers: int = 3,
                 exit_layers: list[int] | None = None, head_dim: int | None = None, **overrides) -> Path:
    """A randomly initialised model of `family` (its own transformers config class), saved beside its tokenizer.

    Heads are 16 wide (24 where the family sets head_dim apart from the width); `head_dim` widens them all
    (vLLM's CPU attention accepts 32 and more, not 16 or 24). `overrides` replace config fields.
    """
    config_class, extra = FAMILY_CONFIGS[family]
    extra = {**extra, **overrides}
    hidden = 4 * head_dim if head_dim else 64
    if head_dim and "head_dim" in extra:
        extra = {**extra, "head_dim": head_dim}
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.25,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=family.startswith("gemma"), **extra,
    )
    if exit_layers:
        config.exit_layers = exit_layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _round_to_float16(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
