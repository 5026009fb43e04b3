import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from cluster.zoo.cards import data_section
from cluster.zoo.config import ForeignDrafterSpec, ModelShape, TrainSettings, ZooConfig, check_budget, preset, shipped_bytes
from cluster.zoo.corpus import FileEntry, Manifest
from cluster.zoo.exits import exit_logits
from cluster.zoo.pipeline import CONFIG_FILE, TRAINING_FILE, model_names, weight_bytes
from cluster.zoo.train import TrainResult, build_model, heldout_windows, lm_loss, lr_at, train_model, training_batches

from zoo_helpers import run_cli

SMOKE_DIRS = ["target-s", "target-m", "target-l", "drafter", "drafter-exit-1", "drafter-exit-2", "drafter-exit-3",
              "drafter-300", "drafter-300-exit-1", "drafter-300-exit-2", "drafter-300-exit-3"]


@pytest.mark.parametrize("name", ["cpu", "full"])
def test_presets_fit_the_weight_budget_with_a_small_drafter(tmp_path: Path, name: str) -> None:
    config = preset(name, tmp_path)
    sizes = shipped_bytes(config)
    assert check_budget(config) == sum(sizes.values()) <= 64 * 2**20
    targets = [sizes[t.name] for t in config.targets]
    assert targets == sorted(targets) and len(targets) == 4 and config.context == 1024
    assert sizes["drafter"] * 5 < targets[-1] and len(config.drafter.exit_layers) >= 3
    assert config.drafter.distill_from == config.targets[-1].name


def test_budget_is_enforced(tmp_path: Path) -> None:
    config = preset("full", tmp_path)
    with pytest.raises(ValueError, match="budget"):
        check_budget(config.model_copy(update={"budget_mib": 10.0}))


def test_training_batches_cover_each_epoch_with_disjoint_windows() -> None:
    tokens = torch.arange(101)
    batches = training_batches(tokens, context=10, batch_size=3, seed=0)
    epoch = torch.cat([next(batches) for _ in range(3)])  # 9 of the 9 or 10 windows of one epoch
    assert epoch.shape == (9, 11)
    assert torch.equal(epoch[:, 1:] - epoch[:, :-1], torch.ones(9, 10, dtype=torch.long))  # contiguous windows
    starts = sorted(epoch[:, 0].tolist())
    assert len({s % 10 for s in starts}) == 1 and all(b - a >= 10 for a, b in zip(starts, starts[1:]))


