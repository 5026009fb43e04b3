"""The model step: one Llama forward over slots of a preallocated KV store.

`LlamaStep` is the whole decoder as one function of tensors, in the style of
gpt-fast: every row of a batch names its slot in the `KVStore`, its new tokens'
positions, and the exit it reads its logits at. Keys and values are written
into the store by position (`index_put_`), attention reads each row's slot up
to a key length with a causal mask from positions, and nothing is allocated
per sequence. Shapes depend only on (batch, width, key length, depth), so
`torch.compile` turns the step into a few fused kernels (`actors.compiled`);
the runner's shape policy (`actors.buckets`) says whether calls are padded
to buckets.

Projections are fused at load (q/k/v into one matrix, gate/up into one) and
pre-transposed ([in, out], which this CPU's matmul reads faster for a few
rows): two fewer matmuls per layer and per token, the same arithmetic as
Hugging Face's separate ones up to float rounding.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from actors.kv_cache import KVStore


class LlamaStep(nn.Module):
    """The decoder of a `LlamaForCausalLM` as a step over KV-store slots (weights shared, not copied twice)."""

    def __init__(self, model: LlamaForCausalLM, positions: int):
        super().__init__()
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        attention = model.model.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scale = attention.scaling
        self.eps = config.rms_norm_eps
        self.embed = nn.Buffer(model.model.embed_tokens.weight)  # [V, H]
        self.lm_head = nn.Buffer(model.lm_head.weight.t().contiguous())  # [H, V]
        self.final_norm = nn.Buffer(model.model.norm.weight)  # [H]
        for layer, block in enumerate(model.model.layers):
            for name, weight in self._fuse(block).items():
                self.register_buffer(f"{name}_{layer}", weight)
        cos, sin = model.model.rotary_emb(self.embed[:1][None], torch.arange(positions)[None])  # each [1, P, D]
        self.cos, self.sin = nn.Buffer(cos[0].to(self.embed.dtype)), nn.Buffer(sin[0].to(self.embed.dtype))  # [P, D]

    @staticmethod
    def _fuse(block) -> dict[str, torch.Tensor]:
        attn, mlp = block.self_attn, block.mlp
        return {
            "input_norm": block.input_layernorm.weight,
            "qkv": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t().contiguous(),  # [H, (Hq + 2 Hkv) D]
            "o": attn.o_proj.weight.t().contiguous(),
            "post_norm": block.post_attention_layernorm.weight,
            "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t().contiguous(),  # [H, 2 I]
            "down": mlp.down_proj.weight.t().contiguous(),
        }

    def forward(
        self,
        store: KVStore,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        exits: torch.Tensor,
        key_length: int,
        depth: int,
    ) -> torch.Tensor:
        """Run `depth` layers for every row and return float32 logits [B, T, V] at each row's exit.

        ids, positions [B, T] long; slots, exits [B] long; `key_length` the keys read per row.
        Every position gets logits, also for a prompt that needs only its last: one graph
        fewer to compile, for a head over 64 positions once per prompt chunk.
        """
        hidden = F.embedding(ids, self.embed)  # [B, T, H]
        cos, sin = self.cos[positions], self.sin[positions]  # each [B, T, D]
        visible = torch.arange(key_length, device=ids.device)[None, None, :] <= positions[:, :, None]  # [B, T, K]
        mask = visible[:, None]  # [B, 1, T, K]
        chosen = hidden  # each row's hidden state at its exit, once the row has passed it
        for layer in range(depth):
            hidden = self._layer(layer, store, hidden, positions, slots, cos, sin, mask, key_length)
            chosen = torch.where((exits == layer + 1)[:, None, None], hidden, chosen)  # any layer may be an exit
        return (F.rms_norm(chosen, chosen.shape[-1:], self.final_norm, self.eps) @ self.lm_head).float()

    def draft_greedy(self, store: KVStore, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                     exits: torch.Tensor, key_length: int, depth: int, steps: int) -> torch.Tensor:
        """`steps` greedy draft tokens per row, each step feeding the last one back: tokens [B, steps].

        ids, positions [B, 1]: each row's one token not yet cached, and its position; `key_length`
        the keys the first step reads (every row advances one position per step, so step i reads
        `key_length + i`). Compiled as one graph, the steps pay a compiled call's fixed cost (guards,
        wrappers, the runner's bookkeeping: about half of a small drafter's step on a CPU) once.
        """
        drafted = []
        for step in range(steps):
            logits = self.forward(store, ids, positions, slots, exits, key_length + step, depth)  # [B, 1, V]
            ids = logits.argmax(dim=-1)  # [B, 1]
            positions = positions + 1
            drafted.append(ids)
        return torch.cat(drafted, dim=1)

    def _layer(self, layer, store, hidden, positions, slots, cos, sin, mask, key_length) -> torch.Tensor:
        """One decoder layer; writes the rows' new keys/values into their slots."""
        weights = {name: getattr(self, f"{name}_{layer}") for name in _WEIGHTS}
        batch, width, _ = hidden.shape
        x = F.rms_norm(hidden, hidden.shape[-1:], weights["input_norm"], self.eps)
        qkv = (x @ weights["qkv"]).view(batch, width, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)  # [B, T, h, D]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys, values = store.write_and_read(layer, slots, positions, k, v, key_length)  # each [B, Hkv, K, D]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True
        )  # [B, Hq, T, D]
        hidden = hidden + out.transpose(1, 2).reshape(batch, width, -1) @ weights["o"]
        x = F.rms_norm(hidden, hidden.shape[-1:], weights["post_norm"], self.eps)
        gate, up = (x @ weights["gate_up"]).chunk(2, dim=-1)  # each [B, T, I]
        return hidden + (F.silu(gate) * up) @ weights["down"]


_WEIGHTS = ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, T, h, D] with cos/sin [B, T, D] (Llama's rotate-half form)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
