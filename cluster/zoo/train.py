"""Training loops: next-token loss for targets, the SortedNet loss of S2D for the drafter.

Batches are non-overlapping windows of the token stream, reshuffled each epoch with a fresh
offset, so every epoch sees the whole training split. The checkpoint with the best loss on
the valid split is handed to `on_best` (weight decay + best-checkpoint selection are the
regularisers: Llama has no dropout). A run that is stopped resumes from its last evaluation
(`state_path`: weights, optimizer, history), with the same batches and schedule as an
uninterrupted run.
"""

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from transformers import LlamaForCausalLM

from cluster.zoo.config import ModelShape, TrainSettings
from cluster.zoo.exits import exit_logits

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs [B, T], targets [B, T]) -> scalar


class EvalPoint(BaseModel):
    step: int = Field(description="Optimizer steps done.")
    train_loss: float = Field(description="Mean training loss since the previous evaluation.")
    valid_loss: float = Field(description="Loss on the valid split.")


class TrainResult(BaseModel):
    steps: int = Field(description="Optimizer steps done.")
    tokens_seen: int = Field(description="Training tokens consumed (steps x batch x context).")
    train_tokens: int = Field(description="Tokens in the training split (one epoch).")
    best_step: int = Field(description="Step of the kept checkpoint.")
    best_valid_loss: float = Field(description="Valid-split loss of the kept checkpoint.")
    seconds: float = Field(description="Wall time of the loop, evaluations included.")
    tokens_per_second: float = Field(description="Training tokens per second of wall time.")
    history: list[EvalPoint] = Field(description="Every evaluation, in order.")
    earlier: "TrainResult | None" = Field(None, description="The record of the stage whose weights this run started from.")

    def total_tokens_seen(self) -> int:
        """Training tokens over this stage and every earlier one."""
        return self.tokens_seen + (self.earlier.total_tokens_seen() if self.earlier else 0)


