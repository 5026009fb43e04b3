"""Model cards (README.md) for every shipped model directory."""

import math

from transformers import LlamaForCausalLM

from cluster.zoo.checkpoint import parameter_count
from cluster.zoo.config import EOS_TOKEN, TrainSettings, ZooConfig
from cluster.zoo.corpus import Manifest
from cluster.zoo.train import TrainResult


def training_section(settings: TrainSettings, result: TrainResult, objective: str) -> str:
    epochs = result.tokens_seen / result.train_tokens
    return _earlier_stages(result) + (
        f"Objective: {objective}. AdamW (betas 0.9/0.95, weight decay {settings.weight_decay} on matrices), "
        f"peak lr {settings.lr} with {settings.warmup_steps} warm-up steps and cosine decay to {settings.min_lr_ratio} x, "
        f"gradient clipping {settings.grad_clip}, seed {settings.seed}"
        f"{'; forward and backward under bfloat16 autocast (fp32 weights and optimizer)' if settings.bf16_autocast else ''}.\n\n"
        f"{result.steps} steps of {settings.batch_size} sequences = {result.tokens_seen:,} tokens ({epochs:.2f} epochs). "
        f"Kept checkpoint: step {result.best_step}, valid loss {result.best_valid_loss:.4f} "
        f"(perplexity {math.exp(result.best_valid_loss):.2f}). Training took {result.seconds:.0f} s "
        f"({result.tokens_per_second:.0f} tokens/s)."
    )


def _earlier_stages(result: TrainResult) -> str:
    """A paragraph on the stages this run continued from ('' for a run from scratch)."""
    if result.earlier is None:
        return ""
    earlier = result.earlier
    return (
        f"Trained in stages. Before this stage's schedule: {earlier.total_tokens_seen():,} tokens over "
        f"{earlier.steps} steps (kept checkpoint valid loss {earlier.best_valid_loss:.4f}), from which these weights "
        f"started; this stage then saw the training windows that followed. In all {result.total_tokens_seen():,} tokens "
        f"({result.total_tokens_seen() / result.train_tokens:.2f} epochs).\n\nThis stage: "
    )


def model_card(name: str, role: str, model: LlamaForCausalLM, config: ZooConfig, manifest: Manifest, training: str) -> str:
    """The README.md of one model directory; `role` and `training` are markdown paragraphs."""
    c = model.config
    exits = getattr(c, "exit_layers", None)
    shape = f"{c.num_hidden_layers} / {c.hidden_size} / {c.num_attention_heads} / {c.num_key_value_heads} / {c.intermediate_size}"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [specfleet, llama, python, code-completion, speculative-decoding]
---
# specfleet `{name}`

{role}

| | |
|---|---|
| Architecture | `LlamaForCausalLM`, tied input/output embeddings |
| Parameters | {parameter_count(model):,} |
| Layers / hidden / heads / kv heads / MLP | {shape} |
| Exits (`config.exit_layers`) | {exits if exits else "none (ordinary model)"} |
| Vocabulary | {c.vocab_size}, byte-level BPE shared by the whole zoo, eos `{EOS_TOKEN}` |
| Context trained | {config.context} tokens |
| Weights | {config.save_dtype} safetensors |

## Data

{data_section(manifest)}

## Training

{training}

Reproduce with `specfleet zoo train --config zoo_config.json` (the exact settings, preset `{config.preset}`,
beside the model folders); measure with `specfleet zoo eval --out <zoo dir>`.

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("models/{name}")
model = AutoModelForCausalLM.from_pretrained("models/{name}")
```

## Limitations

A tiny model trained on a few code bases, for testing and benchmarking speculative decoding; it is not a
useful assistant.
"""


def data_section(manifest: Manifest) -> str:
    """What the model was trained on: the standard library, and the installed packages when the corpus has them."""
    train, valid, test = (manifest.split(s) for s in ("train", "valid", "test"))
    sources = f"Python source of the standard library of CPython {manifest.python.split()[0]}, tests included"
    licences = "The standard library is under the Python Software Foundation License"
    if manifest.packages:
        versions = ", ".join(f"{name} {version}" for name, version in sorted(manifest.packages.items()))
        from_packages = sum(f.source == "site-packages" for f in manifest.files)
        sources += f", and the installed Python files of {versions} ({from_packages} of the files)"
        licences += "; each package's files under the package's own licence (BSD, Apache-2.0 or MIT)"
    return (
        f"{sources}: {len(train)} files ({sum(f.bytes for f in train):,} bytes) for training; whole files held out: "
        f"{len(valid)} to keep the best checkpoint (valid) and {len(test)} for reports (test); files with identical "
        f"bytes kept once. Documents are separated by `{EOS_TOKEN}`. {licences}.\n"
        f"Corpus digest `{manifest.digest()}`; the file list with sha256 hashes is `corpus_manifest.json`\n"
        "beside the model folders."
    )
