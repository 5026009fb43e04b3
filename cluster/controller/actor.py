"""The fleet controller: one per cluster, it owns the actors and steers them from telemetry.

Every `period_s` it takes one control step:

1. **heal**: ping every actor; start a replacement for a dead one (installed at
   a later step, once loaded) and re-pair the targets that drafted with a dead
   drafter (they decode plainly meanwhile, see `SpeculationEngine`), rebuild a
   staged chain that lost a stage or its drafter, or re-attach a target that
   dropped a slow drafter;
2. **collect**: drain each target's round telemetry into per-arm totals,
   Prometheus metrics and the targets' policies;
3. **steer**: ask each target's policy for its plan (exit and k, or no
   speculation) and push changes to its replicas between rounds;
4. **rebalance**: move a target replica from its busy drafter replica to an
   idle one when their drafting loads differ enough (`pairing`);
5. **scale**: add or remove replicas within each model's autoscale bounds
   from its live sequences per replica.

Front doors read the fleet with `snapshot` (its `version` changes whenever a
replica is replaced, added or removed, and differs between controllers),
report finished requests, and share their requests in flight (`report_load`,
see `cluster.admission`).

The actors outlive the controller (`cluster.placement`): a controller that
dies and is restarted (by Serve) adopts the running fleet of its config, so
streams in flight never notice; it claims each actor it adopts or starts, and
`shutdown` removes only actors still its own.
"""

import enum
import logging
import threading
import time
import uuid

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.errors import InvalidRequest
from actors.ray_actors import actor_id
from actors.telemetry import TelemetryAggregator
from cluster.admission import DoorLoad, FleetLoad
from cluster.config import ClusterConfig, TargetConfig
from cluster.controller.pairing import DraftLoad, best_move
from cluster.controller.policy import Plan, PolicyConfig, SpeculationPolicy
from cluster.metrics import SpecfleetMetrics
from cluster.placement import (Fleet, drafter_for, refresh_infos, start_chain, start_drafter, start_fleet,
                               start_target)
from specfleet.v1 import generation_pb2 as pb

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 5.0


