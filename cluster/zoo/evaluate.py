"""`zoo eval`: held-out loss of every model and the acceptance matrix (drafter exit x target).

Everything is teacher-forced on windows of the test split (whole held-out files): at each position
the drafter exit's distribution q and the target's distribution p are compared directly.
"""

import math
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from transformers import LlamaForCausalLM

from cluster.zoo.checkpoint import WEIGHTS_FILE, load_model, parameter_count
from cluster.zoo.config import DRAFTER_NAME, TOKENIZER_DIR, ZooConfig
from cluster.zoo.corpus import corpus_root, load_manifest, read_split
from cluster.zoo.exits import exit_layers_of, exit_logits
from cluster.zoo.export import export_exit
from cluster.zoo.measured import Measured, measure
from cluster.zoo.pipeline import CONFIG_FILE, MANIFEST_FILE
from cluster.zoo.tokenizer import encode_documents, load_tokenizer
from cluster.zoo.train import heldout_windows, lm_loss

MAL_FORMULA = "MAL(k) = (1 - a^(k+1)) / (1 - a) = 1 + a + ... + a^k (k drafted tokens, bonus token counted; k + 1 when a = 1)"


class ModelStats(BaseModel):
    name: str = Field(description="Target name, or 'drafter-exit-L' for an exit of the drafter.")
    parameters: int = Field(description="Distinct parameters (tied embeddings once); for an exit, those it uses.")
    layers: int = Field(description="Decoder layers run.")
    loss: float = Field(description="Mean next-token cross-entropy on the test split, nats per token.")
    perplexity: float = Field(description="exp(loss).")


class PairStats(BaseModel):
    exit_layer: int = Field(description="Drafter exit (layers run).")
    target: str = Field(description="Target name.")
    greedy_agreement: float = Field(description="Fraction of positions where argmax q == argmax p.")
    alpha: float = Field(description="Mean over positions of sum_x min(p(x), q(x)) at temperature 1.")
    mal: float = Field(description="Expected mean accepted length at temperature 1: MAL(k) with a = alpha.")
    mal_greedy: float = Field(description="Expected mean accepted length under greedy decoding: MAL(k) with a = greedy_agreement.")


class EvalReport(BaseModel):
    test_files: int = Field(description="Held-out files in the test split.")
    tokens: int = Field(description="Positions scored per model.")
    context: int = Field(description="Window length in tokens.")
    k: int = Field(description="Draft length used for MAL.")
    mal_formula: str = Field(description="How MAL is computed from a per-position acceptance rate a.")
    models: list[ModelStats] = Field(description="Targets, then drafter exits.")
    matrix: list[PairStats] = Field(description="One entry per (drafter exit, target).")
    measured: Measured = Field(description="Greedy speculation with the largest target and step costs, in the runner.")
    untrained: list[str] = Field(default_factory=list, description="Targets of the config not trained yet, left out.")


def expected_accepted_length(rate: float, k: int) -> float:
    """Tokens produced per target pass with k drafted tokens, each accepted with probability `rate`
    independently, plus the target's bonus token (Leviathan et al. 2023)."""
    return float(k + 1) if rate >= 1.0 else (1 - rate ** (k + 1)) / (1 - rate)


