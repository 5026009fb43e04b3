"""The model step: one decoder forward over slots of a preallocated KV store.

`DecoderStep` is the whole decoder as one function of tensors, in the style of
gpt-fast: every row of a batch names its slot in the `KVStore`, its new tokens'
positions, and the exit it reads its logits at. Keys and values are written
into the store by position (`index_put_`), attention reads each row's slot up
to a key length with a causal mask from positions, and nothing is allocated
per sequence. Shapes depend only on (batch, width, key length, depth), so
`torch.compile` turns the step into a few fused kernels (`actors.compiled`);
the runner's shape policy (`actors.buckets`) says whether calls are padded
to buckets. The families it serves (Llama, Qwen2/3, Mistral, Gemma/Gemma 2,
Phi-3) differ in a few switches fixed at load (`actors.families`).

Projections are fused at load (q/k/v into one matrix, gate/up into one) and
pre-transposed ([in, out], which this CPU's matmul reads faster for a few
rows): two fewer matmuls per layer and per token, the same arithmetic as
Hugging Face's separate ones up to float rounding. With `kernels`, a CPU with
AVX-512 or AVX2 runs the project's own kernels (`actors.cpu_kernels`): each matmul
weight that float16 holds exactly is stored packed in float16 and multiplied by
in float32 (`actors.packed_linear`), and a causal step attends over the store
in place (`cpu_kernels.cached_attention`, no mask tensor, no copied keys). A
drafter's matmul weights may be stored in int8 instead (`int8_weights`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from actors import cpu_kernels, packed_linear
from actors.families import Architecture, architecture_of, layer_weights, norm_weight
from actors.buckets import NARROW_WIDTH
from actors.kv_cache import KVStore

MATMUL_WEIGHTS = ("qkv", "o", "gate_up", "down")  # a layer's weights `_linear` multiplies by ([in, out])


class DecoderStep(nn.Module):
    """The decoder of a causal LM as a step over KV-store slots (weights shared, not copied twice)."""

    def __init__(self, model: nn.Module, positions: int, kernels: bool = False, int8_weights: bool = False):
        """`int8_weights`: store every matmul weight quantized to int8 where the kernels run (a drafter's choice)."""
        super().__init__()
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        attention = model.model.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scale = attention.scaling
        self.eps = config.rms_norm_eps
        self.embed = nn.Buffer(model.model.embed_tokens.weight)  # [V, H]
        kernels = kernels and cpu_kernels.available()
        pack = _packer(kernels, int8_weights)
        self.lm_head = nn.Buffer(pack(model.lm_head.weight.t().contiguous()))  # [H, V], or packed
        self.final_norm = nn.Buffer(norm_weight(model.model.norm, config.model_type))  # [H]
        for layer, block in enumerate(model.model.layers):
            weights = layer_weights(block, config.model_type)
            for name, weight in weights.items():
                self.register_buffer(f"{name}_{layer}", pack(weight) if name in MATMUL_WEIGHTS else weight)
        self.weight_names = tuple(weights)  # the same in every layer
        self.packs_every_matmul: bool = all(
            packed_linear.is_packed(weight) for name, weight in self.named_buffers()
            if name == "lm_head" or name.rsplit("_", 1)[0] in MATMUL_WEIGHTS)
        cos, sin = model.model.rotary_emb(self.embed[:1][None], torch.arange(positions)[None])  # each [1, P, R]
        self.cos, self.sin = nn.Buffer(cos[0].to(self.embed.dtype)), nn.Buffer(sin[0].to(self.embed.dtype))  # [P, R]
        self.arch: Architecture = architecture_of(model, rotary_dim=cos.shape[-1])
        self.attends_in_kernel: bool = (
            kernels and self.arch.attn_softcap is None and self.head_dim in cpu_kernels.ATTENTION_HEAD_DIMS
            and self.embed.dtype == torch.float32 and self.embed.device.type == "cpu")

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
        """
        masks = self._causal_masks(ids, positions, key_length, depth)
        return self._decode(store, ids, positions, positions, slots, exits, masks, key_length, depth)

    def forward_last(self, store: KVStore, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                     exits: torch.Tensor, key_length: int, depth: int, last: torch.Tensor) -> torch.Tensor:
        """`forward` that scores one token per row, the one at `last` [B] long: float32 logits [B, 1, V].

        A prompt's chunk needs at most its last token's logits: the head (4096 columns for the zoo) over every
        other position was 12% of target-xl's prefill and 35% of the drafter's.
        """
        masks = self._causal_masks(ids, positions, key_length, depth)
        return self._decode(store, ids, positions, positions, slots, exits, masks, key_length, depth, last)

    def _causal_masks(self, ids: torch.Tensor, positions: torch.Tensor, key_length: int, depth: int):
        """None where a causal step attends in the kernel, else a mask [B, 1, T, K] per window size."""
        in_kernel = self.attends_in_kernel and ids.shape[1] <= NARROW_WIDTH  # wider (prompt chunks): SDPA's is faster
        return None if in_kernel else _masks(positions, key_length, set(self.arch.windows[:depth]))

    def forward_tree(
        self,
        store: KVStore,
        ids: torch.Tensor,
        positions: torch.Tensor,
        writes: torch.Tensor,
        slots: torch.Tensor,
        exits: torch.Tensor,
        region_starts: torch.Tensor,
        region_positions: torch.Tensor,
        visible: torch.Tensor,
        key_length: int,
        depth: int,
    ) -> torch.Tensor:
        """`forward` for tokens of a tree: float32 logits [B, T, V] at each row's exit.

        A row's *region* is its cache from `region_starts` [B] on: tree nodes, in level order,
        whose rotary positions are `region_positions` [B, R]; everything before it is its
        prefix, seen by every token. ids, positions (rotary), writes (cache positions) [B, T]
        long; visible [B, T, R] bool says which region entries each new token sees (its
        ancestors and itself, written at `writes`).
        """
        keys = torch.arange(key_length, device=ids.device)  # [K]
        offsets = keys[None, :] - region_starts[:, None]  # [B, K]: position in the region
        in_region = (offsets >= 0) & (offsets < visible.shape[-1])  # [B, K]
        at = offsets.clamp(0, visible.shape[-1] - 1)  # [B, K]
        seen = visible.gather(2, at[:, None, :].expand(-1, ids.shape[1], -1))  # [B, T, K]
        visible_keys = torch.where(in_region[:, None, :], seen, (offsets < 0)[:, None, :])  # [B, T, K]
        key_positions = torch.where(in_region, region_positions.gather(1, at), keys[None, :])  # [B, K] rotary
        masks = {window: (visible_keys if window is None
                          else visible_keys & (key_positions[:, None, :] > positions[:, :, None] - window))[:, None]
                 for window in set(self.arch.windows[:depth])}  # window -> [B, 1, T, K]
        return self._decode(store, ids, positions, writes, slots, exits, masks, key_length, depth)

    def _decode(self, store, ids, positions, writes, slots, exits, masks, key_length: int, depth: int,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """The layers over ids [B, T] (rotary `positions`, cache `writes`, each [B, T]) -> logits [B, T, V], or
        with `last` [B] only at that token of each row: [B, 1, V].

        `masks` maps each window size to a mask [B, 1, T, K]; None: causal by cache position, in the kernel."""
        arch = self.arch
        hidden = F.embedding(ids, self.embed)  # [B, T, H]
        if arch.embed_scale is not None:
            hidden = hidden * torch.tensor(arch.embed_scale, dtype=hidden.dtype)
        cos, sin = self.cos[positions], self.sin[positions]  # each [B, T, R]
        chosen = hidden  # each row's hidden state at its exit, once the row has passed it
        for layer in range(depth):
            mask = None if masks is None else masks[arch.windows[layer]]
            hidden = self._layer(layer, store, hidden, writes, slots, cos, sin, mask, key_length)
            chosen = torch.where((exits == layer + 1)[:, None, None], hidden, chosen)  # any layer may be an exit
        if last is not None:
            chosen = chosen.gather(1, last[:, None, None].expand(-1, 1, chosen.shape[-1]))  # [B, 1, H]
        logits = _linear(F.rms_norm(chosen, chosen.shape[-1:], self.final_norm, self.eps), self.lm_head, None).float()
        return _softcap(logits, arch.final_softcap)

    def draft_greedy(self, store: KVStore, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                     exits: torch.Tensor, key_length: int, depth: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`steps` greedy draft tokens per row, each step feeding the last one back: tokens [B, steps], and each
        token's probability under the drafter's softmax [B, steps] (what a confidence cut-off reads).

        ids, positions [B, W]: the tokens each row's first step feeds (`FUSED_DRAFT_FEED` of them), and
        their positions; `key_length` the keys the first step reads (every row advances one position per
        step after it, so step i reads `key_length + i`). Compiled as one graph, the steps pay a compiled
        call's fixed cost (guards, wrappers, the runner's bookkeeping: about half of a small drafter's step
        on a CPU) once.
        """
        drafted, top = [], []
        for step in range(steps):
            logits = self.forward(store, ids, positions, slots, exits, key_length + step, depth)[:, -1:]  # [B, 1, V]
            ids = logits.argmax(dim=-1)  # [B, 1]
            top.append(torch.softmax(logits, dim=-1).amax(dim=-1))  # [B, 1]
            positions = positions[:, -1:] + 1
            drafted.append(ids)
        return torch.cat(drafted, dim=1), torch.cat(top, dim=1)

    def _layer(self, layer, store, hidden, writes, slots, cos, sin, mask, key_length) -> torch.Tensor:
        """One decoder layer; writes the rows' new keys/values into their slots. `mask` [B, 1, T, K], or None:
        causal by cache position (`writes`), attended in the kernel."""
        w = {name: getattr(self, f"{name}_{layer}") for name in self.weight_names}
        arch = self.arch
        batch, width, _ = hidden.shape
        x = F.rms_norm(hidden, hidden.shape[-1:], w["attn_in_norm"], self.eps)
        qkv = _linear(x, w["qkv"], w.get("qkv_bias")).view(batch, width, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)  # [B, T, h, D]
        if arch.qk_norm:
            q = F.rms_norm(q, q.shape[-1:], w["q_norm"], self.eps)
            k = F.rms_norm(k, k.shape[-1:], w["k_norm"], self.eps)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if mask is None:
            store.write(layer, slots, writes, k, v)
            out = cpu_kernels.cached_attention(q, store.keys[layer], store.values[layer], slots, writes,
                                               arch.windows[layer], self.scale)  # [B, T, Hq, D]
        else:
            keys, values = store.write_and_read(layer, slots, writes, k, v, key_length)  # each [B, Hkv, K, D]
            out = self._attend(q.transpose(1, 2), keys, values, mask).transpose(1, 2)  # [B, T, Hq, D]
        out = _linear(out.reshape(batch, width, -1), w["o"], w.get("o_bias"))
        if arch.sandwich_norms:
            out = F.rms_norm(out, out.shape[-1:], w["attn_out_norm"], self.eps)
        hidden = hidden + out
        x = F.rms_norm(hidden, hidden.shape[-1:], w["mlp_in_norm"], self.eps)
        gate, up = _linear(x, w["gate_up"], w.get("gate_up_bias")).chunk(2, dim=-1)  # each [B, T, I]
        out = _linear(_activate(gate, arch.activation) * up, w["down"], w.get("down_bias"))
        if arch.sandwich_norms:
            out = F.rms_norm(out, out.shape[-1:], w["mlp_out_norm"], self.eps)
        return hidden + out

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of q [B, Hq, T, D] over keys/values [B, Hkv, K, D] with mask [B, 1, T, K] -> [B, Hq, T, D]."""
        cap = self.arch.attn_softcap
        if cap is None and _fuses_reductions(q):
            return _attend_by_reductions(q, keys, values, mask, self.scale)
        if cap is None:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)
        groups = self.num_heads // self.num_kv_heads  # soft-capping scores is Gemma 2's eager attention, written out
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        scores = _softcap(q @ keys.transpose(2, 3) * self.scale, cap).masked_fill(~mask, float("-inf"))  # [B, Hq, T, K]
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values


def _fuses_reductions(q: torch.Tensor) -> bool:
    """Whether attention runs as plain reductions (`_attend_by_reductions`): in a graph inductor compiles for a
    CPU, for narrow queries (`NARROW_WIDTH`: decode steps, verifies)."""
    return torch.compiler.is_compiling() and q.device.type == "cpu" and q.shape[2] <= NARROW_WIDTH


def _attend_by_reductions(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Attention written as broadcast products and sums: q [B, Hq, T, D], keys/values [B, Hkv, K, D], mask
    [B, 1, T, K] -> [B, Hq, T, D].

    Inductor fuses each sum with the slot read that feeds it (`KVStore.write_and_read`'s indexed read), so
    keys and values are read once from the store, never copied out; SDPA's CPU kernel takes them copied and
    pays a fixed cost per row and head. Measured on a 2-core EPYC (8 layers, 5 heads of 64, 200 cached
    positions, cold caches): 1 row x 1 token 0.85 vs 1.09 ms, 16 rows x 5 tokens 10.6 vs 53.7 ms; at 16
    tokens a row they are even (1.8 vs 1.6 ms), at 64 SDPA's blocked kernel wins (3.1 vs 5.3 ms). A whole
    target-xl step of 64 rows at 700 cached positions: 103 against 490 ms; of one row: within noise.
    """
    batch, heads, width, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.view(batch, kv_heads, heads // kv_heads, width, 1, dim)  # [B, Hkv, G, T, 1, D]
    scores = (grouped * keys[:, :, None, None]).sum(-1) * scale  # [B, Hkv, G, T, K]
    weights = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)  # mask [B, 1, 1, T, K]
    out = (weights[..., None] * values[:, :, None, None]).sum(-2)  # [B, Hkv, G, T, D]
    return out.view(batch, heads, width, dim)


def _masks(positions: torch.Tensor, key_length: int, windows: set[int | None]) -> dict[int | None, torch.Tensor]:
    """Causal masks [B, 1, T, K] from positions [B, T]: one per window size used (None: the whole prefix)."""
    keys = torch.arange(key_length, device=positions.device)[None, None, :]  # [1, 1, K]
    visible = keys <= positions[:, :, None]  # [B, T, K]
    return {window: (visible if window is None else visible & (keys > positions[:, :, None] - window))[:, None]
            for window in windows}


def _packer(packs: bool, int8: bool):
    """What a matmul weight [in, out] is stored as, where `packs`: quantized to int8 tiles with `int8`, else packed
    where packing is exact; otherwise itself."""
    if not packs:
        return lambda weight: weight
    if int8:
        return lambda weight: packed_linear.quantize(weight) if packed_linear.quantizable(weight) else weight
    return lambda weight: packed_linear.pack(weight) if packed_linear.packable(weight) else weight


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [.., in] @ weight [in, out], or packed (`packed_linear`) (+ bias [out])."""
    if packed_linear.is_packed(weight):
        out = packed_linear.packed_linear(x, weight)
        return out if bias is None else out + bias
    return x @ weight if bias is None else torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)


def _activate(gate: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "silu":
        return F.silu(gate)
    return F.gelu(gate, approximate="tanh" if kind == "gelu_tanh" else "none")


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2), or x unchanged."""
    return x if cap is None else torch.tanh(x / cap) * cap


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, T, h, D] with cos/sin [B, T, R] (rotate-half form) on its first R <= D dimensions."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([_rotate(x[..., :rotary], cos[:, :, 0], sin[:, :, 0]), x[..., rotary:]], dim=-1)
    half = rotary // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
