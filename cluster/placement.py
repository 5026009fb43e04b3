"""Start the actors a cluster config asks for, each on a node of its pool.

Every actor is detached and named after its fleet, role, model and replica
(`actor_name`), so it outlives the process that started it: a controller that
dies takes no actor with it, and its replacement adopts the fleet it finds
(`start_fleet(..., adopt=True)`).
"""

import hashlib
import logging
import uuid
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError
from transformers import PreTrainedTokenizerBase

from actors.engine_loop import StreamPacing
from actors.errors import IncompatibleModels
from actors.foreign_drafter import CHAINS_ONLY, bridge_of
from actors.loading import check_same_vocabulary, load_tokenizer
from actors.ray_actors import DrafterActor, EmbeddedDrafter, TargetActor, actor_id
from actors.stage_actor import StageActor
from cluster.config import ClusterConfig, ModelConfig, PoolConfig

ACTOR_CONCURRENCY = 256  # threads per actor: one per in-flight stream or draft call
NAME_PREFIX = "specfleet"
NAMESPACE = "specfleet"  # the fleet's actors' Ray namespace, whoever starts them (a Serve replica, a driver)
log = logging.getLogger(__name__)


@dataclass
class Fleet:
    """Handles of the running actors, by model name."""

    config: ClusterConfig
    drafters: dict[str, list] = field(default_factory=dict)
    targets: dict[str, list] = field(default_factory=dict)
    infos: dict[str, list[dict]] = field(default_factory=dict)  # per model, info() of each replica
    stages: dict[str, list] = field(default_factory=dict)  # per chained target, its stage actors, innermost first
    pairing: dict[tuple[str, int], int] = field(default_factory=dict)  # (target, replica) -> its drafter replica

    def all_handles(self) -> list:
        return [h for handles in (*self.drafters.values(), *self.stages.values(), *self.targets.values()) for h in handles]


def actor_options(pool: PoolConfig) -> dict:
    """Ray options that pin an actor to nodes carrying its pool's resources."""
    options = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "resources": dict(pool.resources),
               "max_concurrency": ACTOR_CONCURRENCY}
    if pool.accelerator_type:
        options["accelerator_type"] = pool.accelerator_type
    return options


def start_fleet(config: ClusterConfig, adopt: bool = False) -> Fleet:
    """Start every drafter, then every target paired with a drafter replica; wait until all are ready.

    With `adopt`, the running actors of this config's fleet (a dead controller's) are
    taken over instead of started anew, with as many replicas as they had, and only
    the missing ones are started.
    """
    check_vocabularies(config)
    fleet, found = Fleet(config), running_actors(config) if adopt else {}
    for name, model in config.drafters.items():
        if model.embedded:
            continue  # loaded by each of its targets' replicas
        fleet.drafters[name] = [found.get(("drafter", name, replica)) or start_drafter(config, name, replica)
                                for replica in range(_replica_count(found, "drafter", name, model.replicas))]
    _adopt_or_start_stages(config, fleet, found)
    for name, model in config.targets.items():
        count = _replica_count(found, "target", name, model.replicas)
        adopted = {replica: found[("target", name, replica)] for replica in range(count) if ("target", name, replica) in found}
        _read_pairing(fleet, name, adopted)
        fleet.targets[name] = [adopted.get(replica) or start_target(config, name, replica, drafter_for(fleet, name, replica))
                               for replica in range(count)]
    refresh_infos(fleet)
    return fleet


def refresh_infos(fleet: Fleet) -> None:
    """Every replica's `info`, per model; an embedded drafter's as each target replica that loads it reports it."""
    for name, handles in {**fleet.drafters, **fleet.targets}.items():
        fleet.infos[name] = ray.get([h.info.remote() for h in handles])
    for name, model in fleet.config.drafters.items():
        if model.embedded:
            fleet.infos[name] = [info["embedded_drafter"] for target, config in fleet.config.targets.items()
                                 if config.drafter == name for info in fleet.infos[target]]


