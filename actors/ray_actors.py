"""The Ray actors of the data plane: a shared drafter and the targets it serves.

`DrafterActor` hosts a multi-exit drafter for any number of targets and merges
their concurrent draft calls into one forward per draft step (`DraftBatcher`).
`TargetActor` hosts a target and owns the speculation loop of its sequences
(fewest hops: the verifier asks for drafts, nobody relays them), reaching its
drafter through `RemoteDrafter`. If the drafter dies or stalls, the loop drops
it and decodes plainly (see `SpeculationEngine`), so no stream is lost.
"""

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.cpu_affinity import loading_then_model_cpus
from actors.draft_batcher import DraftBatcher
from actors.draft_channel import ChannelAddress, ChannelClient, ChannelServer
from actors.drafters import GREEDY_CUTOFF, PROMPT_WINDOW, Draft, DraftRequest, Drafter, ModelDrafter
from actors.engine import SequenceUpdate, SpeculationEngine
from actors.engine_loop import EngineLoop, Feed, FeedMessage, StreamPacing, take_update
from actors.errors import CapacityExhausted, DrafterUnavailable, InvalidRequest
from actors.foreign_drafter import pair_drafter
from actors.loading import load_tokenizer
from actors.overlap import OverlappedEngine
from actors.runner import ModelRunner, RunnerSettings, SeqId
from actors.sampling import SamplingParams
from actors.speculation import FOLLOW_PLAN, SpeculationSpec
from actors.trees import TreeShape

log = logging.getLogger(__name__)
# Messages of one stream or feed that may wait unread before `TargetActor.generate` or `TargetActor.feed` pauses. Ray
# closes a paused generator whose caller died (without backpressure it would run on), so a front door's death cancels
# its streams.
STREAM_BACKPRESSURE = 4


def runner_info(runner: ModelRunner) -> dict:
    """What a replica reports of how its model runs: compile mode, KV slots, start-up compile seconds."""
    return {"compile_mode": runner.compile_mode, "max_sequences": runner.store.num_slots, "warm_up_s": runner.warm_up_s}


def drafter_info(runner: ModelRunner, exit_layers: list[int], max_exit: int) -> dict:
    """What a drafter's (or a chain stage's) targets and front doors read of it: its exits, vocabulary and context."""
    return {"vocab_size": runner.vocab_size, "path": runner.name, "exit_layers": exit_layers, "max_exit": max_exit,
            "max_context": runner.max_context, **runner_info(runner)}


def actor_id(handle) -> str:
    """A Ray actor handle's actor id, comparable across processes (handles themselves are not)."""
    return handle._actor_id.hex()


class FleetMember:
    """What a controller asks of any actor of its fleet (each one hosts a model): which controller owns it now.

    A restarted controller claims the actors it adopts, so a stopping
    controller removes only the actors still its own (see `FleetController.shutdown`).
    Each serves on the machine's model CPUs, when the cluster planned them (`load_runner`, `actors.cpu_affinity`).
    """

    _owner = ""

    @staticmethod
    def load_runner(path: str, settings: RunnerSettings, **graphs) -> ModelRunner:
        """The actor's model, loaded and compiled on every CPU of the layout; the actor then runs on the model CPUs.
        `graphs`: which graphs `ModelRunner.serving` compiles besides the step."""
        with loading_then_model_cpus():
            return ModelRunner.serving(path, settings, **graphs)

    def claim(self, owner: str) -> None:
        self._owner = owner

    def owner(self) -> str:
        return self._owner


