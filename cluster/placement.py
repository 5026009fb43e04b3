"""Start the actors a cluster config asks for, each on a node of its pool."""

from dataclasses import dataclass, field

import ray

from actors.ray_actors import DrafterActor, TargetActor
from cluster.config import ClusterConfig, ModelConfig, PoolConfig

ACTOR_CONCURRENCY = 256  # threads per actor: one per in-flight stream or draft call


@dataclass
class Fleet:
    """Handles of the running actors, by model name."""

    config: ClusterConfig
    drafters: dict[str, list] = field(default_factory=dict)
    targets: dict[str, list] = field(default_factory=dict)
    infos: dict[str, list[dict]] = field(default_factory=dict)  # per model, info() of each replica

    def all_handles(self) -> list:
        return [h for handles in (*self.drafters.values(), *self.targets.values()) for h in handles]


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
        fleet.drafters[name] = [_start(DrafterActor, config, model, str(model.path), model.dtype, model.device)
                                for _ in range(model.replicas)]
    for name, model in config.targets.items():
        fleet.targets[name] = [
            _start(TargetActor, config, model, str(model.path), model.dtype, model.device,
                   _pair(fleet, model.drafter, replica), model.exit_layer, model.k, config.server.drafter_timeout_s)
            for replica in range(model.replicas)
        ]
    for name, handles in {**fleet.drafters, **fleet.targets}.items():
        fleet.infos[name] = ray.get([h.info.remote() for h in handles])
    return fleet


def stop_fleet(fleet: Fleet) -> None:
    for handle in fleet.all_handles():
        ray.kill(handle)


def _start(actor_class, config: ClusterConfig, model: ModelConfig, *args):
    return ray.remote(actor_class).options(**actor_options(config.pools[model.pool])).remote(*args)


def _pair(fleet: Fleet, drafter: str | None, replica: int):
    """Target replica i drafts with drafter replica i mod n (spreads targets over drafters)."""
    if drafter is None:
        return None
    handles = fleet.drafters[drafter]
    return handles[replica % len(handles)]