class FleetController:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.owner_id = uuid.uuid4().hex
        self.fleet = start_fleet(config, adopt=True)
        self._version = time.time_ns()  # a restarted controller's versions differ from its predecessor's
        self.totals = TelemetryAggregator()
        self.draft_load = DraftLoad(config.controller.load_smoothing)
        self._collected_at = time.monotonic()
        self.metrics = SpecfleetMetrics()
        self.door_load = FleetLoad()
        self.plans = {name: _configured_plan(t) for name, t in config.targets.items()}
        self.policies = {name: self._policy(name) for name, t in config.targets.items()
                         if t.drafter and config.controller.adaptive}
        self._lock = threading.RLock()  # the control thread and the callers share the fleet
        self._stopped = threading.Event()
        self._serving = True  # some target replica answered the last control step's ping (start_fleet waited for all)
        self.replicas: dict[tuple[str, str, int], pb.ReplicaStats] = {}  # (role, model, replica) -> its last ping
        self._starting: dict[tuple[str, str, int], tuple] = {}  # (role, model, replica) -> (replacement, its info ref)
        self._claim()
        for name, handles in self.fleet.targets.items():
            self._push_plan(name, handles)  # adopted replicas may still run the old controller's plan
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

    def report_load(self, door: str, load: DoorLoad) -> DoorLoad:
        """A front door's requests in flight; returns the other doors' (the fleet's concurrency limits)."""
        return self.door_load.report(door, load)

    def stats(self) -> pb.GetStatsResponse:
        with self._lock:
            pairs = [pb.PairStats(**totals.as_pair_stats()) for totals in self.totals.pairs()]
            plans = [pb.TargetPlan(target=name, drafter=self.config.targets[name].drafter or "" if plan.k else "",
                                   exit_layer=plan.exit_layer or 0, k=plan.k, replicas=len(self.fleet.targets[name]),
                                   reason=plan.reason, tree=plan.tree.label if plan.tree is not None else "")
                     for name, plan in self.plans.items()]
            replicas = list(self.replicas.values())
        return pb.GetStatsResponse(pairs=pairs, plans=plans, replicas=replicas)

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
        """Stop steering and remove the fleet's actors, except those another controller has claimed since."""
        self._stopped.set()
        with self._lock:
            for handle, _ in self._starting.values():
                ray.kill(handle)
            for handle in self.fleet.all_handles():
                try:
                    if ray.get(handle.owner.remote(), timeout=PING_TIMEOUT_S) == self.owner_id:
                        ray.kill(handle)
                except (RayActorError, GetTimeoutError):
                    ray.kill(handle)  # dead already, or hung: nobody else can use it

    # -- the control loop ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.wait(self.config.controller.period_s):
            try:
                self.step()
            except Exception:  # one failed step must not stop the controller
                log.exception("control step failed")

    def _heal(self) -> None:
        """Replace dead actors without waiting for their replacements to load: a replacement is started here and
        installed in a later step, once it answers (`_install_started`), so the lock (and with it snapshot, stats
        and GetStats) is never held while a model loads or compiles. Until then the fleet keeps the dead handle:
        front doors resume streams only on a replica that lives."""
        self.replicas = {}
        installed = self._install_started()  # (drafter, replica) replaced in this step
        for name, handles in self.fleet.drafters.items():
            for replica, handle in enumerate(handles):
                if self._ping("drafter", name, replica, handle) is Ping.DEAD:
                    self._start_replacement("drafter", name, replica, handle)
        self._heal_chains(installed)
        serving = False
        for name, handles in self.fleet.targets.items():
            for replica, handle in enumerate(handles):
                ping = self._ping("target", name, replica, handle)
                serving |= ping is Ping.ANSWERED
                if ping is Ping.DEAD:
                    self._start_replacement("target", name, replica, handle)
                elif (ping is Ping.ANSWERED and self.plans[name].k and not self._drafter_starting(name, replica)
                      and not ray.get(handle.has_drafter.remote())):
                    self._attach(name, replica)
        self._serving = serving
        self.metrics.set_replicas(self.replicas.values())

    def _start_replacement(self, role: str, name: str, replica: int, dead) -> None:
        """Start a replacement for a dead drafter or target replica, unless one is already starting."""
        key = (role, name, replica)
        if key in self._starting:
            return
        log.warning("%s %s replica %d died; starting a replacement", role, name, replica)
        if role == "drafter":
            handle = start_drafter(self.config, name, replica)
        else:
            self._free_sequences_of(dead)
            drafter = None if self._drafter_starting(name, replica) else drafter_for(self.fleet, name, replica)
            handle = start_target(self.config, name, replica, drafter)  # attached later if its drafter was starting
        self._starting[key] = (handle, handle.info.remote())

    def _install_started(self) -> set[tuple[str, int]]:
        """Put every replacement that has loaded into the fleet; returns the (drafter, replica) slots installed."""
        installed = set()
        for key, (handle, info) in list(self._starting.items()):
            if not ray.wait([info], timeout=0)[0]:
                continue
            del self._starting[key]
            role, name, replica = key
            try:
                ray.get(info)
            except RayActorError:
                log.warning("the replacement of %s %s replica %d died while loading", role, name, replica)
                continue  # this step's ping starts another
            handles = self.fleet.drafters[name] if role == "drafter" else self.fleet.targets[name]
            if replica >= len(handles):  # scaled down meanwhile
                ray.kill(handle)
                continue
            handles[replica] = handle
            self._changed()
            if role == "drafter":
                self._repair_pairs(name, replica)
                installed.add((name, replica))
            else:
                self._push_plan(name, [handle])
        return installed

    def _drafter_starting(self, target: str, replica: int) -> bool:
        """Whether the drafter replica this target replica is paired with is dead and its replacement still loading."""
        drafter, index = self.config.targets[target].drafter, self.fleet.pairing.get((target, replica))
        return drafter is not None and target not in self.fleet.stages and ("drafter", drafter, index) in self._starting

    def _heal_chains(self, replaced_drafters: set[tuple[str, int]]) -> None:
        """Rebuild a staged chain whose stage died or whose drafter (replica 0) was replaced; re-attach its target.

        Each stage drafts with the one below it, so a chain is rebuilt whole:
        its target's sequences replay onto the new outermost stage.
        """
        for name, stages in self.fleet.stages.items():
            pings = [self._ping("stage", name, index, stage) for index, stage in enumerate(stages)]
            if (self.config.targets[name].drafter, 0) not in replaced_drafters and Ping.DEAD not in pings:
                continue
            log.warning("staged chain of %s lost a stage or its drafter; rebuilding it", name)
            for stage in stages:
                self._free_sequences_of(stage)
            self.fleet.stages[name] = start_chain(self.config, self.fleet, name)
            for replica in range(len(self.fleet.targets[name])):
                self._attach(name, replica)
            for stage in stages:
                ray.kill(stage)
            self._changed()

    def _free_sequences_of(self, dead) -> None:
        """Free on every drafter and stage the sequences a dead (or discarded) target or stage started there."""
        owner = actor_id(dead)
        for handle in [h for handles in (*self.fleet.drafters.values(), *self.fleet.stages.values()) for h in handles]:
            handle.drop_owner.remote(owner)  # fire and forget: a dead drafter holds nothing

    def _answered(self, role: str, name: str, replica: int) -> bool:
        """Whether the actor answered this step's ping (the heal runs first; the other parts leave the dead alone)."""
        stats = self.replicas.get((role, name, replica))
        return stats is not None and stats.answered

    def _ping(self, role: str, name: str, replica: int, handle) -> "Ping":
        """Ping one actor and record what it said in `replicas` (GetStats, Prometheus, scaling)."""
        ping, live = _ping(handle)
        self.replicas[(role, name, replica)] = pb.ReplicaStats(model=name, role=role, replica=replica, live_sequences=live,
                                                               answered=ping is Ping.ANSWERED)
        return ping

    def _collect(self) -> None:
        now = time.monotonic()
        period_s, self._collected_at = now - self._collected_at, now
        for name, handles in self.fleet.targets.items():
            batches = [_drain(h) if self._answered("target", name, r) else [] for r, h in enumerate(handles)]
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
                      if self.config.targets[key[0]].drafter == drafter and self._answered("target", *key)}
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
            live = sum(r.live_sequences for (role, model, _), r in self.replicas.items() if model == name and role != "stage")
            wanted = _replicas_wanted(live, len(handles), model.autoscale)
            if wanted > len(handles):
                self._add_replica(name)
            elif wanted < len(handles):
                self._remove_idle_replica(name)

    # -- fleet changes ------------------------------------------------------------

    def _add_replica(self, name: str) -> None:
        if name in self.fleet.drafters:
            drafters = self.fleet.drafters[name]
            drafters.append(start_drafter(self.config, name, len(drafters)))  # load moves to it by rebalancing
        else:
            handles = self.fleet.targets[name]
            handles.append(start_target(self.config, name, len(handles), drafter_for(self.fleet, name, len(handles))))
            self._push_plan(name, handles[-1:])
        log.info("scaled %s up to %d replicas", name, len(self.fleet.drafters.get(name) or self.fleet.targets[name]))
        self._changed()

    def _remove_idle_replica(self, name: str) -> None:
        """Remove the last replica if it serves nobody (a busy one is left to drain)."""
        handles = self.fleet.drafters.get(name) or self.fleet.targets[name]
        role = "drafter" if name in self.fleet.drafters else "target"
        if not self._answered(role, name, len(handles) - 1) or ray.get(handles[-1].live_sequences.remote()):
            return  # a dead one is replaced first
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
        if self.config.embedded_drafter(name) is not None:
            return  # its drafter lives in its process: a replica whose drafter failed decodes plainly from then on
        plan = self.plans[name]
        drafter = drafter_for(self.fleet, name, replica)
        ray.get(self.fleet.targets[name][replica].set_drafter.remote(drafter, plan.k, plan.exit_layer, plan.tree))

    def _push_plan(self, name: str, handles: list) -> None:
        plan = self.plans[name]
        for reply in [h.set_plan.remote(plan.k, plan.exit_layer, plan.tree) for h in handles]:
            try:
                ray.get(reply)
            except RayActorError:
                pass  # a dead replica's replacement gets the plan when it is installed
            except RayTaskError as err:
                if not isinstance(err.cause, InvalidRequest):
                    raise
                # a replica that lost its drafter takes only plain decoding: the next heal re-attaches one, with the plan

    def _changed(self) -> None:
        """The fleet's handles changed: refresh infos, claim new actors and let front doors know."""
        refresh_infos(self.fleet)
        self._claim()
        self._version += 1

    def _claim(self) -> None:
        ray.get([h.claim.remote(self.owner_id) for h in self.fleet.all_handles()])

    def _policy(self, name: str) -> SpeculationPolicy:
        target = self.config.targets[name]
        exits = self.fleet.infos[target.drafter][0]["exit_layers"]
        return SpeculationPolicy(PolicyConfig(exits=exits, ks=self.config.controller.k_choices,
                                              trees=self.config.controller.tree_choices))