def check_vocabularies(config: ClusterConfig) -> None:
    """Refuse, before any actor starts, a chain (via middle targets) whose models read token ids another way, or
    a target whose drafter does and cannot draft across vocabularies (no byte-level bridge, or token trees or a
    cascade asked of it)."""
    for name, target in config.targets.items():
        if not target.drafter:
            continue
        vocabulary = load_tokenizer(target.path)
        if not target.via:
            _check_foreign_drafter(config, name, vocabulary, load_tokenizer(config.drafters[target.drafter].path))
            continue
        for path in [config.drafters[target.drafter].path] + [config.targets[middle].path for middle in target.via]:
            try:
                check_same_vocabulary(vocabulary, load_tokenizer(path))
            except IncompatibleModels as err:
                raise IncompatibleModels(f"target {name!r} and {path}: {err}") from None


def _check_foreign_drafter(config: ClusterConfig, name: str, vocabulary: PreTrainedTokenizerBase,
                           drafter_vocabulary: PreTrainedTokenizerBase) -> None:
    if vocabulary.get_vocab() == drafter_vocabulary.get_vocab():
        return
    path = config.drafters[config.targets[name].drafter].path
    try:
        bridge_of(vocabulary, drafter_vocabulary)
    except IncompatibleModels as err:
        raise IncompatibleModels(f"target {name!r} and {path}: {err}") from None
    if config.uses_trees(name) or config.targets[name].cascade is not None:
        raise IncompatibleModels(f"target {name!r} and {path}: {CHAINS_ONLY}; configure no tree, tree choices or cascade")


