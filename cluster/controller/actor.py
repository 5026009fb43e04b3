"""The fleet controller: one per cluster, it owns the actors and steers them from telemetry.

Every `period_s` it takes one control step:

1. **heal**: ping every actor; start a replacement for a dead one and re-pair
   the targets that drafted with a dead drafter (they decode plainly meanwhile,
   see `SpeculationEngine`), rebuild a staged chain that lost a stage or its
   drafter, or re-attach a target that dropped a slow drafter;
2. **collect**: drain each target's round telemetry into per-arm totals,
   Prometheus metrics and the targets' policies;
3. **steer**: ask each target's policy for its plan (exit and k, or no
   speculation) and push changes to its replicas between rounds;
4. **rebalance**: move a target replica from its busy drafter replica to an
   idle one when their drafting loads differ enough (`pairing`);
5. **scale**: add or remove replicas within each model's autoscale bounds
   from its live sequences per replica.

Front doors read the fleet with `snapshot` (its `version` changes whenever a
replica is replaced, added or removed) and report finished requests.
"""

import enum
import logging
import threading
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.telemetry import TelemetryAggregator
from cluster.config import ClusterConfig
from cluster.controller.pairing import DraftLoad, best_move
from cluster.controller.policy import Plan, PolicyConfig, SpeculationPolicy
from cluster.metrics import SpecfleetMetrics
from cluster.placement import Fleet, drafter_for, start_chain, start_drafter, start_fleet, start_target
from specfleet.v1 import generation_pb2 as pb

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 5.0


