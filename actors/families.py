"""The decoder families the runner serves, and how each differs from Llama.

Every supported family is a pre-norm decoder with rotary attention and a gated
MLP; they differ in a few places, which `Architecture` names so that the step
(`actors.forward.DecoderStep`) computes each exactly as Hugging Face's own
implementation does:

| family | what differs from Llama |
|---|---|
| `llama` | (the reference; optional attention / MLP biases) |
| `qwen2` | biases on the q, k, v projections; sliding-window layers where `layer_types` says so |
| `qwen3` | RMSNorm of each head's queries and keys before the rotation (`q_norm`, `k_norm`) |
| `mistral` | a sliding window on every layer (`sliding_window`) |
| `gemma` | embeddings scaled by sqrt(hidden), RMSNorm weights applied as (1 + w), a GELU MLP, tied head |
| `gemma2` | gemma's, plus norms after attention and after the MLP, tanh soft-capping of attention scores and of the final logits, `query_pre_attn_scalar` scaling, alternating sliding-window layers |
| `phi3` | fused qkv and gate_up projections in the checkpoint, partial rotary embedding, a sliding window |

Weights are read from the Hugging Face module tree into one layout (`layer_weights`),
so the step has a single code path with a few switches fixed at load. "Exactly as
Hugging Face computes it" means its eager attention, the reference: its SDPA
path silently drops Gemma 2's attention soft-capping.
"""

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3")
# RoPE variants whose rotation depends on the sequence's current length, not on the position alone: the step's
# rotation table is computed once at load, so these are refused (the static ones: default, linear, llama3, yarn).
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
OFFSET_NORMS = ("gemma", "gemma2")  # RMSNorm computes x_hat * (1 + w)
SCALED_EMBEDDINGS = ("gemma", "gemma2")  # embeddings times sqrt(hidden_size)
WINDOW_ON_EVERY_LAYER = ("mistral", "phi3")  # `sliding_window` applies to all layers (no `layer_types`)


@dataclass(frozen=True)
class Architecture:
    """What the step does differently from Llama; fixed at load, so a compiled step specialises to it."""

    activation: str  # "silu", "gelu" (erf) or "gelu_tanh", applied to the gate
    embed_scale: float | None  # multiply embeddings by this (Gemma), or None
    qk_norm: bool  # RMSNorm of each head's queries and keys before the rotation (Qwen3)
    sandwich_norms: bool  # norms on the attention and MLP outputs too (Gemma 2)
    attn_softcap: float | None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    final_softcap: float | None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    windows: tuple[int | None, ...]  # per layer: keys older than this many positions are hidden, or None
    rotary_dim: int  # leading dimensions of each head that are rotated (Phi-3 may rotate only part)


ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}  # config name -> what the step computes


def architecture_of(model: nn.Module, rotary_dim: int) -> Architecture:
    config = model.config
    model_type = config.model_type
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    if act not in ACTIVATIONS:
        raise ValueError(f"{model_type}: activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return Architecture(
        activation=ACTIVATIONS[act],
        embed_scale=config.hidden_size**0.5 if model_type in SCALED_EMBEDDINGS else None,
        qk_norm=model_type == "qwen3",
        sandwich_norms=model_type == "gemma2",
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        final_softcap=getattr(config, "final_logit_softcapping", None),
        windows=_windows(config),
        rotary_dim=rotary_dim,
    )


def _windows(config) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    layers = config.num_hidden_layers
    if window is None:
        return (None,) * layers
    if getattr(config, "layer_types", None):
        return tuple(window if kind == "sliding_attention" else None for kind in config.layer_types)
    return (window,) * layers if config.model_type in WINDOW_ON_EVERY_LAYER else (None,) * layers


def norm_weight(norm: nn.Module, model_type: str) -> torch.Tensor:
    """The RMSNorm weight as `F.rms_norm` applies it (Gemma's (1 + w), computed in the weight's dtype)."""
    return norm.weight + 1 if model_type in OFFSET_NORMS else norm.weight


def layer_weights(block: nn.Module, model_type: str) -> dict[str, torch.Tensor]:
    """One decoder layer's weights, fused and pre-transposed ([in, out]); optional ones only where present.

    qkv [H, (Hq + 2 Hkv) D], o [Hq D, H], gate_up [H, 2 I], down [I, H]; biases [out]; norms [H] (q/k norms [D]).
    """
    attn, mlp = block.self_attn, block.mlp
    if hasattr(attn, "qkv_proj"):  # Phi-3 stores them fused, in this order
        qkv, qkv_bias = attn.qkv_proj.weight, attn.qkv_proj.bias
    else:
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        qkv = torch.cat([p.weight for p in projections])
        qkv_bias = torch.cat([p.bias for p in projections]) if attn.q_proj.bias is not None else None
    if hasattr(mlp, "gate_up_proj"):
        gate_up, gate_up_bias = mlp.gate_up_proj.weight, mlp.gate_up_proj.bias
    else:
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        gate_up_bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]) if mlp.gate_proj.bias is not None else None
    mlp_in_norm = block.pre_feedforward_layernorm if hasattr(block, "pre_feedforward_layernorm") else block.post_attention_layernorm
    weights = {
        "attn_in_norm": norm_weight(block.input_layernorm, model_type),
        "qkv": qkv.t().contiguous(),
        "qkv_bias": qkv_bias,
        "o": attn.o_proj.weight.t().contiguous(),
        "o_bias": attn.o_proj.bias,
        "mlp_in_norm": norm_weight(mlp_in_norm, model_type),
        "gate_up": gate_up.t().contiguous(),
        "gate_up_bias": gate_up_bias,
        "down": mlp.down_proj.weight.t().contiguous(),
        "down_bias": mlp.down_proj.bias,
    }
    if hasattr(block, "pre_feedforward_layernorm"):  # Gemma 2: post_attention_layernorm normalises the attention output
        weights["attn_out_norm"] = norm_weight(block.post_attention_layernorm, model_type)
        weights["mlp_out_norm"] = norm_weight(block.post_feedforward_layernorm, model_type)
    if hasattr(attn, "q_norm"):
        weights["q_norm"], weights["k_norm"] = attn.q_norm.weight, attn.k_norm.weight
    return {name: weight for name, weight in weights.items() if weight is not None}
