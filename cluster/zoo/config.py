"""Typed settings of the model zoo, with a `smoke` preset (CPU, seconds) and a `full` preset."""

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import LlamaConfig, LlamaForCausalLM

EOS_TOKEN = "<|endoftext|>"
DRAFTER_NAME = "drafter"
FOREIGN_DRAFTER_NAME = "drafter-8k"  # the drafter with a vocabulary of its own (8,192 tokens)
TOKENIZER_DIR = "tokenizer"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelShape(_Strict):
    hidden_size: int = Field(description="Width of the residual stream.", gt=0)
    num_layers: int = Field(description="Number of Llama decoder layers.", gt=0)
    num_heads: int = Field(description="Attention heads; must divide hidden_size.", gt=0)
    num_kv_heads: int = Field(description="Key/value heads (grouped-query attention); must divide num_heads.", gt=0)
    intermediate_size: int = Field(description="Hidden width of the SwiGLU MLP.", gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelShape":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must divide hidden_size and num_kv_heads must divide num_heads")
        return self

    def llama_config(self, vocab_size: int, context: int, eos_id: int) -> LlamaConfig:
        """A Llama config with tied input/output embeddings (halves the size of small models)."""
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=context,
            tie_word_embeddings=True,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )


class TrainSettings(_Strict):
    steps: int = Field(description="Optimizer steps.", gt=0)
    batch_size: int = Field(description="Sequences per step (each `ZooConfig.context` tokens long).", gt=0)
    lr: float = Field(description="Peak AdamW learning rate.", gt=0)
    min_lr_ratio: float = Field(0.1, description="Final learning rate of the cosine schedule, as a fraction of lr.", ge=0, le=1)
    warmup_steps: int = Field(description="Linear warm-up steps before the cosine decay.", ge=0)
    weight_decay: float = Field(
        0.1, description="AdamW decoupled weight decay on matrices (not norms); the regulariser, as Llama has no dropout.", ge=0
    )
    grad_clip: float = Field(1.0, description="Clip the global gradient norm to this value.", gt=0)
    eval_every: int = Field(description="Steps between held-out (valid split) evaluations; the best checkpoint is kept.", gt=0)
    seed: int = Field(description="Seed for initialisation and batch order.")
    bf16_autocast: bool = Field(
        False,
        description="Run the training forward and backward under bfloat16 autocast (fp32 master weights and optimizer; "
        "valid losses stay fp32). About 2x the tokens per second on a CPU with AMX; slower on one without bf16 units.",
    )


class TargetSpec(_Strict):
    name: str = Field(description="Directory name of the target under the output directory, e.g. 'target-s'.")
    shape: ModelShape = Field(description="Architecture of the target.")
    train: TrainSettings = Field(description="How the target is trained.")


class DrafterSpec(_Strict):
    shape: ModelShape = Field(description="Architecture of the full drafter (its deepest exit).")
    exit_layers: list[int] = Field(
        description="Exits as layer counts L1 < L2 < ...; exit L = layers 0..L-1, then the shared final norm and lm_head. "
        "The last one must be num_layers.",
        min_length=3,
    )
    train: TrainSettings = Field(description="How the drafter is trained (SortedNet loss: mean over exits).")
    distill_from: str | None = Field(
        None, description="Name of a target to distil from (its logits as soft labels); None trains on data only."
    )
    distill_weight: float = Field(
        0.5, description="Weight of the KL(teacher || exit) term; the data cross-entropy gets 1 - distill_weight.", ge=0, le=1
    )
    continue_from: Path | None = Field(
        None,
        description="A trained drafter directory (same shape, exits and training seed) whose weights start this run "
        "instead of a random initialisation: a further stage with its own schedule, fresh optimizer, and the training "
        "windows that follow those the earlier stage consumed. None trains from scratch.",
    )

    @model_validator(mode="after")
    def _exits_nested(self) -> "DrafterSpec":
        exits = self.exit_layers
        if exits != sorted(set(exits)) or exits[0] < 1 or exits[-1] != self.shape.num_layers:
            raise ValueError(f"exit_layers must be strictly increasing, >= 1 and end at num_layers, got {exits}")
        return self