class DraftService(FleetMember):
    """The remote interface of anything that drafts for targets: a drafter, or a stage of a chain.

    Subclasses set `batcher` (merging concurrent calls from many targets into
    one forward per draft step), `runner` (the model whose sequences are live
    here) and `exit_layers` (the exits callers choose among).
    """

    batcher: DraftBatcher
    runner: ModelRunner
    exit_layers: list[int]
    max_exit: int  # the deepest exit a caller may ask for (exits run 1..max_exit)
    _channel: ChannelServer | None = None

    def channel(self) -> ChannelAddress:
        """Where targets on this machine reach this service without Ray calls (started at the first ask)."""
        if self._channel is None:
            self._channel = ChannelServer(self)
        return self._channel.address

    def info(self) -> dict:
        return {**drafter_info(self.runner, self.exit_layers, self.max_exit),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def __init__(self):
        self._owners: dict[SeqId, str] = {}  # sequence -> actor id of the target or stage that started it

    def start(self, seq_id: SeqId, prompt: list[int], params: SamplingParams, owner: str = "") -> None:
        self.batcher.start(seq_id, prompt, params)
        self._owners[seq_id] = owner

    def propose(self, commits: list[tuple[SeqId, list[int], int]], requests: Sequence[DraftRequest]) -> list[Draft]:
        """Apply the caller's pending commits (sequence, emitted ids, ids to rewind first), then draft (batched with
        other callers)."""
        for seq_id, emitted, rewind in commits:
            self.batcher.commit(seq_id, emitted, rewind)
        return self.batcher.propose(requests)

    def finish(self, seq_ids: list[SeqId]) -> None:
        for seq_id in seq_ids:
            self.batcher.finish(seq_id)
            self._owners.pop(seq_id, None)

    def drop_owner(self, owner: str) -> int:
        """Free the sequences that `owner` (the actor id of a target or stage that died) started: nobody
        else would ever finish them. Returns how many."""
        seq_ids = [seq_id for seq_id, started_by in list(self._owners.items()) if started_by == owner]
        self.finish(seq_ids)
        return len(seq_ids)

    def live_sequences(self) -> int:
        return self.runner.num_sequences

    def batched_forwards(self) -> int:
        return self.batcher.forwards


class DrafterActor(DraftService):
    """A multi-exit drafter shared by many targets (wrapped with `ray.remote` at placement)."""

    def __init__(self, path: str, settings: RunnerSettings, trees: bool = False, greedy_cutoff: float = GREEDY_CUTOFF,
                 prompt_window: int | None = PROMPT_WINDOW):
        """`trees`: some target may ask for token trees (their steps are compiled at start-up too);
        `greedy_cutoff`, `prompt_window`: see `ModelDrafter`."""
        super().__init__()
        self.runner = self.load_runner(path, settings, drafts=True, trees=trees)
        self.exit_layers, self.max_exit = self.runner.exit_layers, self.runner.num_layers
        self.batcher = DraftBatcher(ModelDrafter(self.runner, greedy_cutoff, prompt_window))


class RayCalls:
    """Calls on a drafter actor through Ray (any node); answers as `ChannelClient`'s, errors mapped the same way."""

    def __init__(self, handle):
        self.handle = handle

    def call(self, method: str, *args) -> "_RayReply":
        return _RayReply(getattr(self.handle, method).remote(*args))


class _RayReply:
    def __init__(self, ref: ray.ObjectRef):
        self.ref = ref

    def done(self) -> bool:
        return bool(ray.wait([self.ref], timeout=0)[0])

    def wait(self, timeout_s: float) -> None:
        ray.wait([self.ref], timeout=timeout_s)  # a dead or stalled actor fails at `result`

    def result(self, timeout_s: float):
        """A full drafter raises `CapacityExhausted` as a local one does; a dead, stalled or failing one
        `DrafterUnavailable` (the engine then decodes plainly), never Ray's error text."""
        try:
            return ray.get(self.ref, timeout=timeout_s)
        except (RayActorError, GetTimeoutError) as err:
            raise DrafterUnavailable(f"drafter actor failed: {type(err).__name__}") from None
        except RayTaskError as err:
            if isinstance(err.cause, CapacityExhausted):
                raise CapacityExhausted(str(err.cause)) from None
            raise DrafterUnavailable(f"drafter call failed: {type(err.cause).__name__}") from None


class RemoteDrafter(Drafter):
    """A `Drafter` backed by a `DraftService` actor; any failure surfaces as `DrafterUnavailable`.

    Calls go through `calls`: Ray (`RayCalls`), or the loopback channel of a
    drafter on the same machine (`ChannelClient`, see `connect_drafter`).
    Commits are buffered and ride along with the next proposal, so a round
    costs one remote call, not one per sequence. `propose_async` returns while
    the actor drafts (see `OverlappedEngine`); at most one proposal is in
    flight, a new one first waits until the last has run.

    Through Ray the actor serves calls on many threads, so a `finish` sent while
    a proposal naming the sequence (in its requests or commits) is in flight could
    run first, and fail that proposal along with every other target's merged into
    its forward. Such a `finish` therefore waits until the proposal has run.
    A finish is otherwise not waited for; but a `start` reusing the id of a
    sequence whose finish may still be queued waits for that finish, which could
    else run after the start and free the new sequence. (A channel serves its calls
    in order, so these waits find them already done.)
    """

    def __init__(self, handle, info: dict, timeout_s: float, calls: "RayCalls | ChannelClient | None" = None,
                 owner: str = ""):
        """`owner`: the caller's actor id, recorded with each sequence it starts (see `DraftService.drop_owner`)."""
        self.timeout_s, self.owner = timeout_s, owner
        self.calls = calls or RayCalls(handle)
        self.vocab_size, self.path = info["vocab_size"], info["path"]  # the path of the model whose ids it reads
        self.exit_layers, self.max_exit = info["exit_layers"], info["max_exit"]
        self.default_exit = max(self.exit_layers)
        self._commits: list[tuple[SeqId, list[int], int]] = []
        self._in_flight: tuple[object, set[SeqId]] | None = None  # the last proposal's reply and whom it names
        self._finishing: dict[SeqId, object] = {}  # replies of finishes sent, not yet seen done

    def check_exit(self, exit_layer: int) -> None:
        """Checked against what the actor said at pairing: no remote call on the target's loop thread."""
        if not 1 <= exit_layer <= self.max_exit:
            raise InvalidRequest(f"exit {exit_layer} is outside the drafter's exits 1..{self.max_exit}")

    def start(self, seq_id: SeqId, prompt: list[int], params: SamplingParams) -> None:
        finishing = self._finishing.pop(seq_id, None)
        if finishing is not None:
            finishing.wait(self.timeout_s)  # a dead or stalled actor fails at the start below
        self.calls.call("start", seq_id, prompt, params, self.owner).result(self.timeout_s)

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return self.propose_async(requests).result()

    def propose_async(self, requests: Sequence[DraftRequest]) -> "RemoteDrafts":
        self._settle()
        commits, self._commits = self._commits, []
        reply = self.calls.call("propose", commits, list(requests))
        self._in_flight = (reply, {r.seq_id for r in requests} | {commit[0] for commit in commits})
        return RemoteDrafts(self, reply)

    def fetch(self, reply) -> list[Draft]:
        """The drafts of a proposal made here; it is no longer in flight."""
        try:
            return reply.result(self.timeout_s)
        finally:
            if self._in_flight is not None and self._in_flight[0] is reply:
                self._in_flight = None

    def commit(self, seq_id: SeqId, emitted: list[int], rewind: int = 0) -> None:
        self._commits.append((seq_id, emitted, rewind))

    def finish(self, seq_id: SeqId) -> None:
        self._commits = [c for c in self._commits if c[0] != seq_id]
        if self._in_flight is not None and seq_id in self._in_flight[1]:
            self._settle()
        self._finishing = {s: reply for s, reply in self._finishing.items() if not reply.done()}
        self._finishing[seq_id] = self.calls.call("finish", [seq_id])  # the caller need not wait for the free

    def _settle(self) -> None:
        """Wait until the proposal in flight has run on the actor (its drafts stay there to be fetched)."""
        if self._in_flight is not None:
            self._in_flight[0].wait(self.timeout_s)  # a dead or stalled actor fails at `result`
            self._in_flight = None


class RemoteDrafts:
    """A proposal in flight on a drafter actor (`reply`): `result()` waits for its drafts."""

    def __init__(self, drafter: RemoteDrafter, reply):
        self.drafter, self.reply = drafter, reply

    def result(self) -> list[Draft]:
        return self.drafter.fetch(self.reply)


def connect_drafter(handle, timeout_s: float, direct: bool) -> RemoteDrafter:
    """A `RemoteDrafter` for a drafter actor: through its loopback channel when `direct` and it shares this
    process's loopback interface (a Ray call costs about a forward here), else through Ray."""
    info = ray.get(handle.info.remote())  # waits while the drafter loads its model
    calls = None
    if direct:
        address = ray.get(handle.channel.remote(), timeout=timeout_s)
        if address.reachable():
            try:
                calls = ChannelClient(address, timeout_s)
            except OSError as err:
                log.warning("drafter channel unreachable (%s); drafting through Ray calls", type(err).__name__)
    return RemoteDrafter(handle, info, timeout_s, calls, owner=ray.get_runtime_context().get_actor_id() or "")


@dataclass(frozen=True)
class EmbeddedDrafter:
    """A drafter a target replica loads into its own process (`DrafterConfig.placement` 'embedded'): drafting is
    then a call, not a hop to another process on the same CPU. `greedy_cutoff`, `prompt_window`: see `ModelDrafter`."""

    path: str
    settings: RunnerSettings
    greedy_cutoff: float
    prompt_window: int | None


class TargetActor(FleetMember):
    """A target model and the speculation loop of its sequences (wrapped with `ray.remote`).

    The controller steers it between rounds, without pausing its streams:
    `set_plan` (draft length and exit), `set_drafter` (a replacement or
    re-paired drafter replica), and reads its rounds with `drain_telemetry`.
    """

    def __init__(self, path: str, settings: RunnerSettings, drafter_handle, exit_layer: int | None, k: int,
                 timeout_s: float, name: str = "", drafter_name: str = "", overlap_rounds: bool = False,
                 max_waiting: int | None = None, pacing: StreamPacing = StreamPacing(), direct_drafter: bool = False,
                 tree: TreeShape | None = None, trees: bool = False, embedded_drafter: EmbeddedDrafter | None = None):
        """`overlap_rounds`: draft one group of sequences while verifying the other (`OverlappedEngine`);
        `max_waiting`: sequences that may wait for a KV slot (beyond it, `CapacityExhausted`);
        `pacing`: how long the engine loop merges a sequence's rounds into one update;
        `direct_drafter`: reach a drafter on this machine through its loopback channel (`connect_drafter`);
        `tree`: the plan drafts token trees of this shape; `trees`: sequences may draft trees (compiled at start-up);
        `embedded_drafter`: draft with this drafter in this process instead of `drafter_handle`'s actor."""
        runner = self.load_runner(path, settings, trees=trees)
        self.timeout_s, self.direct_drafter, self.path, self.vocab_size = timeout_s, direct_drafter, path, runner.vocab_size
        self.drafter_handle = drafter_handle
        self.embedded_info: dict | None = None  # the embedded drafter's `drafter_info`
        if embedded_drafter is not None:
            drafter = self._embedded_drafter(embedded_drafter, trees)
        else:
            drafter = self._remote_drafter(drafter_handle)
        engine_class = OverlappedEngine if overlap_rounds else SpeculationEngine
        self.loop = EngineLoop(engine_class(runner, drafter, k, exit_layer, name, drafter_name, max_waiting=max_waiting,
                                            tree=tree), pacing)
        self._door_feeds: dict[str, Feed] = {}  # front door id -> the feed of the sequences it submitted

    def info(self) -> dict:
        runner = self.loop.engine.target
        embedded = {} if self.embedded_info is None else {"embedded_drafter": self.embedded_info}
        return {"vocab_size": runner.vocab_size, "max_context": runner.max_context, "eos_token_id": runner.eos_token_id,
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), **runner_info(runner), **embedded}

    def generate(self, seq_id: SeqId, prompt: list[int], params: SamplingParams,
                 spec: SpeculationSpec = FOLLOW_PLAN) -> Iterator[SequenceUpdate]:
        """Stream one sequence's updates, the last with its finish reason (a front door uses `submit` and `feed`).

        `spec` may override k (0: plain decoding) and the exit for this sequence, or cascade it.
        The first update goes out as soon as it exists (time to first token); later rounds
        are merged by the engine loop into one update per interval (`StreamPacing`: each
        update is a Ray object and a wake-up of the caller).

        Called with Ray's generator backpressure (`STREAM_BACKPRESSURE`), the generator is closed when
        its caller's process dies: the sequence is then cancelled here, and so freed on the drafter too,
        instead of decoding on for nobody.
        """
        feed, finished = self.loop.submit(seq_id, prompt, params, spec), False
        try:
            while not finished:
                for _, item in feed.output.get():
                    update = take_update(item)
                    finished = update.finish_reason is not None
                    yield update
        finally:
            if not finished:
                self.loop.cancel(seq_id)

    def submit(self, door: str, seq_id: SeqId, prompt: list[int], params: SamplingParams,
               spec: SpeculationSpec = FOLLOW_PLAN) -> None:
        """Start a sequence whose updates (or the error that refuses it) go out on front door `door`'s feed."""
        self.loop.submit(seq_id, prompt, params, spec, self._door_feed(door))

    def feed(self, door: str) -> Iterator[FeedMessage]:
        """Stream the updates of every sequence front door `door` submits here: one message per round at most
        (merged per `StreamPacing`), whatever the number of its sequences.

        Called with generator backpressure (`STREAM_BACKPRESSURE`): when the door's process dies, Ray closes
        the generator and the door's sequences are cancelled here.
        """
        feed = self._door_feed(door)
        try:
            while True:
                yield feed.output.get()
        finally:
            self._door_feeds.pop(door, None)
            self.loop.cancel_feed(feed)

    def _door_feed(self, door: str) -> Feed:
        """The door's feed, made by whichever of `submit` and `feed` comes first (they run on different threads)."""
        feed = self._door_feeds.get(door)
        return feed if feed is not None else self._door_feeds.setdefault(door, Feed())

    def cancel(self, seq_id: SeqId) -> None:
        self.loop.cancel(seq_id)

    def live_sequences(self) -> int:
        return self.loop.engine.target.num_sequences

    def set_plan(self, k: int, exit_layer: int | None, tree: TreeShape | None = None) -> None:
        """Speculate with k tokens (or trees of shape `tree`) from `exit_layer` (k = 0: plain decoding) from the
        next round on."""
        self.loop.call(lambda engine: engine.set_plan(k, exit_layer, tree))

    def set_drafter(self, drafter_handle, k: int, exit_layer: int | None, tree: TreeShape | None = None) -> None:
        """Draft with another drafter replica from the next round on; live sequences move to it."""
        drafter = self._remote_drafter(drafter_handle)
        self.loop.call(lambda engine: engine.replace_drafter(drafter, k, exit_layer, tree))
        self.drafter_handle = drafter_handle

    def drafter_id(self) -> str | None:
        """The Ray actor id of the drafter (or chain stage) this replica was last given: how an adopting
        controller learns the pairing."""
        return None if self.drafter_handle is None else actor_id(self.drafter_handle)

    def has_drafter(self) -> bool:
        """False once the engine dropped a failed drafter and decodes plainly."""
        return self.loop.call(lambda engine: engine.drafter is not None)

    def drain_telemetry(self) -> list:
        """The `RoundRecord`s of the rounds since the last drain."""
        return self.loop.engine.drain_telemetry()

    def _embedded_drafter(self, embedded: EmbeddedDrafter, trees: bool) -> Drafter:
        """The embedded drafter, loaded here, as this target's engine takes it (across vocabularies where they differ)."""
        runner = self.load_runner(embedded.path, embedded.settings, drafts=True, trees=trees)
        self.embedded_info = drafter_info(runner, runner.exit_layers, runner.num_layers)
        local = ModelDrafter(runner, embedded.greedy_cutoff, embedded.prompt_window)
        return pair_drafter(local, load_tokenizer(self.path), load_tokenizer(embedded.path), self.vocab_size)

    def _remote_drafter(self, drafter_handle) -> Drafter | None:
        """The drafter actor as this target's engine takes it: drafting across vocabularies where its ids differ."""
        if drafter_handle is None:
            return None
        remote = connect_drafter(drafter_handle, self.timeout_s, self.direct_drafter)
        return pair_drafter(remote, load_tokenizer(self.path), load_tokenizer(remote.path), self.vocab_size)
