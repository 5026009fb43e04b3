"""ModelRunner: a causal LM (Llama, Qwen2/3, Mistral, Gemma/Gemma 2, Phi-3) over a preallocated KV store, with exits.

The runner owns its forward pass (in the style of gpt-fast, `actors.forward`)
over the weights of a Hugging Face causal LM of a supported family (`actors.families`), so that

- a batch of sequences with different cached lengths and different numbers of
  new tokens runs in one forward, which can be compiled (`actors.compiled`):
  on exact shapes, or padded up to a shape bucket (`actors.buckets`) where
  the mode wants static shapes;
- every sequence lives in a slot of one `KVStore` taken when it is added and
  given back when it is freed: keys and values are written by position, never
  gathered or grown;
- a row may stop after its first L decoder layers and read the shared final norm
  and LM head there (an *exit*): a sorted multi-exit drafter is one model with
  several nested sub-models sharing a forward;
- rollback is the crop rule of `actors.kv_cache`;
- a drafter's greedy rows may draft several tokens in one call (`draft_greedy`).
"""

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from actors.buckets import MAX_WIDTH, NARROW_WIDTH
from actors.compiled import (DYNAMIC_MODES, FUSED_DRAFT_FEED, FUSED_DRAFT_STEPS, CompileSetting,
                              StepFunction, TunedStep, compile_step, resolve_mode, shape_policy, warm_up,
                              weights_fingerprint)
from actors.errors import InvalidRequest
from actors.forward import DecoderStep
from actors.kv_cache import KVStore, SequenceCache
from actors.loading import load_causal_lm
from actors.prefix_reuse import MIN_SHARED_PREFIX, reusable_length
from actors.trees import depths_of, visibility

SeqId = Hashable
DEFAULT_MAX_SEQUENCES = 64  # slots of a runner built without a say


class RunnerSettings(BaseModel):
    """How a model replica runs: one typed object from the cluster config to the actor that loads it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights and compute dtype.")
    device: str = Field("cpu", description="torch device, e.g. 'cpu' or 'cuda'.")
    max_sequences: int = Field(
        DEFAULT_MAX_SEQUENCES, ge=1, le=4096,
        description="KV-store slots: sequences the replica holds at once (the store is allocated for all of them at load).",
    )
    compile: CompileSetting = Field(
        "auto", description="How the model step runs (actors.compiled): 'auto' compiles on a CPU, where the benchmark "
        "shows it pays ('compile' for a drafter and for a model whose matmul weights are packed, 'compile-tuned' for "
        "one that verifies on MKL's matmuls), and runs eagerly "
        "elsewhere until measured; 'compile-tuned' also freezes the weights and picks each matmul's kernel by timing "
        "(faster steps on CPUs where MKL's few-row GEMMs are slow; about 2 min more at the first start of a "
        "checkpoint, seconds from inductor's cache later); compiling happens at start-up.",
    )
    cpu_kernels: bool = Field(
        True, description="On a CPU with AVX-512 or AVX2, run the project's own kernels (actors.cpu_kernels): float32 matmul "
        "weights that float16 holds exactly stored packed in float16 and multiplied by in float32 (the same values and "
        "arithmetic, half the bytes to read per step, faster than MKL for a few rows), and a step's causal attention "
        "read in place from the KV store. They compile at the first start on a machine (~30 s); no effect elsewhere.",
    )
    drafter_weights: Literal["int8", "exact"] = Field(
        "int8", description="How a drafter replica stores its matmul weights where the project's CPU kernels run: "
        "'int8', quantized per output column (half the bytes of float16 to read per draft step; verification keeps "
        "the output the target's, but a speculative cascade that defers emits the int8 drafter's tokens), or 'exact' "
        "(a cascade then defers to the checkpoint as it is). A target's weights are always exact.",
    )


@dataclass(frozen=True)
class _Chunk:
    """One step's rows: which caches, which of their tokens, at which exit."""

    rows: list[int]  # indices into the forward's rows
    tokens: list[list[int]]
    starts: list[int]  # cached length of each row when the chunk runs
    exits: list[int]