class CorpusSettings(_Strict):
    root: Path | None = Field(None, description="Directory of Python sources; None means this interpreter's standard library.")
    packages: list[str] = Field(
        default_factory=list,
        description="Installed distributions (pip names) whose Python files join the corpus, read from this "
        "interpreter's site-packages as it installed them; [] for the root directory only.",
    )
    valid_fraction: float = Field(description="Fraction of files held out to pick the best checkpoint.", gt=0, lt=0.5)
    test_fraction: float = Field(description="Fraction of files held out for `zoo eval` reports.", gt=0, lt=0.5)
    max_files: int | None = Field(None, description="Use only this many files (a fixed pseudo-random subset); None uses all.", gt=0)


class TokenizerSettings(_Strict):
    vocab_size: int = Field(description="Byte-level BPE vocabulary size, special token included (> 257).", gt=257)
    min_frequency: int = Field(2, description="Minimum pair count for a BPE merge.", ge=1)


class ForeignDrafterSpec(DrafterSpec):
    """A second sorted drafter with its own tokenizer: speculation across vocabularies (issue 20)."""

    name: str = Field(description="Directory name of the drafter; its exits are exported as '<name>-exit-L'.")
    tokenizer: TokenizerSettings = Field(description="Its own byte-level BPE vocabulary, trained on the same training split.")

    @model_validator(mode="after")
    def _no_teacher(self) -> "ForeignDrafterSpec":
        if self.distill_from is not None:
            raise ValueError("a drafter of another vocabulary cannot distil from a target: their logits index other tokens")
        return self


class ZooConfig(_Strict):
    preset: str = Field(description="Name of the preset this config came from, recorded in model cards.")
    out_dir: Path = Field(description="Where the tokenizer, models, manifest and reports are written.")
    corpus: CorpusSettings = Field(description="Which source files are used and how they are split.")
    tokenizer: TokenizerSettings = Field(description="The shared tokenizer.")
    tokenizer_from: Path | None = Field(
        None,
        description="Directory of an existing tokenizer to use instead of training one (keeps token ids, and so "
        "per-token perplexities, comparable with models trained before); None trains one on the training split.",
    )
    context: int = Field(description="Training sequence length in tokens (also max_position_embeddings).", gt=1)
    targets: list[TargetSpec] = Field(description="Targets in increasing size.", min_length=1)
    drafter: DrafterSpec = Field(description="The sorted multi-exit drafter.")
    foreign_drafter: ForeignDrafterSpec | None = Field(
        None, description="A sorted drafter with a vocabulary of its own (trained on data only); None: none."
    )
    save_dtype: Literal["float16", "bfloat16"] = Field("float16", description="dtype of the saved safetensors weights.")
    budget_mib: float = Field(64.0, description="Upper bound on all shipped weights together (MiB), checked before training.", gt=0)
    valid_tokens: int = Field(description="Tokens of the valid split scored at each evaluation during training.", gt=0)
    eval_tokens: int = Field(description="Tokens of the test split scored by `zoo eval`.", gt=0)
    eval_batch_size: int = Field(8, description="Sequences per forward pass when scoring held-out text.", gt=0)
    mal_k: int = Field(4, description="Draft length k of the expected mean accepted length reported by `zoo eval`.", gt=0)
    threads: int | None = Field(None, description="torch CPU threads; None keeps torch's default.", gt=0)

    @model_validator(mode="after")
    def _names_consistent(self) -> "ZooConfig":
        names = [t.name for t in self.targets] + ([self.foreign_drafter.name] if self.foreign_drafter else [])
        if len(set(names)) != len(names) or {DRAFTER_NAME, TOKENIZER_DIR} & set(names):
            raise ValueError(f"target names must be unique and not {DRAFTER_NAME!r}/{TOKENIZER_DIR!r}: {names}")
        if self.drafter.distill_from not in (None, *names):
            raise ValueError(f"distill_from {self.drafter.distill_from!r} is not a target")
        return self

    def exit_dir_name(self, exit_layer: int, drafter: str = DRAFTER_NAME) -> str:
        return f"{drafter}-exit-{exit_layer}"

    def foreign_tokenizer_dir(self) -> Path:
        """Where the foreign drafter's tokenizer is kept between runs (trained once, before the drafter)."""
        return self.out_dir / f"{self.foreign_drafter.name}-{TOKENIZER_DIR}"