def _configured_plan(target: TargetConfig) -> Plan:
    """A target's plan from its config: its tree or its k, from its exit; off without a drafter."""
    if target.drafter is None:
        return Plan(target.exit_layer, 0, "configured")
    tree = target.tree_shape
    return Plan(target.exit_layer, tree.nodes if tree is not None else target.k, "configured", tree)


class Ping(enum.Enum):
    ANSWERED = "answered"
    SILENT = "silent"  # no answer within PING_TIMEOUT_S: busy, or still loading; not a death
    DEAD = "dead"  # Ray reports the actor dead


def _ping(handle) -> tuple[Ping, int]:
    """How the actor answered, and its live sequences (0 unless it answered). Only an actor Ray reports dead
    is dead: a slow answer is not a death (its callers time out on their own)."""
    try:
        return Ping.ANSWERED, ray.get(handle.live_sequences.remote(), timeout=PING_TIMEOUT_S)
    except RayActorError:
        return Ping.DEAD, 0
    except GetTimeoutError:
        log.warning("an actor did not answer a ping within %.0f s", PING_TIMEOUT_S)
        return Ping.SILENT, 0


def _drain(handle) -> list:
    """A target's round records since the last drain; none from one that died since its ping."""
    try:
        return ray.get(handle.drain_telemetry.remote())
    except RayActorError:
        return []


def _replicas_wanted(live: int, replicas: int, autoscale) -> int:
    """One more replica above the aimed load, one fewer below a quarter of it, within bounds."""
    per_replica = live / replicas
    if per_replica > autoscale.sequences_per_replica:
        replicas += 1
    elif per_replica < autoscale.sequences_per_replica / 4:
        replicas -= 1
    return max(autoscale.min_replicas, min(autoscale.max_replicas, replicas))