def acceptance_sums(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> tuple[float, float]:
    """(number of positions with equal argmax, sum over positions of sum_x min(p, q)); both [B, T, V]."""
    agree = (draft_logits.argmax(-1) == target_logits.argmax(-1)).sum()  # positions
    q = torch.softmax(draft_logits.float(), dim=-1)  # [B, T, V]
    p = torch.softmax(target_logits.float(), dim=-1)  # [B, T, V]
    return float(agree), float(torch.minimum(p, q).sum())


@torch.no_grad()
def score(
    drafter: LlamaForCausalLM, targets: dict[str, LlamaForCausalLM], windows: torch.Tensor, batch_size: int
) -> tuple[dict[str | int, float], dict[tuple[int, str], list[float]]]:
    """Summed losses {target name or exit layer: nats} and acceptance sums {(exit, target): [agree, overlap]}
    over all positions of windows [W, T+1].
    """
    exits = exit_layers_of(drafter)
    losses: dict[str | int, float] = {}
    pairs: dict[tuple[int, str], list[float]] = {}
    for i in range(0, len(windows), batch_size):
        inputs, labels = windows[i : i + batch_size, :-1], windows[i : i + batch_size, 1:]  # [b, T] each
        positions = labels.numel()
        drafts = exit_logits(drafter, inputs, exits)  # {L: [b, T, V]}
        for layer, logits in drafts.items():
            losses[layer] = losses.get(layer, 0.0) + float(lm_loss(logits, labels)) * positions
        for name, target in targets.items():
            target_logits = target(inputs).logits  # [b, T, V]
            losses[name] = losses.get(name, 0.0) + float(lm_loss(target_logits, labels)) * positions
            for layer, logits in drafts.items():
                agree, overlap = acceptance_sums(logits, target_logits)
                total = pairs.setdefault((layer, name), [0.0, 0.0])
                total[0] += agree
                total[1] += overlap
    return losses, pairs


def evaluate_zoo(out_dir: Path, eval_tokens: int | None = None, manifest_path: Path | None = None,
                 context: int | None = None) -> EvalReport:
    """Score the zoo saved in out_dir on (up to eval_tokens of) a test split in windows of `context` tokens.

    By default the zoo's own test split and training context; another zoo's manifest and a
    shorter context compare two zoos on the same held-out files and windows.
    """
    config = ZooConfig.model_validate_json((out_dir / CONFIG_FILE).read_text())
    manifest = load_manifest(manifest_path or out_dir / MANIFEST_FILE)
    tokenizer = load_tokenizer(out_dir / TOKENIZER_DIR)
    # Files are read from this machine's corpus root and must match the recorded hashes.
    test_tokens = encode_documents(tokenizer, read_split(manifest, "test", corpus_root(config.corpus)))
    windows = heldout_windows(test_tokens, context or config.context, eval_tokens or config.eval_tokens)  # [W, T+1]
    drafter = load_model(out_dir / DRAFTER_NAME)
    untrained = [t.name for t in config.targets if not (out_dir / t.name / WEIGHTS_FILE).exists()]
    targets = {t.name: load_model(out_dir / t.name) for t in config.targets if t.name not in untrained}
    losses, pairs = score(drafter, targets, windows, config.eval_batch_size)
    count = windows[:, 1:].numel()
    models = [_stats(name, model, losses[name] / count) for name, model in targets.items()]
    for layer in exit_layers_of(drafter):
        models.append(_stats(config.exit_dir_name(layer), export_exit(drafter, layer), losses[layer] / count))
    matrix = [
        PairStats(
            exit_layer=layer,
            target=name,
            greedy_agreement=agree / count,
            alpha=overlap / count,
            mal=expected_accepted_length(overlap / count, config.mal_k),
            mal_greedy=expected_accepted_length(agree / count, config.mal_k),
        )
        for (layer, name), (agree, overlap) in pairs.items()
    ]
    paths = {name: out_dir / name for name in targets}
    measured = measure(out_dir / DRAFTER_NAME, paths, windows, config.mal_k)
    return EvalReport(
        test_files=len(manifest.split("test")),
        tokens=count,
        context=windows.shape[1] - 1,
        k=config.mal_k,
        mal_formula=MAL_FORMULA,
        models=models,
        matrix=matrix,
        measured=measured,
        untrained=untrained,
    )


def _stats(name: str, model: LlamaForCausalLM, loss: float) -> ModelStats:
    layers = model.config.num_hidden_layers
    return ModelStats(name=name, parameters=parameter_count(model), layers=layers, loss=loss, perplexity=math.exp(loss))


def to_markdown(report: EvalReport) -> str:
    """Tables for models/README.md: per-model held-out loss, then one exit x target table per metric."""
    lines = [
        f"Held-out test split: {report.test_files} whole files, {report.tokens:,} positions scored per model "
        f"(windows of {report.context} tokens, teacher-forced)."
        + (f" Not trained yet, so left out: {', '.join(report.untrained)}." if report.untrained else ""),
        "",
        "| model | parameters | layers | loss (nats/token) | perplexity |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {m.name} | {m.parameters:,} | {m.layers} | {m.loss:.4f} | {m.perplexity:.2f} |" for m in report.models]
    metrics = [
        ("greedy_agreement", "Greedy agreement (argmax exit == argmax target)"),
        ("alpha", "alpha = E[sum_x min(p(x), q(x))] at temperature 1"),
        ("mal", f"Expected mean accepted length, k = {report.k}, temperature 1 (a = alpha)"),
        ("mal_greedy", f"Expected mean accepted length, k = {report.k}, greedy (a = greedy agreement)"),
    ]
    for field, title in metrics:
        lines += ["", f"**{title}**", "", *_matrix_table(report, field)]
    lines += ["", f"{report.mal_formula}.", "", *_measured_tables(report.measured)]
    return "\n".join(lines) + "\n"


def _measured_tables(measured: Measured) -> list[str]:
    """Measured speculation (per-position acceptance, MAL) and step costs relative to the largest target."""
    k = measured.k
    lines = [
        f"**Measured greedy speculation with `{measured.target}`, k = {k}** ({measured.prompts} held-out prompts of "
        f"{measured.prompt_tokens} tokens, {measured.max_tokens} tokens each, in the engine; rounds cut short by "
        "max_tokens left out)",
        "",
        "| exit | rounds | " + " | ".join(f"a_{j}" for j in range(1, k + 1)) + " | MAL |",
        "|---|---:|" + "---:|" * (k + 1),
    ]
    lines += [f"| exit {a.exit_layer} | {a.rounds} | " + " | ".join(f"{r:.3f}" for r in a.per_position) + f" | {a.mal:.3f} |"
              for a in measured.acceptance]
    reference_ms = measured.cost(measured.target, k + 1)
    lines += [
        "",
        f"**One step in the runner** ({measured.compile_mode}, one row after {measured.prompt_tokens} cached tokens: "
        "the first prompt; "
        "median)",
        "",
        f"| model | new tokens | ms | / {measured.target} step |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {c.model} | {c.tokens} | {c.median_ms:.3f} | {c.median_ms / reference_ms:.3f} |"
              for c in measured.costs]
    exits = [a.exit_layer for a in measured.acceptance]
    lines += [
        "",
        f"**Forward-bound speedup over `{measured.target}` alone**: MAL(k) x T(1) / (T(k + 1) + k x d(exit)) from the "
        "two tables above (model steps only: the engine's own time per round is left out)",
        "",
        "| exit \\ k | " + " | ".join(str(j) for j in range(1, k + 1)) + " |",
        "|---|" + "---:|" * k,
    ]
    lines += [f"| exit {e} | " + " | ".join(f"{measured.forward_bound_speedup(e, j):.2f}" for j in range(1, k + 1)) + " |"
              for e in exits]
    return lines


def _matrix_table(report: EvalReport, field: str) -> list[str]:
    targets = list(dict.fromkeys(p.target for p in report.matrix))
    exits = sorted({p.exit_layer for p in report.matrix})
    cell = {(p.exit_layer, p.target): getattr(p, field) for p in report.matrix}
    rows = [f"| exit \\ target | {' | '.join(targets)} |", "|---|" + "---:|" * len(targets)]
    rows += [f"| exit {layer} | " + " | ".join(f"{cell[layer, t]:.3f}" for t in targets) + " |" for layer in exits]
    return rows