def count_parameters(shape: ModelShape, vocab_size: int) -> int:
    """Parameters of a shape, counted on the meta device (no memory, tied embeddings counted once)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(shape.llama_config(vocab_size, context=2, eos_id=0))
    return sum(p.numel() for p in model.parameters())


def shipped_bytes(config: ZooConfig) -> dict[str, int]:
    """Bytes of weights each shipped model will hold: targets, the drafter and one export per exit."""
    vocab = config.tokenizer.vocab_size
    sizes = {t.name: count_parameters(t.shape, vocab) for t in config.targets}
    drafters = [(DRAFTER_NAME, config.drafter, vocab)]
    if config.foreign_drafter is not None:
        drafters.append((config.foreign_drafter.name, config.foreign_drafter, config.foreign_drafter.tokenizer.vocab_size))
    for name, spec, drafter_vocab in drafters:
        sizes[name] = count_parameters(spec.shape, drafter_vocab)
        for layers in spec.exit_layers:
            shape = spec.shape.model_copy(update={"num_layers": layers})
            sizes[config.exit_dir_name(layers, name)] = count_parameters(shape, drafter_vocab)
    return {name: params * 2 for name, params in sizes.items()}  # fp16 and bf16: 2 bytes


def check_budget(config: ZooConfig) -> int:
    """Total shipped bytes; raises if they exceed `budget_mib`."""
    total = sum(shipped_bytes(config).values())
    if total > config.budget_mib * 2**20:
        raise ValueError(f"shipped weights {total / 2**20:.1f} MiB exceed the {config.budget_mib} MiB budget")
    return total


def _shape(hidden: int, layers: int, heads: int, mlp: int) -> ModelShape:
    """A preset's model shape: multi-head attention (as many key/value heads as query heads)."""
    return ModelShape(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads, intermediate_size=mlp)


def _smoke(out_dir: Path) -> ZooConfig:
    def train(seed: int) -> TrainSettings:
        return TrainSettings(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=3, seed=seed)

    return ZooConfig(
        preset="smoke",
        out_dir=out_dir,
        corpus=CorpusSettings(valid_fraction=0.2, test_fraction=0.2, max_files=24),
        tokenizer=TokenizerSettings(vocab_size=400),
        context=64,
        targets=[
            TargetSpec(name="target-s", shape=_shape(32, 1, 2, 64), train=train(1)),
            TargetSpec(name="target-m", shape=_shape(32, 2, 2, 64), train=train(2)),
            TargetSpec(name="target-l", shape=_shape(48, 2, 2, 96), train=train(3)),
        ],
        drafter=DrafterSpec(shape=_shape(32, 3, 2, 64), exit_layers=[1, 2, 3], train=train(4), distill_from="target-l"),
        foreign_drafter=ForeignDrafterSpec(name="drafter-300", tokenizer=TokenizerSettings(vocab_size=300),
                                           shape=_shape(32, 3, 2, 64), exit_layers=[1, 2, 3], train=train(5)),
        valid_tokens=512,
        eval_tokens=1024,
        eval_batch_size=4,
        threads=1,
    )


# The project's own pinned dependencies (pyproject.toml); their installed Python files join the corpus.
PINNED_PACKAGES = [
    "torch", "transformers", "tokenizers", "safetensors", "pydantic", "pyyaml", "grpcio", "grpcio-health-checking",
    "grpcio-reflection", "protobuf", "ray", "prometheus-client",
]


