"""Turning a wire request into prompt ids and sampling parameters, or a readable refusal."""

from dataclasses import dataclass

from actors.cascades import CascadeParams, make_cascade_params
from actors.errors import InvalidRequest
from actors.sampling import SamplingParams, make_sampling_params
from actors.speculation import FOLLOW_PLAN, MAX_DRAFT_LENGTH, NO_SPECULATION, SpeculationSpec
from actors.trees import TreeShape
from cluster.config import TargetConfig
from specfleet.v1 import generation_pb2 as pb


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_context: int
    max_prompt_chars: int  # the server's: checked before tokenizing
    max_tokens: int | None = None  # the server's cap on a request's max_tokens; None: the context's room


def prompt_ids(request: pb.GenerateRequest, tokenizer, limits: ModelLimits) -> list[int]:
    """The prompt as token ids: tokenized text, or the ids given, checked against the model."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("the request has no prompt: set text or token_ids")
    if kind == "text" and len(request.text) > limits.max_prompt_chars:
        raise InvalidRequest(f"prompt of {len(request.text)} characters exceeds this server's limit of {limits.max_prompt_chars}")
    ids = tokenizer(request.text, add_special_tokens=False)["input_ids"] if kind == "text" else list(request.token_ids.ids)
    if not ids:
        raise InvalidRequest("prompt is empty: give at least one token")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise InvalidRequest(f"token ids must lie in [0, {limits.vocab_size}); got {bad[:5]}")
    if len(ids) >= limits.max_context:
        raise InvalidRequest(f"prompt of {len(ids)} tokens leaves no room in the model's context of {limits.max_context}")
    return ids


def sampling_params(request: pb.GenerateRequest, default_max_tokens: int, prompt_length: int, limits: ModelLimits) -> SamplingParams:
    max_tokens = request.max_tokens or min(default_max_tokens, limits.max_context - prompt_length)
    if limits.max_tokens is not None and max_tokens > limits.max_tokens:
        raise InvalidRequest(f"max_tokens {max_tokens} exceeds this server's limit of {limits.max_tokens}")
    if prompt_length + max_tokens > limits.max_context:
        raise InvalidRequest(
            f"prompt ({prompt_length} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {limits.max_context}"
        )
    values = {"max_tokens": max_tokens, "ignore_eos": request.ignore_eos}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if request.HasField(name):
            values[name] = getattr(request, name)
    return make_sampling_params(**values)


CASCADE_RULES = {pb.Cascade.CHOW: "chow", pb.Cascade.DIFF: "diff", pb.Cascade.OPT: "opt"}


def speculation_spec(speculation: pb.Speculation, target: TargetConfig, exits: list[int] | None,
                     trees: bool = False) -> SpeculationSpec:
    """The request's speculation, validated: AUTO follows the target's plan, OFF decodes plainly.

    `exits` are the exits the target's drafter was trained for (None: it has no drafter); `trees`,
    whether the target's replicas serve token trees (`ClusterConfig.uses_trees`). A speculative
    cascade (the request's, else the target's default) rides along. Enum values this server does
    not know are refused, not read as a default.
    """
    spec = _draft_spec(speculation, target, exits, trees)
    cascade = None if spec.k == 0 else cascade_override(speculation, target)
    return spec if cascade is None else spec.model_copy(update={"cascade": cascade})


def cascade_override(speculation: pb.Speculation, target: TargetConfig) -> CascadeParams | None:
    """The request's cascade: its rule and alpha, each falling back to the target's default; None: lossless."""
    default = target.cascade
    if not speculation.HasField("cascade"):
        return default
    if target.drafter is None:
        raise InvalidRequest("this target has no drafter to cascade with")
    wire = speculation.cascade
    if wire.rule not in (pb.Cascade.RULE_UNSPECIFIED, *CASCADE_RULES):
        raise InvalidRequest(f"unknown cascade rule {wire.rule}; known: {', '.join(map(pb.Cascade.Rule.Name, CASCADE_RULES))}")
    rule = CASCADE_RULES.get(wire.rule) or (default.rule if default else None)
    alpha = wire.alpha if wire.HasField("alpha") else (default.alpha if default else None)
    if rule is None or alpha is None:
        raise InvalidRequest("a cascade needs a rule and an alpha, and this target has no default cascade to fill them in")
    return make_cascade_params(rule=rule, alpha=alpha)


def _draft_spec(speculation: pb.Speculation, target: TargetConfig, exits: list[int] | None,
                trees: bool) -> SpeculationSpec:
    mode = speculation.mode
    if mode not in pb.Speculation.Mode.values():
        known = [name for name in pb.Speculation.Mode.keys() if name != "MODE_UNSPECIFIED"]
        raise InvalidRequest(f"unknown speculation mode {mode}; known: {', '.join(known)}")
    if mode in (pb.Speculation.MODE_UNSPECIFIED, pb.Speculation.AUTO):
        return FOLLOW_PLAN
    if mode == pb.Speculation.OFF:
        return NO_SPECULATION
    if target.drafter is None:
        raise InvalidRequest("this target has no drafter to speculate with; use AUTO or OFF")
    if speculation.drafter and speculation.drafter != target.drafter:
        raise InvalidRequest(f"this target is paired with drafter {target.drafter!r}, not {speculation.drafter!r}")
    exit_layer = speculation.exit_layer or None  # the wire's 0: the plan's exit
    if exit_layer is not None and exit_layer not in (exits or ()):
        raise InvalidRequest(f"exit {exit_layer} is not one of the exits the drafter was trained for: {exits}")
    if speculation.tree:
        if not trees:  # its replicas compiled no tree step: a first one would stall the drafter for every target
            raise InvalidRequest("this target does not serve token trees (its config sets no tree and the controller "
                                 "has no tree_choices); use k")
        return SpeculationSpec(tree=_tree_shape(speculation), exit_layer=exit_layer)
    if not 1 <= speculation.k <= MAX_DRAFT_LENGTH:
        raise InvalidRequest(f"FIXED speculation needs 1 <= k <= {MAX_DRAFT_LENGTH}, got {speculation.k} (or a tree instead of k)")
    return SpeculationSpec(k=speculation.k, exit_layer=exit_layer)


def _tree_shape(speculation: pb.Speculation) -> TreeShape:
    """A FIXED request's tree shape: with no k beside it, and within the shape limits."""
    if speculation.k:
        raise InvalidRequest("FIXED speculation takes k or a tree, not both")
    try:
        return TreeShape.parse(speculation.tree)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
