"""The exit contract of the sorted drafter.

Exit L = embeddings -> decoder layers 0..L-1 -> the shared final norm `model.model.norm` -> `lm_head`.

The layers are run here rather than read from `output_hidden_states=True`: in transformers 5.19
`hidden_states[L]` is the raw output of layer L-1 for L < num_layers, but the last element is
replaced by the *normed* `last_hidden_state` (`capture_outputs(tie_last_hidden_states=True)`), so
norming every element alike would norm the deepest exit twice.
"""

import torch
from transformers import LlamaForCausalLM
from transformers.masking_utils import create_causal_mask


def exit_layers_of(model: LlamaForCausalLM) -> list[int]:
    """The exits recorded in the config (`config.exit_layers`), or just the full depth."""
    return list(getattr(model.config, "exit_layers", None) or [model.config.num_hidden_layers])


def exit_logits(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    exit_layers: list[int],
    attention_mask: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """Logits of every exit from one pass through the layers.

    input_ids: LongTensor[B, T]; attention_mask: optional [B, T] of 1 (token) / 0 (padding), as for
    `model(input_ids, attention_mask=...)`. Returns {L: FloatTensor[B, T, V]} for each L in exit_layers.
    """
    base = model.model
    if not exit_layers or min(exit_layers) < 1 or max(exit_layers) > len(base.layers):
        raise ValueError(f"exit layers {exit_layers} outside 1..{len(base.layers)}")
    hidden = base.embed_tokens(input_ids)  # [B, T, D]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # [1, T]
    mask = create_causal_mask(
        config=base.config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=None, position_ids=positions
    )
    rotary = base.rotary_emb(hidden, position_ids=positions)  # (cos, sin), each [1, T, head_dim]
    wanted = set(exit_layers)
    logits = {}
    for index, layer in enumerate(base.layers[: max(wanted)]):
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)  # [B, T, D]
        if index + 1 in wanted:
            logits[index + 1] = model.lm_head(base.norm(hidden))  # [B, T, V]
    return logits