def _zoo(
    preset_name: str, out_dir: Path, steps: dict[str, int], batch_size: int, threads: int | None, bf16_autocast: bool
) -> ZooConfig:
    """The zoo's models; presets differ only in how long they train.

    Deep, narrow targets beside a shallow drafter keep drafting cheap relative to
    verification: on this project's CPU one step of exit 1 costs about an eighth of a
    target-xl forward of five tokens. Head sizes are 32, 48 (target-l) and 64
    (target-xl), which vLLM's CPU attention supports (it rejects 16, 24 and 40). The
    tokenizer is the first zoo's, so per-token perplexities stay comparable.
    """

    def train(name: str, lr: float, seed: int) -> TrainSettings:
        return TrainSettings(steps=steps[name], batch_size=batch_size, lr=lr, warmup_steps=max(10, steps[name] // 20),
                             eval_every=max(10, steps[name] // 10), seed=seed, bf16_autocast=bf16_autocast)

    return ZooConfig(
        preset=preset_name,
        out_dir=out_dir,
        corpus=CorpusSettings(valid_fraction=0.025, test_fraction=0.025, packages=PINNED_PACKAGES),
        tokenizer=TokenizerSettings(vocab_size=4096),
        tokenizer_from=Path("models") / TOKENIZER_DIR,
        context=1024,
        targets=[
            TargetSpec(name="target-s", shape=_shape(96, 2, 3, 256), train=train("target-s", 3e-3, 1)),
            TargetSpec(name="target-m", shape=_shape(160, 4, 5, 432), train=train("target-m", 1.5e-3, 2)),
            TargetSpec(name="target-l", shape=_shape(192, 6, 4, 512), train=train("target-l", 1.2e-3, 3)),
            TargetSpec(name="target-xl", shape=_shape(320, 8, 5, 864), train=train("target-xl", 7.5e-4, 5)),
        ],
        drafter=DrafterSpec(shape=_shape(160, 4, 5, 432), exit_layers=[1, 2, 4], train=train(DRAFTER_NAME, 1.5e-3, 4),
                            distill_from="target-xl", distill_weight=0.8),
        foreign_drafter=ForeignDrafterSpec(name=FOREIGN_DRAFTER_NAME, tokenizer=TokenizerSettings(vocab_size=8192),
                                           shape=_shape(160, 4, 5, 432), exit_layers=[1, 2, 4],
                                           train=train(FOREIGN_DRAFTER_NAME, 1.5e-3, 6)),
        valid_tokens=32768,
        eval_tokens=131072,
        threads=threads,
    )


def _cpu(out_dir: Path) -> ZooConfig:
    """The zoo as trained on two CPU cores in about two and a half hours under bf16 autocast (3-8M tokens per model).

    The drafter trains as long as target-xl: distilled for 1,200 steps it agreed only 0.44 with
    it (bench/reports/zoo_v2_second_run.md).

    Small batches (2 x 1,024 tokens) and many steps: the first v2 run, 640 steps of 8 x 1,024,
    left target-xl far behind the first zoo's target-l per token seen. Peak learning rates fall
    with width: at this batch, target-m's shape after 300 steps reached valid loss 5.46 / 5.74 /
    6.01 at 1.5e-3 / 3e-3 / 6e-3, and at 3e-3 it trailed target-s all run long. target-m and
    target-l train 3,000 steps: at 1,500 they were no better than target-s
    (bench/reports/zoo_v2_third_run.md).
    """
    steps = {"target-s": 2000, "target-m": 3000, "target-l": 3000, "target-xl": 4000, DRAFTER_NAME: 4000,
             FOREIGN_DRAFTER_NAME: 2000}
    return _zoo("cpu", out_dir, steps, batch_size=2, threads=2, bf16_autocast=True)


def _full(out_dir: Path) -> ZooConfig:
    """A longer run for a GPU's budget (25-50M tokens per model; fp32 there, as autocast here is the CPU's)."""
    steps = {"target-s": 1500, "target-m": 1500, "target-l": 2000, "target-xl": 3200, DRAFTER_NAME: 2000,
             FOREIGN_DRAFTER_NAME: 2000}
    return _zoo("full", out_dir, steps, batch_size=16, threads=None, bf16_autocast=False)


PRESETS = {"smoke": _smoke, "cpu": _cpu, "full": _full}


def preset(name: str, out_dir: Path) -> ZooConfig:
    """The named preset writing to `out_dir`."""
    return PRESETS[name](out_dir)
