"""Sampling parameters and the one transform from logits to probabilities.

Target (p) and draft (q) distributions both go through `logits_to_probs` with
the same parameters, so temperature, top-k and top-p shape p and q alike and the
verifier compares like with like. Temperature 0 means greedy: the distribution
is a point mass on the argmax.
"""

import functools

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.errors import InvalidRequest


class SamplingParams(BaseModel):
    """How one request samples. Immutable once validated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(
        1.0, ge=0.0, le=100.0, description="Softmax temperature; 0 decodes greedily (argmax)."
    )
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0 keeps all.")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens whose mass reaches top_p."
    )
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Seed of the request's random stream; None draws one at random."
    )
    max_tokens: int = Field(64, ge=1, description="Most tokens to generate, the stopping token included.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    allowed_token_ids: tuple[int, ...] | None = Field(
        None,
        description="Sample only among these ids (sampled rows; the distribution is renormalised over them); "
        "None allows every id. Set by specfleet, not by clients: a foreign-vocabulary drafter samples only "
        "tokens its target also has (actors/vocabulary_bridge.py).",
    )

    @model_validator(mode="after")
    def _restricts_only_sampling(self) -> "SamplingParams":
        if self.allowed_token_ids is not None and (self.greedy or not self.allowed_token_ids):
            raise ValueError("allowed_token_ids restricts a sampled distribution: give a temperature > 0 and some ids")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_sampling_params(**values) -> SamplingParams:
    """Validate user-supplied sampling values into `SamplingParams`.

    Raises `InvalidRequest` naming each bad field and the value given, instead of
    pydantic's multi-line report.
    """
    try:
        return SamplingParams(**values)
    except ValidationError as err:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'sampling'}: {e['msg'].lower()} (got {e.get('input')!r})"
            for e in err.errors()
        ]
        raise InvalidRequest("invalid sampling parameters: " + "; ".join(problems)) from None


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own random stream, so its samples do not depend on its batch mates."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Turn logits [..., V] into the distribution tokens are sampled from, [..., V] float32."""
    logits = logits.float()
    if params.greedy:
        return _point_mass(logits.argmax(dim=-1), logits.shape[-1])
    if params.allowed_token_ids is not None:
        logits = logits.masked_fill(~_allowed_mask(params.allowed_token_ids, logits.shape[-1]).to(logits.device),
                                    float("-inf"))
    logits = logits / params.temperature
    if params.top_k:
        logits = _keep_top_k(logits, params.top_k)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _keep_top_p(probs, params.top_p)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one token per row of probs [N, V] -> [N] (long)."""
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@functools.lru_cache(maxsize=16)
def _allowed_mask(allowed: tuple[int, ...], vocab_size: int) -> torch.Tensor:
    """[V] bool: True at the allowed ids (cached: a sequence samples with the same ids every step)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[list(allowed)] = True
    return mask


def _point_mass(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens, vocab_size).float()


def _keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def _keep_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly more likely tokens
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the most likely token always stays
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)