def build_model(shape: ModelShape, vocab_size: int, context: int, eos_id: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(shape.llama_config(vocab_size, context, eos_id))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits [B, T, V], targets [B, T] already shifted."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, averaged; both [B, T, V]."""
    student = F.log_softmax(logits.flatten(0, 1).float(), dim=-1)  # [B*T, V]
    teacher = F.log_softmax(teacher_logits.flatten(0, 1).float(), dim=-1)  # [B*T, V]
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def sorted_loss(
    model: LlamaForCausalLM,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    exit_layers: list[int],
    teacher_logits: torch.Tensor | None = None,
    distill_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """SortedNet objective of S2D: the mean over exits of each exit's loss.

    Each exit's loss is its next-token cross-entropy, mixed with KL to the teacher when given:
    (1 - w) * CE + w * KL. Returns (mean loss, {exit: loss}).
    """
    per_exit = {}
    for layer, logits in exit_logits(model, inputs, exit_layers).items():
        loss = lm_loss(logits, targets)
        if teacher_logits is not None:
            loss = (1 - distill_weight) * loss + distill_weight * distill_loss(logits, teacher_logits)
        per_exit[layer] = loss
    return torch.stack(list(per_exit.values())).mean(), per_exit


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    floor = settings.lr * settings.min_lr_ratio
    return floor + (settings.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def training_batches(tokens: torch.Tensor, context: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches LongTensor[B, context + 1] of windows of `tokens` (LongTensor[N]).

    Each epoch takes a random offset, cuts non-overlapping windows from there and shuffles them.
    """
    generator = torch.Generator().manual_seed(seed)
    span = torch.arange(context + 1)  # [T+1]
    if (len(tokens) - context) // context < batch_size:
        raise ValueError(f"{len(tokens)} training tokens cannot fill a batch of {batch_size} x {context + 1}")
    while True:
        offset = int(torch.randint(context, (1,), generator=generator))
        starts = offset + context * torch.arange((len(tokens) - 1 - offset) // context)  # [W]
        starts = starts[torch.randperm(len(starts), generator=generator)]
        for i in range(0, len(starts) - batch_size + 1, batch_size):
            yield tokens[starts[i : i + batch_size, None] + span]  # [B, T+1]


def heldout_windows(tokens: torch.Tensor, context: int, max_tokens: int) -> torch.Tensor:
    """max_tokens // context non-overlapping windows spread evenly over the whole stream: LongTensor[W, context + 1].

    Spread, not the first ones: a split's files are in path order, so its head is one
    corner of the corpus (e.g. the standard library before the installed packages).
    """
    count = min(max_tokens // context, (len(tokens) - 1) // context)
    if count < 1:
        raise ValueError(f"held-out text of {len(tokens)} tokens is shorter than one window of {context + 1}")
    stride = (len(tokens) - 1 - context) // (count - 1) if count > 1 else 0  # >= context: windows never overlap
    starts = stride * torch.arange(count)  # [W]
    return tokens[starts[:, None] + torch.arange(context + 1)]  # [W, T+1]


@torch.no_grad()
def mean_loss(loss_fn: LossFn, windows: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean of loss_fn over windows [W, T+1] (all windows have equal length)."""
    total = 0.0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]  # [b, T+1]
        total += float(loss_fn(batch[:, :-1], batch[:, 1:])) * len(batch)
    return total / len(windows)


def _optimizer(model: LlamaForCausalLM, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


class _Progress(BaseModel):
    """Where a run stands at an evaluation: what `state_path` holds besides tensors."""

    step: int = Field(0, description="Optimizer steps done.")
    seconds: float = Field(0.0, description="Wall time spent so far, over every run.")
    history: list[EvalPoint] = Field(default_factory=list, description="Every evaluation so far.")
    settings: TrainSettings | None = Field(None, description="The settings of the run, to refuse resuming another.")

    def best(self) -> EvalPoint:
        return min(self.history, key=lambda p: p.valid_loss, default=EvalPoint(step=0, train_loss=math.inf, valid_loss=math.inf))


def _save_state(path: Path, model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, progress: _Progress) -> None:
    """Write atomically (a stop mid-write leaves the previous state)."""
    partial = path.with_suffix(".partial")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress.model_dump_json()}
    torch.save(state, partial)
    partial.replace(path)


def _load_state(
    path: Path | None, model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, settings: TrainSettings
) -> _Progress:
    if path is None or not path.exists():
        return _Progress(settings=settings)
    state = torch.load(path, weights_only=True)
    progress = _Progress.model_validate_json(state["progress"])
    if progress.settings != settings:
        raise ValueError(f"{path} was written with other training settings; delete it to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming from step %d (%s)", progress.step, path)
    return progress


def train_model(
    model: LlamaForCausalLM,
    train_loss: LossFn,
    valid_loss: LossFn,
    train_tokens: torch.Tensor,
    valid_windows: torch.Tensor,
    settings: TrainSettings,
    context: int,
    eval_batch_size: int,
    on_best: Callable[[TrainResult], None],
    state_path: Path | None = None,
    earlier: TrainResult | None = None,
) -> TrainResult:
    """Train in place; call on_best(result so far) whenever the valid loss improves.

    With `state_path`, the run saves its state there at every evaluation and resumes from it.
    `earlier`: the record of the stage that trained `model` before (same seed); this run skips the
    windows it consumed, so that it sees fresh ones.
    """
    optimizer = _optimizer(model, settings)
    progress = _load_state(state_path, model, optimizer, settings)
    batches = training_batches(train_tokens, context, settings.batch_size, settings.seed)
    consumed = earlier.total_tokens_seen() // (settings.batch_size * context) if earlier else 0
    for _ in range(consumed + progress.step):
        next(batches)  # the batches earlier stages, and an uninterrupted run of this one, would have consumed
    history, best = list(progress.history), progress.best()
    start, running = time.perf_counter() - progress.seconds, 0.0
    for step in range(progress.step + 1, settings.steps + 1):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, settings)
        batch = next(batches)  # [B, T+1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16_autocast):
            loss = train_loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        running += loss.item()
        if step % settings.eval_every and step != settings.steps:
            continue
        model.eval()
        since = step - (history[-1].step if history else 0)
        point = EvalPoint(step=step, train_loss=running / since, valid_loss=mean_loss(valid_loss, valid_windows, eval_batch_size))
        history.append(point)
        running = 0.0
        log.info("step %d/%d train %.4f valid %.4f", step, settings.steps, point.train_loss, point.valid_loss)
        if point.valid_loss < best.valid_loss:
            best = point
            on_best(_result(settings, step, context, len(train_tokens), best, start, history, earlier))
        if state_path is not None:
            progress = _Progress(step=step, seconds=time.perf_counter() - start, history=history, settings=settings)
            _save_state(state_path, model, optimizer, progress)
    return _result(settings, settings.steps, context, len(train_tokens), best, start, history, earlier)


def _result(
    settings: TrainSettings, step: int, context: int, train_tokens: int, best: EvalPoint, start: float, history: list[EvalPoint],
    earlier: TrainResult | None,
) -> TrainResult:
    seconds = time.perf_counter() - start
    seen = step * settings.batch_size * context
    return TrainResult(
        steps=step,
        tokens_seen=seen,
        train_tokens=train_tokens,
        best_step=best.step,
        best_valid_loss=best.valid_loss,
        seconds=seconds,
        tokens_per_second=seen / seconds,
        history=list(history),
        earlier=earlier,
    )
