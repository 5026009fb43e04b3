"""`zoo train`: corpus manifest -> tokenizer -> targets -> sorted drafter -> exported exits.

Every step writes into `config.out_dir`, and a later run reuses the manifest and tokenizer found
there, so models can be trained in separate runs (`only=[...]`) and still share one tokenizer.
A rerun skips models whose training finished and resumes one that was stopped (`STATE_FILE`).
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from cluster.zoo.cards import model_card, training_section
from cluster.zoo.checkpoint import WEIGHTS_FILE, load_model, save_checkpoint
from cluster.zoo.config import DRAFTER_NAME, TOKENIZER_DIR, TargetSpec, TrainSettings, ZooConfig, check_budget
from cluster.zoo.corpus import Manifest, build_manifest, load_manifest, read_split, save_manifest
from cluster.zoo.export import export_exit
from cluster.zoo.tokenizer import encode_documents, load_tokenizer, train_tokenizer
from cluster.zoo.train import LossFn, TrainResult, build_model, heldout_windows, lm_loss, sorted_loss, train_model

log = logging.getLogger(__name__)

CONFIG_FILE = "zoo_config.json"
MANIFEST_FILE = "corpus_manifest.json"
TRAINING_FILE = "training.json"
STATE_FILE = "train_state.pt"  # weights + optimizer of an unfinished run; removed when it finishes


@dataclass
class _Data:
    """What every model of one run trains on."""

    manifest: Manifest
    tokenizer: PreTrainedTokenizerFast
    train_tokens: torch.Tensor  # [N]
    valid_windows: torch.Tensor  # [W, context + 1]


def model_names(config: ZooConfig) -> list[str]:
    foreign = [config.foreign_drafter.name] if config.foreign_drafter is not None else []
    return [t.name for t in config.targets] + [DRAFTER_NAME] + foreign


def train_zoo(config: ZooConfig, only: list[str] | None = None) -> dict[str, int]:
    """Train the selected models (default: all); returns the weight bytes of every model directory."""
    unknown = set(only or []) - set(model_names(config))
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; choose from {model_names(config)}")
    check_budget(config)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / CONFIG_FILE).write_text(config.model_dump_json(indent=1))
    with torch_threads(config.threads):
        data = _prepare_data(config)
        for target in config.targets:
            if _to_train(config, target.name, target.train, only):
                _train_target(config, target, data)
        if _to_train(config, DRAFTER_NAME, config.drafter.train, only):
            _train_drafter(config, data)
        if only is None or DRAFTER_NAME in only:
            _export_exits(config, data, DRAFTER_NAME, config.drafter.exit_layers)
        foreign = config.foreign_drafter
        if foreign is not None and (only is None or foreign.name in only):
            foreign_data = _foreign_data(config, data.manifest)
            if _to_train(config, foreign.name, foreign.train, only):
                _train_foreign_drafter(config, foreign_data)
            _export_exits(config, foreign_data, foreign.name, foreign.exit_layers)
    return weight_bytes(config.out_dir)


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Use `count` torch threads inside the block (None: leave as is), then restore the previous count."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _prepare_data(config: ZooConfig) -> _Data:
    manifest = _prepare_manifest(config)
    train_texts = read_split(manifest, "train")
    tokenizer_dir = config.out_dir / TOKENIZER_DIR
    if (tokenizer_dir / "tokenizer.json").exists():
        log.info("reusing the tokenizer in %s", tokenizer_dir)
        tokenizer = load_tokenizer(tokenizer_dir)
    elif config.tokenizer_from is not None:
        log.info("copying the tokenizer in %s", config.tokenizer_from)
        tokenizer = load_tokenizer(config.tokenizer_from)
        tokenizer.save_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(train_texts, config.tokenizer)
        tokenizer.save_pretrained(tokenizer_dir)
    train_tokens = encode_documents(tokenizer, train_texts)
    valid_tokens = encode_documents(tokenizer, read_split(manifest, "valid"))
    log.info("corpus: %d training tokens, %d valid tokens", len(train_tokens), len(valid_tokens))
    return _Data(manifest, tokenizer, train_tokens, heldout_windows(valid_tokens, config.context, config.valid_tokens))


def _prepare_manifest(config: ZooConfig) -> Manifest:
    """Build the manifest; refuse to mix it with models built on another corpus in the same directory."""
    manifest = build_manifest(config.corpus)
    path = config.out_dir / MANIFEST_FILE
    if path.exists() and load_manifest(path).digest() != manifest.digest():
        raise ValueError(f"{path} describes another corpus; train into a fresh directory")
    save_manifest(manifest, path)
    return manifest


def _train_target(config: ZooConfig, spec: TargetSpec, data: _Data) -> TrainResult:
    model = build_model(spec.shape, config.tokenizer.vocab_size, config.context, data.tokenizer.eos_token_id, spec.train.seed)

    def loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(model(inputs).logits, targets)

    return _fit(config, data, spec.name, model, _target_role(config, spec.name), TARGET_OBJECTIVE, spec.train, loss, loss)


def _train_drafter(config: ZooConfig, data: _Data) -> TrainResult:
    spec = config.drafter
    exits = spec.exit_layers
    model = build_model(spec.shape, config.tokenizer.vocab_size, config.context, data.tokenizer.eos_token_id, spec.train.seed)
    model.config.exit_layers = exits
    earlier = _continue_from(model, spec.continue_from) if spec.continue_from is not None else None
    teacher = _teacher(config.out_dir, spec.distill_from)

    def train_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(inputs).logits if teacher is not None else None  # [B, T, V]
        return sorted_loss(model, inputs, targets, exits, teacher_logits, spec.distill_weight)[0]

    def valid_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sorted_loss(model, inputs, targets, exits)[0]

    return _fit(config, data, DRAFTER_NAME, model, _drafter_role(config), _drafter_objective(config), spec.train,
                train_loss, valid_loss, earlier)


def _continue_from(model: LlamaForCausalLM, path: Path) -> TrainResult:
    """Load the trained drafter in `path` into `model` (same shape and exits); return its training record."""
    trained = load_model(path)
    if getattr(trained.config, "exit_layers", None) != model.config.exit_layers:
        raise ValueError(f"{path} has exits {getattr(trained.config, 'exit_layers', None)}, not {model.config.exit_layers}")
    model.load_state_dict(trained.state_dict())  # raises on another shape
    return TrainResult.model_validate_json((path / TRAINING_FILE).read_text())


def _foreign_data(config: ZooConfig, manifest: Manifest) -> _Data:
    """The same splits encoded with the foreign drafter's own tokenizer (trained at the first run, then reused)."""
    tokenizer_dir = config.foreign_tokenizer_dir()
    train_texts = read_split(manifest, "train")
    if (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(train_texts, config.foreign_drafter.tokenizer)
        tokenizer.save_pretrained(tokenizer_dir)
    train_tokens = encode_documents(tokenizer, train_texts)
    valid_tokens = encode_documents(tokenizer, read_split(manifest, "valid"))
    log.info("foreign vocabulary: %d training tokens, %d valid tokens", len(train_tokens), len(valid_tokens))
    return _Data(manifest, tokenizer, train_tokens, heldout_windows(valid_tokens, config.context, config.valid_tokens))


def _train_foreign_drafter(config: ZooConfig, data: _Data) -> TrainResult:
    """The SortedNet loss on data only: no target shares its token ids to distil from."""
    spec = config.foreign_drafter
    model = build_model(spec.shape, spec.tokenizer.vocab_size, config.context, data.tokenizer.eos_token_id, spec.train.seed)
    model.config.exit_layers = spec.exit_layers
    earlier = _continue_from(model, spec.continue_from) if spec.continue_from is not None else None

    def loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sorted_loss(model, inputs, targets, spec.exit_layers)[0]

    return _fit(config, data, spec.name, model, _foreign_drafter_role(config), _foreign_drafter_objective(config),
                spec.train, loss, loss, earlier)


def _teacher(out_dir: Path, name: str | None) -> LlamaForCausalLM | None:
    if name is None:
        return None
    if not (out_dir / name / WEIGHTS_FILE).exists():
        raise ValueError(f"the drafter distils from {name}: train it first (--models {name})")
    return load_model(out_dir / name)


def _fit(
    config: ZooConfig,
    data: _Data,
    name: str,
    model: LlamaForCausalLM,
    role: str,
    objective: str,
    settings: TrainSettings,
    train_loss: LossFn,
    valid_loss: LossFn,
    earlier: TrainResult | None = None,
) -> TrainResult:
    """Train, saving each new best checkpoint; finally record the whole run in the card and training.json."""
    path = config.out_dir / name

    def card(result: TrainResult) -> str:
        return model_card(name, role, model, config, data.manifest, training_section(settings, result, objective))

    def save(result: TrainResult) -> None:
        save_checkpoint(model, data.tokenizer, path, config.save_dtype, card(result))

    log.info("training %s", name)
    path.mkdir(parents=True, exist_ok=True)
    result = train_model(
        model, train_loss, valid_loss, data.train_tokens, data.valid_windows, settings, config.context,
        config.eval_batch_size, save, path / STATE_FILE, earlier,
    )
    (path / "README.md").write_text(card(result))
    (path / TRAINING_FILE).write_text(result.model_dump_json(indent=1))
    (path / STATE_FILE).unlink(missing_ok=True)
    return result


def _to_train(config: ZooConfig, name: str, settings: TrainSettings, only: list[str] | None) -> bool:
    """Selected, and not trained to the end already: a model whose weights exist and whose training.json
    records every step of `settings` is skipped before anything of it (a drafter's teacher) is loaded."""
    if only is not None and name not in only:
        return False
    path = config.out_dir / name
    record = path / TRAINING_FILE
    finished = record.exists() and (path / WEIGHTS_FILE).exists() and \
        TrainResult.model_validate_json(record.read_text()).steps == settings.steps
    if finished:
        log.info("%s is already trained (%s); skipping it", name, record)
    return not finished


def _export_exits(config: ZooConfig, data: _Data, drafter_name: str, exit_layers: list[int]) -> None:
    drafter = load_model(config.out_dir / drafter_name)
    for layer in exit_layers:
        name = config.exit_dir_name(layer, drafter_name)
        model = export_exit(drafter, layer)
        card = model_card(name, _exit_role(layer, drafter_name), model, config, data.manifest, _exit_training(drafter_name))
        save_checkpoint(model, data.tokenizer, config.out_dir / name, config.save_dtype, card)


def write_cards(config: ZooConfig) -> list[str]:
    """Render the README.md of every finished model in `config.out_dir` again, from its training.json.

    For a card template that changed after training: the weights are only read.
    """
    manifest = load_manifest(config.out_dir / MANIFEST_FILE)
    written = []
    trained = [(t.name, t.train, _target_role(config, t.name), TARGET_OBJECTIVE) for t in config.targets]
    trained.append((DRAFTER_NAME, config.drafter.train, _drafter_role(config), _drafter_objective(config)))
    drafters = [(DRAFTER_NAME, config.drafter.exit_layers)]
    if config.foreign_drafter is not None:
        foreign = config.foreign_drafter
        trained.append((foreign.name, foreign.train, _foreign_drafter_role(config), _foreign_drafter_objective(config)))
        drafters.append((foreign.name, foreign.exit_layers))
    for name, settings, role, objective in trained:
        record = config.out_dir / name / TRAINING_FILE
        if record.exists():
            training = training_section(settings, TrainResult.model_validate_json(record.read_text()), objective)
            _rewrite_card(config, manifest, name, role, training)
            written.append(name)
    for drafter_name, exit_layers in drafters:
        for layer in exit_layers:
            name = config.exit_dir_name(layer, drafter_name)
            if (config.out_dir / name / WEIGHTS_FILE).exists():
                _rewrite_card(config, manifest, name, _exit_role(layer, drafter_name), _exit_training(drafter_name))
                written.append(name)
    return written


def _rewrite_card(config: ZooConfig, manifest: Manifest, name: str, role: str, training: str) -> None:
    model = load_model(config.out_dir / name)
    (config.out_dir / name / "README.md").write_text(model_card(name, role, model, config, manifest, training))


TARGET_OBJECTIVE = "next-token cross-entropy"


def _exit_training(drafter_name: str) -> str:
    return f"Not trained separately; see `../{drafter_name}/README.md`."


def _target_role(config: ZooConfig, name: str) -> str:
    rank = [t.name for t in config.targets].index(name) + 1
    return (
        f"Target {rank} of {len(config.targets)} of the specfleet zoo (targets grow in size in that order): "
        "a causal LM that speculative decoding verifies drafts against. All zoo models share one tokenizer."
    )


def _drafter_role(config: ZooConfig) -> str:
    return (
        f"The sorted (S2D) multi-exit drafter of the specfleet zoo. Exit L runs embeddings -> decoder layers 0..L-1 -> "
        f"the shared final norm `model.norm` -> `lm_head`; the exits are `config.exit_layers` = {config.drafter.exit_layers}. "
        f"Loaded as-is it is its deepest exit; every exit is also exported as a standalone model in `{DRAFTER_NAME}-exit-L`."
    )


def _drafter_objective(config: ZooConfig) -> str:
    spec = config.drafter
    objective = f"SortedNet (S2D): the mean over exits {spec.exit_layers} of each exit's next-token cross-entropy"
    if spec.distill_from is not None:
        weight = spec.distill_weight
        objective += f", each mixed as {1 - weight:g} x CE + {weight:g} x KL(teacher || exit) with teacher `{spec.distill_from}`"
    return objective + " (the valid loss is the mean exit cross-entropy)"


def _foreign_drafter_role(config: ZooConfig) -> str:
    spec = config.foreign_drafter
    return (
        f"A second sorted (S2D) multi-exit drafter of the specfleet zoo, with a byte-level BPE vocabulary of its own "
        f"({spec.tokenizer.vocab_size} tokens; the targets have {config.tokenizer.vocab_size}), trained on the same "
        f"files: specfleet drafts with it for the zoo's targets across vocabularies (docs/ARCHITECTURE.md). Exits "
        f"`config.exit_layers` = {spec.exit_layers}, each also exported as a standalone model in `{spec.name}-exit-L`."
    )


def _foreign_drafter_objective(config: ZooConfig) -> str:
    return (f"SortedNet (S2D): the mean over exits {config.foreign_drafter.exit_layers} of each exit's next-token "
            "cross-entropy, on data only (no target reads its token ids, so none can be distilled from)")


def _exit_role(layer: int, drafter_name: str) -> str:
    return (
        f"Exit {layer} of the sorted drafter `{drafter_name}`, exported as an ordinary Llama: the drafter's first "
        f"{layer} decoder layers, its final norm, embeddings and lm_head, copied unchanged, so its logits equal "
        f"the drafter's exit {layer}."
    )


def weight_bytes(out_dir: Path) -> dict[str, int]:
    """Size of the safetensors weights of every model directory under out_dir."""
    return {p.parent.name: p.stat().st_size for p in sorted(out_dir.glob(f"*/{WEIGHTS_FILE}"))}