def test_heldout_windows_are_fixed_and_capped() -> None:
    windows = heldout_windows(torch.arange(50), context=8, max_tokens=24)
    assert windows.shape == (3, 9) and windows[:, 0].tolist() == [0, 20, 40] and windows[2, -1] == 48  # spread out
    assert heldout_windows(torch.arange(50), context=8, max_tokens=24).equal(windows)
    assert heldout_windows(torch.arange(25), context=8, max_tokens=24)[:, 0].tolist() == [0, 8, 16]  # back to back
    with pytest.raises(ValueError):
        heldout_windows(torch.arange(5), context=8, max_tokens=24)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    settings = TrainSettings(steps=100, batch_size=1, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, eval_every=10, seed=0)
    rates = [lr_at(step, settings) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert lr_at(100, settings) == pytest.approx(0.1)


def test_smoke_run_writes_every_model_within_budget(smoke_zoo: Path) -> None:
    config = ZooConfig.model_validate_json((smoke_zoo / CONFIG_FILE).read_text())
    sizes = weight_bytes(smoke_zoo)
    assert sorted(sizes) == sorted(SMOKE_DIRS)
    expected = shipped_bytes(config)
    for name, size in sizes.items():
        assert expected[name] <= size < expected[name] + 64 * 1024  # fp16 weights plus the safetensors header
    assert (smoke_zoo / "tokenizer" / "tokenizer.json").exists()
    assert json.loads((smoke_zoo / "corpus_manifest.json").read_text())["files"]


@pytest.mark.parametrize("name", SMOKE_DIRS)
def test_every_model_dir_loads_standalone_and_generates(smoke_zoo: Path, name: str) -> None:
    path = smoke_zoo / name
    with safe_open(path / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float16}
    assert "# specfleet" in (path / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert tokenizer.eos_token == "<|endoftext|>" and model.config.eos_token_id == tokenizer.eos_token_id
    prompt = tokenizer("def main():\n    ", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 5)
    assert isinstance(tokenizer.decode(out[0]), str)


def test_drafter_records_its_exits_and_exports_match_them(smoke_zoo: Path) -> None:
    drafter = AutoModelForCausalLM.from_pretrained(smoke_zoo / "drafter", dtype=torch.float32).eval()
    assert drafter.config.exit_layers == [1, 2, 3]
    ids = torch.randint(0, drafter.config.vocab_size, (2, 16))
    with torch.no_grad():
        exits = exit_logits(drafter, ids, [1, 2, 3])
        for layer in (1, 2, 3):
            exported = AutoModelForCausalLM.from_pretrained(smoke_zoo / f"drafter-exit-{layer}", dtype=torch.float32)
            assert exported.config.num_hidden_layers == layer
            torch.testing.assert_close(exported(ids).logits, exits[layer], rtol=0, atol=1e-5)


def test_training_learned_and_kept_the_best_checkpoint(smoke_zoo: Path) -> None:
    config = ZooConfig.model_validate_json((smoke_zoo / CONFIG_FILE).read_text())
    for name in model_names(config):
        result = TrainResult.model_validate_json((smoke_zoo / name / TRAINING_FILE).read_text())
        assert result.steps == 6 and [p.step for p in result.history] == [3, 6]
        assert result.best_valid_loss == min(p.valid_loss for p in result.history) < math.log(config.tokenizer.vocab_size)
        assert f"step {result.best_step}, valid loss {result.best_valid_loss:.4f}" in (smoke_zoo / name / "README.md").read_text()


def copy_zoo(zoo: Path, tmp_path: Path) -> Path:
    """A copy of `zoo` in tmp_path/zoo, with tmp_path/config.json: its config writing to the copy."""
    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy)
    config = json.loads((copy / CONFIG_FILE).read_text())
    config["out_dir"] = str(copy)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return copy


def test_retraining_one_model_reuses_the_tokenizer_and_is_reproducible(smoke_zoo: Path, tmp_path: Path) -> None:
    copy = copy_zoo(smoke_zoo, tmp_path)
    tokenizer_time = (copy / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    (copy / "target-s" / "model.safetensors").unlink()
    assert run_cli(["zoo", "train", "--config", str(tmp_path / "config.json"), "--models", "target-s"]) == 0
    assert (copy / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == tokenizer_time
    assert (copy / "target-s" / "model.safetensors").read_bytes() == (smoke_zoo / "target-s" / "model.safetensors").read_bytes()


def test_unknown_model_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        run_cli(["zoo", "train", "--preset", "smoke", "--out", str(tmp_path), "--models", "target-xl"])


def test_drafter_needs_its_teacher_trained_first(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train it first"):
        run_cli(["zoo", "train", "--preset", "smoke", "--out", str(tmp_path), "--models", "drafter"])


def test_a_stopped_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    settings = TrainSettings(steps=6, batch_size=2, lr=3e-3, warmup_steps=1, eval_every=3, seed=0)
    shape = ModelShape(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=32)
    tokens = torch.randint(0, 50, (400,), generator=torch.Generator().manual_seed(0))  # [N]
    valid = heldout_windows(tokens[:100], 16, 64)  # [W, 17]

    def run(state_path: Path | None, stop_at: int | None = None) -> tuple[LlamaForCausalLM, TrainResult]:
        model = build_model(shape, 50, 16, 0, seed=1)
        calls = 0

        def loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += model.training
            if calls == stop_at:
                raise KeyboardInterrupt  # the process is stopped mid-run
            return lm_loss(model(inputs).logits, targets)

        return model, train_model(model, loss, loss, tokens, valid, settings, 16, 4, lambda _: None, state_path)

    straight, straight_result = run(None)
    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        run(state, stop_at=5)  # after the evaluation at step 3
    resumed, resumed_result = run(state)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert [p.valid_loss for p in resumed_result.history] == pytest.approx([p.valid_loss for p in straight_result.history])
    def never(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a state written with other settings was resumed")

    with pytest.raises(ValueError, match="other training settings"):
        train_model(build_model(shape, 50, 16, 0, seed=1), never, never, tokens, valid,
                    settings.model_copy(update={"lr": 1e-3}), 16, 4, lambda _: None, state)


def test_a_rerun_skips_finished_models_without_loading_anything_of_them(smoke_zoo: Path, tmp_path: Path) -> None:
    copy = copy_zoo(smoke_zoo, tmp_path)
    shutil.rmtree(copy / "target-l")  # the drafter's teacher: a finished drafter must not need it
    weights = (copy / "drafter" / "model.safetensors").stat().st_mtime_ns
    assert run_cli(["zoo", "train", "--config", str(tmp_path / "config.json"), "--models", "drafter"]) == 0
    assert (copy / "drafter" / "model.safetensors").stat().st_mtime_ns == weights


def test_bf16_autocast_computes_the_training_loss_in_bf16_keeps_fp32_weights_and_learns() -> None:
    settings = TrainSettings(steps=30, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=10, seed=0, bf16_autocast=True)
    shape = ModelShape(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    tokens = torch.arange(2000) % 7  # [N]: a cycle a model learns in a few steps
    valid = heldout_windows(tokens[:200], 16, 64)  # [W, 17]
    model = build_model(shape, 50, 16, 0, seed=1)
    dtypes = set()

    def loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(inputs).logits
        dtypes.add((model.training, logits.dtype))
        return lm_loss(logits, targets)

    result = train_model(model, loss, loss, tokens, valid, settings, 16, 4, lambda _: None)
    assert dtypes == {(True, torch.bfloat16), (False, torch.float32)}  # training under autocast, valid loss in fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.history[-1].valid_loss < 0.5 * result.history[0].valid_loss


def test_rendering_the_cards_again_reproduces_those_written_at_training(smoke_zoo: Path, tmp_path: Path) -> None:
    zoo = copy_zoo(smoke_zoo, tmp_path)
    cards = {p.parent.name: p.read_text() for p in zoo.glob("*/README.md")}
    for card in zoo.glob("*/README.md"):
        card.write_text("stale")
    assert run_cli(["zoo", "cards", "--out", str(zoo)]) == 0
    assert {p.parent.name: p.read_text() for p in zoo.glob("*/README.md")} == cards
    assert set(cards) == set(model_names(ZooConfig.model_validate_json((zoo / CONFIG_FILE).read_text()))) | {
        p.parent.name for p in zoo.glob("drafter*-exit-*/model.safetensors")}


def test_a_card_names_the_packages_its_corpus_holds_and_their_licences() -> None:
    files = [FileEntry(path="os.py", sha256="a", bytes=10, split="train"),
             FileEntry(path="torch/nn.py", source="site-packages", sha256="b", bytes=20, split="train"),
             FileEntry(path="ray/x.py", source="site-packages", sha256="c", bytes=5, split="test")]
    with_packages = Manifest(root="/usr/lib/python3.11", python="3.11.7 (main)", packages={"torch": "2.13.0", "ray": "2.55.0"},
                             files=files)
    text = data_section(with_packages)
    assert "ray 2.55.0, torch 2.13.0 (2 of the files)" in text and "2 files (30 bytes) for training" in text
    assert "package's own licence" in text
    assert "package" not in data_section(with_packages.model_copy(update={"packages": {}, "files": files[:1]}))


def test_a_drafter_stage_continues_from_trained_weights_on_fresh_windows(smoke_zoo: Path, tmp_path: Path) -> None:
    copy = copy_zoo(smoke_zoo, tmp_path)
    shutil.rmtree(copy / "drafter")
    config = json.loads((tmp_path / "config.json").read_text())
    config["drafter"]["continue_from"] = str(smoke_zoo / "drafter")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert run_cli(["zoo", "train", "--config", str(tmp_path / "config.json"), "--models", "drafter"]) == 0

    first = TrainResult.model_validate_json((smoke_zoo / "drafter" / TRAINING_FILE).read_text())
    second = TrainResult.model_validate_json((copy / "drafter" / TRAINING_FILE).read_text())
    assert second.earlier == first and second.total_tokens_seen() == 2 * first.tokens_seen
    # started from the trained weights, not from a random initialisation (whose loss is about log V)
    assert second.history[0].valid_loss < first.history[0].valid_loss
    assert f"In all {second.total_tokens_seen():,} tokens" in (copy / "drafter" / "README.md").read_text()


def test_a_continued_stage_skips_the_windows_the_earlier_one_consumed() -> None:
    settings = TrainSettings(steps=2, batch_size=2, lr=1e-3, warmup_steps=1, eval_every=2, seed=0)
    shape = ModelShape(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=32)
    tokens = torch.arange(400) % 50  # [N]
    valid = heldout_windows(tokens[:100], 16, 64)  # [W, 17]
    seen: list[torch.Tensor] = []
    model = build_model(shape, 50, 16, 0, seed=1)

    def loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if model.training:
            seen.append(inputs[:, 0])
        return lm_loss(model(inputs).logits, targets)

    first = train_model(model, loss, loss, tokens, valid, settings, 16, 4, lambda _: None)
    train_model(model, loss, loss, tokens, valid, settings, 16, 4, lambda _: None, earlier=first)
    batches = training_batches(tokens, 16, 2, 0)
    expected = [next(batches)[:, 0] for _ in range(4)]  # one uninterrupted run of four steps
    assert all(torch.equal(a, b) for a, b in zip(seen, expected)) and len(seen) == 4


def test_the_foreign_drafter_reads_a_vocabulary_of_its_own(smoke_zoo: Path) -> None:
    config = ZooConfig.model_validate_json((smoke_zoo / CONFIG_FILE).read_text())
    foreign = config.foreign_drafter
    tokenizer, shared = AutoTokenizer.from_pretrained(smoke_zoo / foreign.name), AutoTokenizer.from_pretrained(smoke_zoo / "tokenizer")
    assert len(tokenizer) == foreign.tokenizer.vocab_size != len(shared)
    assert tokenizer.get_vocab() != shared.get_vocab() and tokenizer.decode(tokenizer.encode("def f(x):")) == "def f(x):"
    drafter = AutoModelForCausalLM.from_pretrained(smoke_zoo / foreign.name)
    assert drafter.config.vocab_size == foreign.tokenizer.vocab_size and drafter.config.exit_layers == foreign.exit_layers
    assert "on data only" in (smoke_zoo / foreign.name / "README.md").read_text()


def test_a_foreign_drafter_cannot_distil_from_a_target(tmp_path: Path) -> None:
    spec = preset("smoke", tmp_path).foreign_drafter
    with pytest.raises(ValueError, match="cannot distil"):
        ForeignDrafterSpec.model_validate({**spec.model_dump(), "distill_from": "target-l"})
