"""ModelRunner: a Llama-family causal LM with per-sequence KV caches and exits.

The runner owns its forward pass (in the style of gpt-fast) over the modules of
a Hugging Face `LlamaForCausalLM`, so that

- a batch of sequences with different cached lengths and different numbers of
  new tokens runs in one forward (right-padded queries, a mask per row);
- a row may stop after its first L decoder layers and read the shared final norm
  and LM head there (an *exit*): a sorted multi-exit drafter is one model with
  several nested sub-models. Rows leave the batch at their exit, so deeper
  layers only run for the rows that need them;
- rollback is the crop rule of `actors.kv_cache`.
"""

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaForCausalLM, apply_rotary_pos_emb

from actors.errors import InvalidRequest
from actors.kv_cache import SequenceCache
from actors.loading import load_llama

SeqId = Hashable


class ModelRunner:
    """Runs one model for many sequences, each with its own KV cache."""

    def __init__(self, model: LlamaForCausalLM, name: str = "model"):
        self.model = model.eval().requires_grad_(False)
        self.name = name
        config = model.config
        self.num_layers: int = config.num_hidden_layers
        self.vocab_size: int = model.lm_head.out_features
        self.max_context: int = config.max_position_embeddings
        self.eos_token_id: int | None = _first_id(config.eos_token_id)
        self.exit_layers: list[int] = list(getattr(config, "exit_layers", None) or [self.num_layers])
        attention = model.model.layers[0].self_attn
        self._num_heads = config.num_attention_heads
        self._num_kv_heads = config.num_key_value_heads
        self._head_dim = attention.head_dim
        self._scale = attention.scaling
        self._param = next(model.parameters())
        self._caches: dict[SeqId, SequenceCache] = {}

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", device: str = "cpu") -> "ModelRunner":
        """Load a local Hugging Face checkpoint (config.json + safetensors)."""
        return cls(load_llama(path, dtype, device), name=str(path))

    # -- sequence bookkeeping -------------------------------------------------

    def add_sequence(self, seq_id: SeqId) -> None:
        if seq_id in self._caches:
            raise InvalidRequest(f"sequence {seq_id!r} already exists in {self.name}")
        self._caches[seq_id] = SequenceCache(
            self.num_layers, self._num_kv_heads, self._head_dim, self._param.dtype, self._param.device
        )

    def free(self, seq_id: SeqId) -> None:
        """Drop a sequence's cache; freeing an unknown sequence is a no-op."""
        self._caches.pop(seq_id, None)

    def has_sequence(self, seq_id: SeqId) -> bool:
        return seq_id in self._caches

    @property
    def num_sequences(self) -> int:
        return len(self._caches)

    def cached_length(self, seq_id: SeqId) -> int:
        return len(self._cache(seq_id))

    def rollback(self, seq_id: SeqId, length: int) -> None:
        """Keep only the first `length` cached tokens of a sequence."""
        self._cache(seq_id).truncate(length)

    def keep_common_prefix(self, seq_id: SeqId, context: list[int], start: int = 0) -> None:
        """Roll a sequence back to the longest cached prefix of its true `context`."""
        self._cache(seq_id).keep_common_prefix(context, start)

    def check_exit(self, exit_layer: int) -> None:
        if not 1 <= exit_layer <= self.num_layers:
            raise InvalidRequest(f"exit {exit_layer} is outside 1..{self.num_layers} layers of {self.name}")

    # -- the forward pass -------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        seq_ids: Sequence[SeqId],
        new_tokens: Sequence[Sequence[int]],
        exits: Sequence[int] | None = None,
        last_only: bool = False,
    ) -> list[torch.Tensor]:
        """Append `new_tokens[i]` to sequence `seq_ids[i]` and score them, all rows in one pass.

        Returns per row the logits [n_i, V] (or [1, V] with `last_only`), row j
        scoring the token that follows the j-th new token.
        """
        exits = list(exits) if exits is not None else [self.num_layers] * len(seq_ids)
        caches = [self._cache(s) for s in seq_ids]
        asked = [len(t) for t in new_tokens]  # a re-prefilled row scores more tokens than asked for
        rows = [self._prepare_row(c, list(t), e) for c, t, e in zip(caches, new_tokens, exits)]
        starts = [len(c) for c in caches]
        lengths = [len(t) for t in rows]
        hidden, positions, mask = self._embed(rows, starts)
        logits: list[torch.Tensor | None] = [None] * len(rows)
        active = list(range(len(rows)))  # rows still running, in batch order
        for layer in range(max(exits)):
            hidden = self._layer(layer, hidden, positions, mask, [caches[r] for r in active], [starts[r] for r in active], [lengths[r] for r in active])
            leaving = [i for i, r in enumerate(active) if exits[r] == layer + 1]
            if leaving:
                for i, row_logits in zip(leaving, self._head(hidden[leaving])):
                    r = active[i]
                    first = lengths[r] - (1 if last_only else asked[r])
                    logits[r] = row_logits[first : lengths[r]]
                staying = [i for i, r in enumerate(active) if exits[r] > layer + 1]
                hidden, positions, mask = hidden[staying], positions[staying], mask[staying]
                active = [active[i] for i in staying]
        for cache, tokens, exit_layer in zip(caches, rows, exits):
            cache.extend(tokens, exit_layer)
        return logits

    def _cache(self, seq_id: SeqId) -> SequenceCache:
        try:
            return self._caches[seq_id]
        except KeyError:
            raise InvalidRequest(f"unknown sequence {seq_id!r} in {self.name}") from None

    def _prepare_row(self, cache: SequenceCache, tokens: list[int], exit_layer: int) -> list[int]:
        """Validate one row; re-prefill it when its exit is deeper than its cache reaches."""
        self.check_exit(exit_layer)
        if not tokens:
            raise InvalidRequest("a forward needs at least one new token per sequence")
        if not all(0 <= t < self.vocab_size for t in tokens):
            raise InvalidRequest(f"token ids must lie in [0, {self.vocab_size}) for {self.name}")
        if exit_layer > cache.depth and len(cache):
            tokens = cache.tokens + tokens
            cache.reset(exit_layer)
        if len(cache) + len(tokens) > self.max_context:
            raise InvalidRequest(
                f"{len(cache) + len(tokens)} tokens exceed the context of {self.max_context} of {self.name}"
            )
        return tokens

    def _embed(self, rows: list[list[int]], starts: list[int]):
        """Right-pad the new tokens and build positions and the attention mask.

        Returns hidden [B, T, H], positions [B, T] and mask [B, 1, T, P + T] (True =
        attend), where P is the longest cached length: keys are laid out as the
        cached keys left-aligned and zero-padded to P, then the T new keys.
        """
        device = self._param.device
        width = max(len(t) for t in rows)  # T
        past = max(starts)  # P
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for i, tokens in enumerate(rows):
            ids[i, : len(tokens)] = torch.tensor(tokens, device=device)
        start = torch.tensor(starts, device=device)[:, None]  # [B, 1]
        length = torch.tensor([len(t) for t in rows], device=device)[:, None]  # [B, 1]
        query = torch.arange(width, device=device)  # [T]
        positions = start + query[None, :]  # [B, T]
        past_visible = torch.arange(past, device=device)[None, None, :] < start[:, :, None]  # [B, 1, P]
        new_visible = (query[None, None, :] <= query[None, :, None]) & (query[None, None, :] < length[:, :, None])  # [B, T, T]
        mask = torch.cat([past_visible.expand(-1, width, -1), new_visible], dim=-1)[:, None]  # [B, 1, T, P + T]
        return self.model.model.embed_tokens(ids), positions, mask

    def _layer(self, layer, hidden, positions, mask, caches, starts, lengths) -> torch.Tensor:
        """One decoder layer for the active rows; writes their new keys/values to the caches."""
        block = self.model.model.layers[layer]
        batch, width, _ = hidden.shape
        x = block.input_layernorm(hidden)
        attn = block.self_attn
        q = attn.q_proj(x).view(batch, width, self._num_heads, self._head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = attn.k_proj(x).view(batch, width, self._num_kv_heads, self._head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = attn.v_proj(x).view(batch, width, self._num_kv_heads, self._head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        cos, sin = self.model.model.rotary_emb(x, positions)  # each [B, T, D]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        past_k, past_v = self._gather_past(layer, caches, mask.shape[-1] - width)  # each [B, Hkv, P, D]
        out = F.scaled_dot_product_attention(
            q, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2),
            attn_mask=mask, scale=self._scale, enable_gqa=True,
        )  # [B, Hq, T, D]
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, width, -1))
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        for i, cache in enumerate(caches):
            cache.write(layer, starts[i], k[i, :, : lengths[i]], v[i, :, : lengths[i]])
        return hidden

    def _gather_past(self, layer: int, caches: list[SequenceCache], width: int):
        """Cached keys/values of the active rows, zero-padded to `width`: each [B, Hkv, P, D]."""
        shape = (len(caches), self._num_kv_heads, width, self._head_dim)
        keys = torch.zeros(shape, dtype=self._param.dtype, device=self._param.device)
        values = torch.zeros_like(keys)
        for i, cache in enumerate(caches):
            k, v = cache.past(layer)
            keys[i, :, : k.shape[1]] = k
            values[i, :, : v.shape[1]] = v
        return keys, values

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shared final norm and LM head: [b, T, H] -> [b, T, V] float32."""
        return self.model.lm_head(self.model.model.norm(hidden)).float()


def _first_id(token_id) -> int | None:
    if isinstance(token_id, (list, tuple)):
        return token_id[0] if token_id else None
    return token_id