class ModelRunner:
    """Runs one model for many sequences, each in a slot of the replica's KV store."""

    def __init__(self, model: nn.Module, name: str = "model", max_sequences: int = DEFAULT_MAX_SEQUENCES,
                 compile_mode: CompileSetting = "eager", cpu_kernels: bool = True, drafts: bool = False,
                 int8_weights: bool = False):
        """`compile_mode` 'auto' resolves for this model on its device (`resolve_mode`): whether it `drafts`, and
        whether every matmul weight packed. `int8_weights` only for a drafter (`RunnerSettings.drafter_weights`)."""
        if int8_weights and not drafts:
            raise InvalidRequest("only a drafter may store its weights in int8: a target's must stay exact")
        model.eval().requires_grad_(False)
        self.name = name
        config = model.config
        self.num_layers: int = config.num_hidden_layers
        self.vocab_size: int = model.lm_head.out_features
        self.max_context: int = config.max_position_embeddings
        self.eos_token_id: int | None = _first_id(config.eos_token_id)
        param = next(model.parameters())
        self._device = param.device
        capacity = self.max_context + MAX_WIDTH  # room for padded queries past the context
        self.step = DecoderStep(model, capacity, cpu_kernels, int8_weights)  # keeps the weights it needs; the unfused ones go with `model`
        self.exit_layers: list[int] = list(getattr(config, "exit_layers", None) or [self.num_layers])
        self.store = KVStore(self.num_layers, max_sequences, capacity, self.step.num_kv_heads, self.step.head_dim,
                             param.dtype, param.device)
        self.compile_mode = compile_mode = resolve_mode(compile_mode, self._device.type, drafts,
                                                        self.step.packs_every_matmul)
        fingerprint = weights_fingerprint(list(self.step.buffers())) if compile_mode == "compile-tuned" else ""
        self._run: StepFunction = compile_step(self.step.forward, compile_mode, fingerprint)
        self._run_last: StepFunction = compile_step(self.step.forward_last, compile_mode, fingerprint)
        self._draft: StepFunction = compile_step(self.step.draft_greedy, compile_mode, fingerprint)
        self._run_tree: StepFunction = compile_step(self.step.forward_tree, compile_mode, fingerprint)
        self.shapes = shape_policy(compile_mode)
        # fused drafts run on exact shapes: padded, every key length would be a graph of its own
        self.fused_draft_steps: tuple[int, ...] = () if self.shapes.bucketed else FUSED_DRAFT_STEPS
        self._caches: dict[SeqId, SequenceCache] = {}
        self.warm_up_s = 0.0  # seconds spent compiling at start-up (`warm_up`)

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", device: str = "cpu",
                        max_sequences: int = DEFAULT_MAX_SEQUENCES, compile_mode: CompileSetting = "eager",
                        cpu_kernels: bool = True, drafts: bool = False, int8_weights: bool = False) -> "ModelRunner":
        """Load a local Hugging Face checkpoint (config.json + safetensors)."""
        return cls(load_causal_lm(path, dtype, device), str(path), max_sequences, compile_mode, cpu_kernels, drafts,
                   int8_weights)

    @classmethod
    def serving(cls, path: str, settings: RunnerSettings, drafts: bool = False, trees: bool = False) -> "ModelRunner":
        """Load a checkpoint as a served replica: its settings resolved, every graph compiled before it returns
        (with `drafts`, also those of fused greedy drafting; with `trees`, those of token trees)."""
        runner = cls.from_pretrained(path, settings.dtype, settings.device, settings.max_sequences, settings.compile,
                                     settings.cpu_kernels, drafts, drafts and settings.drafter_weights == "int8")
        runner.warm_up_s = runner.warm_up(drafts, trees)
        return runner

    # -- sequence bookkeeping -------------------------------------------------

    def add_sequence(self, seq_id: SeqId) -> None:
        """Give a sequence a slot; `CapacityExhausted` when every slot is taken."""
        if seq_id in self._caches:
            raise InvalidRequest(f"sequence {seq_id!r} already exists in {self.name}")
        self._caches[seq_id] = SequenceCache(self.store.take())

    def free(self, seq_id: SeqId) -> None:
        """Give a sequence's slot back; freeing an unknown sequence is a no-op."""
        cache = self._caches.pop(seq_id, None)
        if cache is not None:
            self.store.give_back(cache.slot)

    def has_sequence(self, seq_id: SeqId) -> bool:
        return seq_id in self._caches

    @property
    def num_sequences(self) -> int:
        return len(self._caches)

    def cached_length(self, seq_id: SeqId) -> int:
        return len(self._cache(seq_id))

    def cached_tokens(self, seq_id: SeqId) -> list[int]:
        """A copy of the tokens whose keys and values a sequence's cache holds."""
        return list(self._cache(seq_id).tokens)

    def cached_depth(self, seq_id: SeqId) -> int:
        """Layers whose cache covers every cached token of a sequence."""
        return self._cache(seq_id).depth

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
        scoring the token that follows the j-th new token. Inputs longer than
        `MAX_WIDTH` tokens (prompts) run in chunks of that many.
        """
        exits = list(exits) if exits is not None else [self.num_layers] * len(seq_ids)
        if last_only:
            new_tokens, later = self._take_prefixes(seq_ids, new_tokens, exits)
            if later:  # they copy their prefix from a row of this call once it is cached
                return self._forward_in_two_parts(seq_ids, new_tokens, exits, later)
        caches = [self._cache(s) for s in seq_ids]
        asked = [len(t) for t in new_tokens]  # a re-prefilled row scores more tokens than asked for
        rows = [self._prepare_row(c, list(t), e) for c, t, e in zip(caches, new_tokens, exits)]
        pieces: list[list[torch.Tensor]] = [[] for _ in rows]
        for chunk in self._chunks(caches, rows, exits):
            logits = self._step(chunk, caches, last_only)
            for i, row in enumerate(chunk.rows):
                pieces[row].append(logits[i : i + 1] if last_only else logits[i, : len(chunk.tokens[i])])
                caches[row].extend(chunk.tokens[i], chunk.exits[i])
        if last_only:
            return [p[-1] for p in pieces]  # the row's last chunk holds its last token
        return [torch.cat(p)[-n:] for p, n in zip(pieces, asked)]

    @torch.inference_mode()
    def draft_greedy(self, seq_ids: Sequence[SeqId], feeds: Sequence[Sequence[int]], exits: Sequence[int],
                     steps: int) -> tuple[list[list[int]], list[list[float]]]:
        """`steps` greedy tokens per sequence in one call: row i first feeds `feeds[i]`, its uncached tokens
        (`FUSED_DRAFT_FEED` of them in every row). Returns the tokens of each row and their probabilities
        under the drafter.

        Each cache must already reach its row's exit (no re-prefill here). Afterwards the
        caches hold what single-token forwards would leave: the fed tokens and every
        drafted token but the last.
        """
        if any(len(feed) != FUSED_DRAFT_FEED for feed in feeds):
            raise InvalidRequest(f"a fused draft feeds {FUSED_DRAFT_FEED} tokens a row")
        caches = [self._cache(s) for s in seq_ids]
        for cache, feed, exit_layer in zip(caches, feeds, exits):
            self._check_row(cache, list(feed), exit_layer, written=len(feed) - 1 + steps)  # the feed, steps - 1 drafts
            if exit_layer > cache.depth:
                raise InvalidRequest(f"exit {exit_layer} is deeper than a cache of {self.name} reaches: draft a step first")
        starts = [len(c) for c in caches]
        on_device = lambda values: torch.tensor(values).to(self._device)
        drafted, top = self._draft(self.store, on_device(feeds), _feed_positions(on_device(starts)),
                                   on_device([c.slot for c in caches]), on_device(exits), max(starts) + FUSED_DRAFT_FEED,
                                   max(exits), steps)  # each [B, steps]
        rows = drafted.tolist()
        for cache, feed, exit_layer, row in zip(caches, feeds, exits, rows):
            cache.extend(list(feed) + row[:-1], exit_layer)
        return rows, top.tolist()

    @torch.inference_mode()
    def forward_tree(self, seq_ids: Sequence[SeqId], new_tokens: Sequence[Sequence[int]], region_starts: Sequence[int],
                     region_parents: Sequence[Sequence[int]], exits: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Append tree tokens to each sequence and score them, all rows in one pass (`actors.trees`).

        Row i's region is its cache from `region_starts[i]` on followed by `new_tokens[i]`;
        `region_parents[i]` names each region entry's parent (an offset into the region, -1:
        none), old entries and new. A new token sees the cache before the region and, in the
        region, its ancestors and itself; its rotary position is the region start plus its
        depth. Returns per row the logits [n_i, V] of its new tokens.
        """
        exits = list(exits) if exits is not None else [self.num_layers] * len(seq_ids)
        caches = [self._cache(s) for s in seq_ids]
        for cache, tokens, start, parents, exit_layer in zip(caches, new_tokens, region_starts, region_parents, exits):
            self._check_tree_row(cache, list(tokens), start, list(parents), exit_layer)
        logits = self._call_tree(_tree_inputs(new_tokens, region_starts, region_parents), [c.slot for c in caches],
                                 exits, list(region_starts))  # [B, T, V]
        for cache, tokens, exit_layer in zip(caches, new_tokens, exits):
            cache.extend(list(tokens), exit_layer, chain=False)
        return [logits[i, : len(tokens)] for i, tokens in enumerate(new_tokens)]

    def _call_tree(self, inputs: "_TreeInputs", slots: list[int], exits: list[int], starts: list[int]) -> torch.Tensor:
        on_device = lambda tensor: tensor.to(self._device)
        return self._run_tree(self.store, *map(on_device, (inputs.ids, inputs.positions, inputs.writes,
                                                             torch.tensor(slots), torch.tensor(exits), torch.tensor(starts),
                                                             inputs.region_positions, inputs.visible)),
                              inputs.key_length, max(exits))

    def keep_path(self, seq_id: SeqId, region_start: int, path: list[int]) -> None:
        """Keep a sequence's cache before `region_start` and the region entries at offsets `path` (ascending),
        moved up to follow it: the accepted path of a tree, compacted into place."""
        cache = self._cache(seq_id)
        moves = cache.keep_path(region_start, path)
        if moves:
            self.store.move(cache.slot, [a for a, _ in moves], [b for _, b in moves])

    def _check_tree_row(self, cache: SequenceCache, tokens: list[int], start: int, parents: list[int],
                        exit_layer: int) -> None:
        self._check_row(cache, tokens, exit_layer, written=len(tokens))
        if exit_layer > cache.depth and len(cache):
            raise InvalidRequest(f"exit {exit_layer} is deeper than a cache of {self.name} reaches: feed a chain first")
        if len(tokens) > MAX_WIDTH or start + len(parents) != len(cache) + len(tokens):
            raise InvalidRequest(f"a tree row of {len(tokens)} tokens must end a region of {len(parents)} entries "
                                 f"from {start} on a cache of {len(cache)} (and hold at most {MAX_WIDTH} tokens)")
        if any(not -1 <= p < i for i, p in enumerate(parents)):
            raise InvalidRequest("a tree's parents must come before their children")

    def _take_prefixes(self, seq_ids: Sequence[SeqId], new_tokens: Sequence[Sequence[int]],
                       exits: list[int]) -> tuple[list[list[int]], set[int]]:
        """Every row checked first; then fresh rows copy the longest prompt prefix a live cache holds
        (`actors.prefix_reuse`). Returns each row's tokens still to compute, and the rows that should wait
        for an earlier row of the call to compute a prefix they share."""
        caches = [self._cache(s) for s in seq_ids]
        rows = [list(t) for t in new_tokens]
        for cache, tokens, exit_layer in zip(caches, rows, exits):
            self._check_row(cache, tokens, exit_layer, written=len(tokens))
        rows = [self._copy_prefix(c, t, e) for c, t, e in zip(caches, rows, exits)]
        return rows, _prefix_followers(caches, rows, exits)

    def _copy_prefix(self, cache: SequenceCache, tokens: list[int], exit_layer: int) -> list[int]:
        if len(cache) or len(tokens) <= MIN_SHARED_PREFIX:
            return tokens
        donors = [c for c in self._caches.values() if c is not cache]
        length, donor = max(((reusable_length(d, tokens, exit_layer), d) for d in donors), default=(0, None),
                            key=lambda pair: pair[0])
        if not length:
            return tokens
        self.store.copy_prefix(donor.slot, cache.slot, length, donor.depth)
        cache.adopt(donor, length)
        return tokens[length:]

    def _forward_in_two_parts(self, seq_ids, new_tokens, exits, later: set[int]) -> list[torch.Tensor]:
        """`forward(last_only=True)` of the rows not in `later`, then of those (which then copy a prefix)."""
        first = [i for i in range(len(seq_ids)) if i not in later]
        results = {}
        for part in (first, sorted(later)):
            pick = lambda values: [values[i] for i in part]
            results.update(zip(part, self.forward(pick(seq_ids), pick(new_tokens), pick(exits), last_only=True)))
        return [results[i] for i in range(len(seq_ids))]

    def _cache(self, seq_id: SeqId) -> SequenceCache:
        try:
            return self._caches[seq_id]
        except KeyError:
            raise InvalidRequest(f"unknown sequence {seq_id!r} in {self.name}") from None

    def _prepare_row(self, cache: SequenceCache, tokens: list[int], exit_layer: int) -> list[int]:
        """Validate one row; re-prefill it when its exit is deeper than its cache reaches."""
        self._check_row(cache, tokens, exit_layer, written=len(tokens))
        if exit_layer > cache.depth and len(cache):
            tokens = cache.tokens + tokens
            cache.reset(exit_layer)
        return tokens

    def _check_row(self, cache: SequenceCache, tokens: list[int], exit_layer: int, written: int) -> None:
        """A row's exit, new tokens and context room: `written` tokens will enter its cache."""
        self.check_exit(exit_layer)
        if not tokens:
            raise InvalidRequest("a forward needs at least one new token per sequence")
        if not all(0 <= t < self.vocab_size for t in tokens):
            raise InvalidRequest(f"token ids must lie in [0, {self.vocab_size}) for {self.name}")
        if len(cache) + written > self.max_context:
            raise InvalidRequest(f"{len(cache) + written} tokens exceed the context of {self.max_context} of {self.name}")

    @staticmethod
    def _chunks(caches: list[SequenceCache], rows: list[list[int]], exits: list[int]) -> list[_Chunk]:
        """Split the rows' tokens into steps of at most `MAX_WIDTH` new tokens per row."""
        chunks = []
        for offset in range(0, max(len(t) for t in rows), MAX_WIDTH):
            members = [i for i, t in enumerate(rows) if len(t) > offset]
            chunks.append(_Chunk(members, [rows[i][offset : offset + MAX_WIDTH] for i in members],
                                 [len(caches[i]) + offset for i in members], [exits[i] for i in members]))
        return chunks

    def _step(self, chunk: _Chunk, caches: list[SequenceCache], last_only: bool) -> torch.Tensor:
        """One step of the model for a chunk: [b, V] with `last_only`, else [b, T, V] (b, T as the shape policy pads)."""
        count = len(chunk.rows)
        batch = self.shapes.batch(count)
        width = self.shapes.width(max(len(t) for t in chunk.tokens))
        pad = batch - count
        ids = torch.tensor([t + [0] * (width - len(t)) for t in chunk.tokens] + [[0] * width] * pad)  # [b, T]
        starts = torch.tensor(chunk.starts + [0] * pad)
        slots = torch.tensor([caches[r].slot for r in chunk.rows] + [self.store.scratch_slot] * pad)
        depth = max(chunk.exits)
        exits = torch.tensor(chunk.exits + [depth] * pad)
        keys = self.shapes.keys(max(s + len(t) for s, t in zip(chunk.starts, chunk.tokens)), self.store.positions)
        if not last_only:
            return self._call(ids, starts, slots, exits, keys, depth)  # [b, T, V]
        last = torch.tensor([len(t) - 1 for t in chunk.tokens] + [0] * pad)  # [b]
        if width > NARROW_WIDTH:  # a prompt's chunk: the head only where it is read
            return self._call(ids, starts, slots, exits, keys, depth, last)[:count, 0]  # [count, V]
        return self._call(ids, starts, slots, exits, keys, depth)[torch.arange(count), last[:count]]  # [count, V]

    def _call(self, ids, starts, slots, exits, keys: int, depth: int, last: torch.Tensor | None = None) -> torch.Tensor:
        """The step over ids [b, T] from `starts` [b]: logits [b, T, V], or with `last` [b] those of that token
        of each row, [b, 1, V]."""
        device = self._device
        positions = starts[:, None] + torch.arange(ids.shape[1])[None, :]  # [b, T]; padding runs past a row's end
        inputs = (self.store, ids.to(device), positions.to(device), slots.to(device), exits.to(device), keys, depth)
        return self._run(*inputs) if last is None else self._run_last(*inputs, last.to(device))

    def warm_up(self, drafts: bool = False, trees: bool = False) -> float:
        """Compile the graphs of every exit the model declares (a dynamic-shape runner), with `drafts` also its
        fused greedy drafts, with `trees` its tree steps; returns the seconds it took.

        Another exit still works, at the cost of a compile the first time a request asks for it.
        """
        if self.compile_mode not in DYNAMIC_MODES:
            return 0.0
        full = lambda batch, value: torch.full((batch,), value, dtype=torch.long)

        def scratch_step(batch: int, width: int, start: int, depth: int, last_only: bool = False) -> None:
            with torch.inference_mode():
                self._call(torch.zeros(batch, width, dtype=torch.long), full(batch, start),
                           full(batch, self.store.scratch_slot), full(batch, depth), start + width, depth,
                           full(batch, width - 1) if last_only else None)

        def scratch_draft(batch: int, steps: int, start: int, depth: int) -> None:
            on_device = lambda value: full(batch, value).to(self._device)
            with torch.inference_mode():
                feeds = torch.zeros(batch, FUSED_DRAFT_FEED, dtype=torch.long).to(self._device)
                self._draft(self.store, feeds, _feed_positions(on_device(start)), on_device(self.store.scratch_slot),
                            on_device(depth), start + FUSED_DRAFT_FEED, depth, steps)

        def scratch_tree(batch: int, width: int, region: int, depth: int) -> None:
            parents = [list(range(-1, region - 1))] * batch  # any tree will do: the graph depends on sizes only
            with torch.inference_mode():
                self._call_tree(_tree_inputs([[0] * width] * batch, [8] * batch, parents),
                                [self.store.scratch_slot] * batch, [depth] * batch, [8] * batch)

        seconds = warm_up(scratch_step, sorted(set(self.exit_layers)), scratch_draft if drafts else None,
                          scratch_tree if trees else None)
        for step in (self._run, self._run_last, self._draft, self._run_tree):
            if isinstance(step, TunedStep):
                step.settle()
        return seconds