def running_actors(config: ClusterConfig) -> dict[tuple[str, str, int], object]:
    """The live actors of this config's fleet by (role, model, replica); stages are keyed by (role, target, stage)."""
    prefix, found = f"{NAME_PREFIX}/{fleet_key(config)}/", {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if actor["namespace"] != NAMESPACE or not name.startswith(prefix):
            continue
        role, model, replica, _ = name.removeprefix(prefix).split("/")
        handle = _live_handle(name)
        if handle is not None and (role, model, int(replica)) not in found:
            found[(role, model, int(replica))] = handle
    if found:
        log.info("adopting %d running actors of this fleet", len(found))
    return found


def _live_handle(name: str):
    """The actor of that name if it answers (after loading its model), else None (gone, or dying)."""
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
        ray.get(handle.info.remote())
    except (ValueError, RayActorError):
        return None
    return handle


def _replica_count(found: dict, role: str, model: str, configured: int) -> int:
    """As many replicas as the running fleet had (autoscaling may have changed it), else as configured."""
    indexes = [replica for (r, m, replica) in found if (r, m) == (role, model)]
    return max(indexes) + 1 if indexes else configured


def _read_pairing(fleet: Fleet, target: str, adopted: dict[int, object]) -> None:
    """Record which drafter replica each adopted target replica drafts with, so new ones pair around them;
    one whose drafter is gone (or whose chain was rebuilt) is attached to the one it should have."""
    config = fleet.config.targets[target]
    if config.drafter is None or fleet.config.embedded_drafter(target) is not None:
        return
    candidates = fleet.stages[target][-1:] if target in fleet.stages else fleet.drafters[config.drafter]
    ids = {actor_id(handle): index for index, handle in enumerate(candidates)}
    for replica, handle in adopted.items():
        index = ids.get(ray.get(handle.drafter_id.remote()))
        if index is not None and target not in fleet.stages:
            fleet.pairing[(target, replica)] = index
        elif index is None:
            ray.get(handle.set_drafter.remote(drafter_for(fleet, target, replica), config.k, config.exit_layer,
                                              config.tree_shape))


def fleet_key(config: ClusterConfig) -> str:
    """Names a fleet by its config, so a restarted controller adopts only the actors of the config it serves."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]


def actor_name(config: ClusterConfig, role: str, model: str, replica: int) -> str:
    """Unique (a replacement may start before its predecessor's name is released) and parsable by `running_actors`."""
    return f"{NAME_PREFIX}/{fleet_key(config)}/{role}/{model}/{replica}/{uuid.uuid4().hex[:8]}"


def start_drafter(config: ClusterConfig, name: str, replica: int):
    """One replica of a drafter (not yet ready: its `info` call waits for the model)."""
    model = config.drafters[name]
    return _start(DrafterActor, config, actor_name(config, "drafter", name, replica), model, str(model.path),
                  model.runner_settings(), config.drafts_trees(name), model.greedy_cutoff, model.prompt_window)


def start_target(config: ClusterConfig, name: str, replica: int, drafter_handle):
    """One replica of a target, drafting with `drafter_handle` (None: plain decoding)."""
    model = config.targets[name]
    return _start(TargetActor, config, actor_name(config, "target", name, replica), model, str(model.path),
                  model.runner_settings(), drafter_handle,
                  model.exit_layer, model.k, config.server.drafter_timeout_s, name, model.drafter or "",
                  model.overlap_rounds, model.max_waiting,
                  StreamPacing(config.server.stream_interval_s, config.server.max_stream_updates_per_s),
                  config.server.direct_drafter_channel, model.tree_shape, config.uses_trees(name),
                  _embedded(config, name))


def _embedded(config: ClusterConfig, target: str) -> EmbeddedDrafter | None:
    """What a target replica loads as its embedded drafter: the drafter's settings, with as many KV slots as the target."""
    drafter = config.embedded_drafter(target)
    if drafter is None:
        return None
    settings = drafter.runner_settings().model_copy(update={"max_sequences": config.targets[target].max_sequences})
    return EmbeddedDrafter(str(drafter.path), settings, drafter.greedy_cutoff, drafter.prompt_window)


def _adopt_or_start_stages(config: ClusterConfig, fleet: Fleet, found: dict) -> None:
    """Each staged chain's stage actors: the running ones if the whole chain runs, else a new chain (see `start_chain`)."""
    for name, target in config.targets.items():
        if not target.via:
            continue
        running = [found.get(("stage", name, stage)) for stage in range(len(target.via))]
        if all(running) and ("drafter", target.drafter, 0) in found:  # the innermost stage drafts with replica 0
            fleet.stages[name] = running
        else:
            for stage in filter(None, running):
                ray.kill(stage)
            fleet.stages[name] = start_chain(config, fleet, name)


def start_chain(config: ClusterConfig, fleet: Fleet, name: str) -> list:
    """The stage actors of one chained target, innermost first, on their middle targets' pools; ready when returned.

    A chain is shared by its target's replicas: one stage actor per middle
    target, drafting with the stage below it (the first with replica 0 of the
    chain's drafter).
    """
    target, stages = config.targets[name], []
    inner = fleet.drafters[target.drafter][0]
    for stage, middle in enumerate(target.via):
        model = config.targets[middle]
        inner = _start(StageActor, config, actor_name(config, "stage", name, stage), model, str(model.path),
                       model.runner_settings(), inner, model.k,
                       config.server.drafter_timeout_s, config.server.direct_drafter_channel)
        stages.append(inner)
    ray.get(inner.info.remote())  # each stage waits for the one below it
    return stages


def drafter_for(fleet: Fleet, target: str, replica: int):
    """What a target replica drafts with: the outermost stage of its chain, else its paired drafter replica.

    A replica not yet paired gets the drafter replica with the fewest target
    replicas paired to it, so targets sharing a drafter spread over its replicas.
    """
    stages = fleet.stages.get(target)
    if stages:
        return stages[-1]
    drafter = fleet.config.targets[target].drafter
    if drafter is None or fleet.config.embedded_drafter(target) is not None:
        return None
    index = fleet.pairing.setdefault((target, replica), fewest_paired(fleet, drafter))
    return fleet.drafters[drafter][index]


def fewest_paired(fleet: Fleet, drafter: str) -> int:
    """The replica of `drafter` with the fewest target replicas paired to it (the lowest index on ties)."""
    counts = [0] * len(fleet.drafters[drafter])
    for (target, _), index in fleet.pairing.items():
        if fleet.config.targets[target].drafter == drafter:
            counts[index] += 1
    return counts.index(min(counts))


def stop_fleet(fleet: Fleet) -> None:
    for handle in fleet.all_handles():
        ray.kill(handle)


def _start(actor_class, config: ClusterConfig, name: str, model: ModelConfig, *args):
    options = actor_options(config.pools[model.pool])
    return ray.remote(actor_class).options(**options, name=name, namespace=NAMESPACE, lifetime="detached").remote(*args)