class FleetController:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.fleet = start_fleet(config)
        self._version = 0
        self.totals = TelemetryAggregator()
        self.draft_load = DraftLoad(config.controller.load_smoothing)
        self._collected_at = time.monotonic()
        self.metrics = SpecfleetMetrics()
        self.plans = {name: Plan(t.exit_layer, t.k if t.drafter else 0, "configured") for name, t in config.targets.items()}
        self.policies = {name: self._policy(name) for name, t in config.targets.items()
                         if t.drafter and config.controller.adaptive}
        self._lock = threading.RLock()  # the control thread and the callers share the fleet
        self._stopped = threading.Event()
        self._serving = True  # some target replica answered the last control step's ping (start_fleet waited for all)
        threading.Thread(target=self._run, name="fleet-controller", daemon=True).start()

    # -- read by front doors and tools ------------------------------------------

    def snapshot(self) -> tuple[int, Fleet]:
        with self._lock:
            return self._version, self.fleet

    def version(self) -> int:
        return self._version

    def ready(self) -> bool:
        """Whether a request can be served: False once stopped, or when no target replica answered the last
        control step's ping (all dead, or their replacements still loading). Front doors report it as health."""
        return not self._stopped.is_set() and self._serving

    def observe_request(self, target: str, outcome: str, latency_s: float, first_token_s: float | None,
                        token_gaps_s: list[float]) -> None:
        self.metrics.observe_request(target, outcome, latency_s, first_token_s, token_gaps_s)

    def stats(self) -> pb.GetStatsResponse:
        with self._lock:
            pairs = [pb.PairStats(**totals.as_pair_stats()) for totals in self.totals.pairs()]
            plans = [pb.TargetPlan(target=name, drafter=self.config.targets[name].drafter or "" if plan.k else "",
                                   exit_layer=plan.exit_layer or 0, k=plan.k, replicas=len(self.fleet.targets[name]),
                                   reason=plan.reason)
                     for name, plan in self.plans.items()]
        return pb.GetStatsResponse(pairs=pairs, plans=plans)

    def metrics_text(self) -> tuple[bytes, str]:
        return self.metrics.render(), self.metrics.content_type

    def pin_plan(self, target: str, k: int, exit_layer: int | None) -> None:
        """An operator's plan for a target: pushed now, and kept (the bandit stops steering that target)."""
        with self._lock:
            self.policies.pop(target, None)
            self.plans[target] = Plan(exit_layer, k, "pinned by an operator")
            self._push_plan(target, self.fleet.targets[target])

    def step(self) -> None:
        """One control step (also run by tests that want it now rather than at the next period)."""
        with self._lock:
            self._heal()
            self._collect()
            self._steer()
            self._rebalance()
            self._scale()

    def shutdown(self) -> None:
        self._stopped.set()
        with self._lock:
            for handle in self.fleet.all_handles():
                ray.kill(handle)

    # -- the control loop ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.wait(self.config.controller.period_s):
            try:
                self.step()
            except Exception:  # one failed step must not stop the controller
                log.exception("control step failed")

    def _heal(self) -> None:
        replaced = set()  # (drafter, replica) started anew in this step
        for name, handles in self.fleet.drafters.items():
            for replica, handle in enumerate(handles):
                if not _alive(handle):
                    log.warning("drafter %s replica %d died; starting a replacement", name, replica)
                    handles[replica] = start_drafter(self.config, name)
                    replaced.add((name, replica))
                    self._changed()
                    self._repair_pairs(name, replica)
        self._heal_chains(replaced)
        serving = False
        for name, handles in self.fleet.targets.items():
            for replica, handle in enumerate(handles):
                ping = _ping(handle)
                serving |= ping is Ping.ANSWERED
                if ping is Ping.DEAD:
                    log.warning("target %s replica %d died; starting a replacement", name, replica)
                    handles[replica] = start_target(self.config, name, drafter_for(self.fleet, name, replica))
                    self._push_plan(name, [handles[replica]])
                    self._changed()
                elif ping is Ping.ANSWERED and self.plans[name].k and not ray.get(handle.has_drafter.remote()):
                    self._attach(name, replica)
        self._serving = serving

    def _heal_chains(self, replaced_drafters: set[tuple[str, int]]) -> None:
        """Rebuild a staged chain whose stage died or whose drafter (replica 0) was replaced; re-attach its target.

        Each stage drafts with the one below it, so a chain is rebuilt whole:
        its target's sequences replay onto the new outermost stage.
        """
        for name, stages in self.fleet.stages.items():
            if (self.config.targets[name].drafter, 0) not in replaced_drafters and all(map(_alive, stages)):
                continue
            log.warning("staged chain of %s lost a stage or its drafter; rebuilding it", name)
            self.fleet.stages[name] = start_chain(self.config, self.fleet, name)
            for replica in range(len(self.fleet.targets[name])):
                self._attach(name, replica)
            for stage in stages:
                ray.kill(stage)
            self._changed()

    def _collect(self) -> None:
        now = time.monotonic()
        period_s, self._collected_at = now - self._collected_at, now
        for name, handles in self.fleet.targets.items():
            batches = ray.get([h.drain_telemetry.remote() for h in handles])
            for replica, batch in enumerate(batches):
                self.draft_load.observe((name, replica), sum(r.drafted for r in batch), period_s)
            records = [r for batch in batches for r in batch]
            self.totals.add(records)
            for record in records:
                self.metrics.observe_round(record)
            if name in self.policies:
                self.policies[name].observe(records)

    def _steer(self) -> None:
        for name, policy in self.policies.items():
            plan, current = policy.plan(), self.plans[name]
            self.plans[name] = plan
            if plan.arm != current.arm:
                self._push_plan(name, self.fleet.targets[name])

    def _rebalance(self) -> None:
        """Per drafter model, move at most one target replica from the busiest drafter replica to the idlest."""
        for drafter, handles in self.fleet.drafters.items():
            shared = {key: index for key, index in self.fleet.pairing.items()
                      if self.config.targets[key[0]].drafter == drafter}
            loads = {key: self.draft_load.of(key) for key in shared}
            move = best_move(shared, loads, len(handles), self.config.controller.rebalance_margin)
            if move is not None:
                (name, replica), index = move
                log.info("moving %s replica %d to %s replica %d (drafting loads %s)", name, replica, drafter, index, loads)
                self.fleet.pairing[(name, replica)] = index
                self._attach(name, replica)

    def _scale(self) -> None:
        for name, model in {**self.config.drafters, **self.config.targets}.items():
            if model.autoscale is None:
                continue
            handles = self.fleet.drafters.get(name) or self.fleet.targets[name]
            live = sum(ray.get([h.live_sequences.remote() for h in handles]))
            wanted = _replicas_wanted(live, len(handles), model.autoscale)
            if wanted > len(handles):
                self._add_replica(name)
            elif wanted < len(handles):
                self._remove_idle_replica(name)

    # -- fleet changes ------------------------------------------------------------

    def _add_replica(self, name: str) -> None:
        if name in self.fleet.drafters:
            self.fleet.drafters[name].append(start_drafter(self.config, name))  # load moves to it by rebalancing
        else:
            handles = self.fleet.targets[name]
            handles.append(start_target(self.config, name, drafter_for(self.fleet, name, len(handles))))
            self._push_plan(name, handles[-1:])
        log.info("scaled %s up to %d replicas", name, len(self.fleet.drafters.get(name) or self.fleet.targets[name]))
        self._changed()

    def _remove_idle_replica(self, name: str) -> None:
        """Remove the last replica if it serves nobody (a busy one is left to drain)."""
        handles = self.fleet.drafters.get(name) or self.fleet.targets[name]
        if ray.get(handles[-1].live_sequences.remote()):
            return
        removed = handles.pop()
        if name in self.fleet.drafters:
            self._unpair_removed_drafter(name, len(handles))
        else:
            self.fleet.pairing.pop((name, len(handles)), None)
            self.draft_load.forget((name, len(handles)))
        self._changed()
        ray.kill(removed)
        log.info("scaled %s down to %d replicas", name, len(handles))

    def _repair_pairs(self, drafter: str, index: int) -> None:
        """Re-attach the target replicas paired with a replaced drafter replica to its replacement."""
        for (name, replica), paired in self.fleet.pairing.items():
            if paired == index and self.config.targets[name].drafter == drafter:
                self._attach(name, replica)

    def _unpair_removed_drafter(self, drafter: str, index: int) -> None:
        """Pair the target replicas of a removed drafter replica with the remaining ones, fewest first."""
        for key in [key for key, paired in self.fleet.pairing.items()
                    if paired == index and self.config.targets[key[0]].drafter == drafter]:
            del self.fleet.pairing[key]
            self._attach(*key)  # drafter_for pairs it anew

    def _attach(self, name: str, replica: int) -> None:
        plan = self.plans[name]
        drafter = drafter_for(self.fleet, name, replica)
        ray.get(self.fleet.targets[name][replica].set_drafter.remote(drafter, plan.k, plan.exit_layer))

    def _push_plan(self, name: str, handles: list) -> None:
        plan = self.plans[name]
        ray.get([h.set_plan.remote(plan.k, plan.exit_layer) for h in handles])

    def _changed(self) -> None:
        """The fleet's handles changed: refresh infos and let front doors know."""
        for name, handles in {**self.fleet.drafters, **self.fleet.targets}.items():
            self.fleet.infos[name] = ray.get([h.info.remote() for h in handles])
        self._version += 1

    def _policy(self, name: str) -> SpeculationPolicy:
        target = self.config.targets[name]
        exits = self.fleet.infos[target.drafter][0]["exit_layers"]
        return SpeculationPolicy(PolicyConfig(exits=exits, ks=self.config.controller.k_choices))


class Ping(enum.Enum):
    ANSWERED = "answered"
    SILENT = "silent"  # no answer within PING_TIMEOUT_S: busy, or still loading; not a death
    DEAD = "dead"  # Ray reports the actor dead


def _ping(handle) -> Ping:
    try:
        ray.get(handle.live_sequences.remote(), timeout=PING_TIMEOUT_S)
    except RayActorError:
        return Ping.DEAD
    except GetTimeoutError:
        log.warning("an actor did not answer a ping within %.0f s", PING_TIMEOUT_S)
        return Ping.SILENT
    return Ping.ANSWERED


def _alive(handle) -> bool:
    """False only for an actor Ray reports dead; a slow answer is not a death (its callers time out on their own)."""
    return _ping(handle) is not Ping.DEAD


def _replicas_wanted(live: int, replicas: int, autoscale) -> int:
    """One more replica above the aimed load, one fewer below a quarter of it, within bounds."""
    per_replica = live / replicas
    if per_replica > autoscale.sequences_per_replica:
        replicas += 1
    elif per_replica < autoscale.sequences_per_replica / 4:
        replicas -= 1
    return max(autoscale.min_replicas, min(autoscale.max_replicas, replicas))