def _feed_positions(starts: torch.Tensor) -> torch.Tensor:
    """Positions [B, W] of a fused draft's first feed, from each row's cached length starts [B]."""
    return starts[:, None] + torch.arange(FUSED_DRAFT_FEED, device=starts.device)


@dataclass(frozen=True)
class _TreeInputs:
    """A tree step's tensors: ids, positions (rotary), writes (cache positions) [B, T]; region_positions [B, R];
    visible [B, T, R]."""

    ids: torch.Tensor
    positions: torch.Tensor
    writes: torch.Tensor
    region_positions: torch.Tensor
    visible: torch.Tensor
    key_length: int


def _tree_inputs(new_tokens: Sequence[Sequence[int]], starts: Sequence[int],
                 parents: Sequence[Sequence[int]]) -> _TreeInputs:
    """Rows padded to the widest: a padding token writes past its row's region and sees only itself there."""
    width = max(len(t) for t in new_tokens)
    region = max(len(p) + width - len(t) for t, p in zip(new_tokens, parents))
    batch = len(new_tokens)
    ids, positions, writes = (torch.zeros(batch, width, dtype=torch.long) for _ in range(3))
    region_positions = torch.zeros(batch, region, dtype=torch.long)
    visible = torch.zeros(batch, width, region, dtype=torch.bool)
    for i, (tokens, start, row_parents) in enumerate(zip(new_tokens, starts, parents)):
        entries, fed = len(row_parents), len(tokens)
        first = entries - fed  # region offset of the first new token
        padded = entries + width - fed  # the row's region with its padding tokens
        depths = torch.tensor(depths_of(list(row_parents)) + list(range(entries, padded)))  # padding: past any depth
        region_positions[i, :padded] = start + depths
        ids[i, :fed] = torch.tensor(list(tokens))
        positions[i] = start + depths[first:]
        writes[i] = start + torch.arange(first, padded)
        visible[i, :fed, :entries] = visibility(list(row_parents))[first:]
        visible[i, torch.arange(fed, width), torch.arange(entries, padded)] = True
    key_length = max(start + len(p) + width - len(t) for t, start, p in zip(new_tokens, starts, parents))
    return _TreeInputs(ids, positions, writes, region_positions, visible, key_length)


def _prefix_followers(caches: list[SequenceCache], rows: list[list[int]], exits: list[int]) -> set[int]:
    """Fresh rows of one call that share a prefix with an earlier fresh row (a leader, itself no follower)."""
    leaders: list[SequenceCache] = []  # what each leader's cache will hold once computed
    followers = set()
    for index, (cache, tokens, exit_layer) in enumerate(zip(caches, rows, exits)):
        if len(cache) or len(tokens) <= MIN_SHARED_PREFIX:
            continue
        if any(reusable_length(leader, tokens, exit_layer) for leader in leaders):
            followers.add(index)
        else:
            leaders.append(SequenceCache(cache.slot, list(tokens), exit_layer, len(tokens)))
    return followers


def _first_id(token_id) -> int | None:
    if isinstance(token_id, (list, tuple)):
        return token_id[0] if token_id else None
    return token_id
