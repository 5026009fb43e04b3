"""Start the actors a cluster config asks for, each on a node of its pool."""

from dataclasses import dataclass, field

import ray

from actors.engine_loop import StreamPacing
from actors.ray_actors import DrafterActor, TargetActor
from actors.stage_actor import StageActor
from cluster.config import ClusterConfig, ModelConfig, PoolConfig

ACTOR_CONCURRENCY = 256  # threads per actor: one per in-flight stream or draft call


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


def start_fleet(config: ClusterConfig) -> Fleet:
    """Start every drafter, then every target paired with a drafter replica; wait until all are ready."""
    fleet = Fleet(config)
    for name, model in config.drafters.items():
        fleet.drafters[name] = [start_drafter(config, name) for _ in range(model.replicas)]
    start_stages(config, fleet)
    for name, model in config.targets.items():
        fleet.targets[name] = [start_target(config, name, drafter_for(fleet, name, replica))
                               for replica in range(model.replicas)]
    for name, handles in {**fleet.drafters, **fleet.targets}.items():
        fleet.infos[name] = ray.get([h.info.remote() for h in handles])
    return fleet


def start_drafter(config: ClusterConfig, name: str):
    """One replica of a drafter (not yet ready: its `info` call waits for the model)."""
    model = config.drafters[name]
    return _start(DrafterActor, config, model, str(model.path), model.runner_settings())


def start_target(config: ClusterConfig, name: str, drafter_handle):
    """One replica of a target, drafting with `drafter_handle` (None: plain decoding)."""
    model = config.targets[name]
    return _start(TargetActor, config, model, str(model.path), model.runner_settings(), drafter_handle,
                  model.exit_layer, model.k, config.server.drafter_timeout_s, name, model.drafter or "",
                  model.overlap_rounds, model.max_waiting,
                  StreamPacing(config.server.stream_interval_s, config.server.max_stream_updates_per_s),
                  config.server.direct_drafter_channel)


def start_stages(config: ClusterConfig, fleet: Fleet) -> None:
    """Start each staged chain's stage actors (see `start_chain`)."""
    for name, target in config.targets.items():
        if target.via:
            fleet.stages[name] = start_chain(config, fleet, name)


def start_chain(config: ClusterConfig, fleet: Fleet, name: str) -> list:
    """The stage actors of one chained target, innermost first, on their middle targets' pools; ready when returned.

    A chain is shared by its target's replicas: one stage actor per middle
    target, drafting with the stage below it (the first with replica 0 of the
    chain's drafter).
    """
    target, stages = config.targets[name], []
    inner = fleet.drafters[target.drafter][0]
    for middle in target.via:
        model = config.targets[middle]
        inner = _start(StageActor, config, model, str(model.path), model.runner_settings(), inner, model.k,
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
    if drafter is None:
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


def _start(actor_class, config: ClusterConfig, model: ModelConfig, *args):
    return ray.remote(actor_class).options(**actor_options(config.pools[model.pool])).remote(*args)
