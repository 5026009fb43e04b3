"""The cluster config: which models run where, and which drafter serves which target.

A YAML file validated by pydantic. Pools name the kinds of node (cheap
accelerators for drafters, big ones for targets) as Ray resources, so each
actor lands only on nodes that carry its pool's resources.
"""

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.cascades import CascadeParams
from actors.drafters import GREEDY_CUTOFF, PROMPT_WINDOW
from actors.speculation import MAX_DRAFT_LENGTH
from actors.errors import SpecfleetError
from actors.runner import RunnerSettings
from actors.trees import TreeLabel, TreeShape
from cluster.defaults import models_dir


class InvalidConfig(SpecfleetError, ValueError):
    """The cluster config file is malformed or inconsistent."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolConfig(_Strict):
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each actor of the pool asks for, e.g. {draft: 1}."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs each actor of the pool reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each actor reserves; fractions share a GPU.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type the nodes must have, e.g. 'H100'.")


class AutoscaleConfig(_Strict):
    """Replica bounds the controller scales a model within, from its live sequences."""

    min_replicas: int = Field(1, ge=1, le=64, description="Fewest replicas kept, however idle.")
    max_replicas: int = Field(4, ge=1, le=64, description="Most replicas started, however busy.")
    sequences_per_replica: float = Field(
        8.0, gt=0, description="Live sequences per replica the controller aims at: above it adds a replica, below a quarter of it removes one."
    )

    @model_validator(mode="after")
    def _bounds_ordered(self) -> "AutoscaleConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class ModelConfig(RunnerSettings):
    """A model served by replicas: where and how many, plus how each replica runs it (`RunnerSettings`'s fields)."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    path: Path = Field(description="Local Hugging Face checkpoint folder of a supported family (actors/families.py: "
                       "Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma 2, Phi-3), its tokenizer beside it.")
    pool: str = Field(description="Name of the pool whose nodes host this model's actors.")
    replicas: int = Field(1, ge=1, le=64, description="Actors serving this model at start.")
    autoscale: AutoscaleConfig | None = Field(None, description="Let the controller scale the replicas within bounds; None keeps `replicas`.")

    def runner_settings(self) -> RunnerSettings:
        return RunnerSettings(**self.model_dump(include=set(RunnerSettings.model_fields)))


class DrafterConfig(ModelConfig):
    """A (multi-exit) drafter shared by the targets that name it, or embedded in each of them."""

    placement: Literal["actor", "embedded"] = Field(
        "actor",
        description="'actor': replicas of their own (on this drafter's pool) draft for every target that names it, "
        "batched across targets. 'embedded': each target replica loads this drafter into its own process and drafts "
        "there: no hop per round and no second process on the target's CPU (on the 2-core CPU zoo one greedy stream "
        "through the cluster went from 1.05x to 1.29-1.32x the target alone on code prompts; docs/ARCHITECTURE.md, "
        "the request path), but no batching across targets and no replicas, autoscaling, re-pairing or replacement "
        "of its own; `pool` is then unused and `max_sequences` is the target's.",
    )
    max_sequences: int = Field(
        256, ge=1, le=4096,
        description="KV-store slots of each replica: sequences it drafts for at once, over all its targets.",
    )
    greedy_cutoff: float = Field(
        GREEDY_CUTOFF, ge=0, lt=1,
        description="A greedy chain stops before the token at which the product of its tokens' probabilities under "
        "the drafter falls below this (0: whole chains of k; bench/reports/draft_cutoff.md).",
    )
    prompt_window: int | None = Field(
        PROMPT_WINDOW, ge=1,
        description="Prompt tokens the drafter reads, the last ones (None: the whole prompt). Lossless "
        "verification makes this a trade of acceptance against the drafter's prefill and cache (a speculative "
        "cascade that defers emits tokens drafted from the window); on the zoo's long prompts a window of 128-256 "
        "agreed with the target as well as the whole prompt and cost less (actors.drafters.PROMPT_WINDOW).",
    )

    @property
    def embedded(self) -> bool:
        return self.placement == "embedded"


class TargetConfig(ModelConfig):
    drafter: str | None = Field(None, description="Name of the drafter that serves this target; None decodes plainly.")
    exit_layer: int | None = Field(None, ge=1, description="Drafter exit to draft with; None uses its deepest exit.")
    k: int = Field(4, ge=1, le=MAX_DRAFT_LENGTH, description="Draft tokens per round.")
    tree: TreeLabel | None = Field(
        None, description="Draft token trees of this shape instead of chains of k ('static-DEPTHxWIDTH' or "
        "'dynamic-DEPTHxWIDTH', actors/trees.py); None: chains. An adaptive controller may choose otherwise.",
    )
    cascade: CascadeParams | None = Field(
        None, description="Default speculative cascade (deferral rule and lenience alpha) of this target's requests; "
        "None verifies losslessly. A request's own rule or alpha overrides it."
    )
    overlap_rounds: bool = Field(
        False,
        description="With two or more drafting sequences, split them into two groups and let the drafter draft one "
        "while this target verifies the other (hides the drafter hop; exact either way). Off by default: on the "
        "CPU zoo, halving the verify batch cost more than the hidden drafting saved (0.89-1.00x at 2-4 streams, "
        "bench/overlap_rounds.py).",
    )
    max_waiting: int = Field(
        256, ge=0, le=65536,
        description="Requests a replica queues while all its KV slots are taken; beyond it, RESOURCE_EXHAUSTED / 429.",
    )
    via: list[str] = Field(
        default_factory=list,
        description="Middle targets of a staged chain, innermost first: drafter -> via[0] -> ... -> this target. "
        "Each runs as a stage actor on that target's pool, drafting for the next with that target's k as its inner draft length.",
    )

    @property
    def tree_shape(self) -> TreeShape | None:
        return None if self.tree is None else TreeShape.parse(self.tree)


class TlsConfig(_Strict):
    cert_file: Path = Field(description="PEM certificate chain the front doors present.")
    key_file: Path = Field(description="PEM private key of that certificate.")
    client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: when set, the gRPC door and the front door's HTTP server require client "
        "certificates signed by it (mutual TLS); Serve's HTTP proxy verifies none.")


class ServerConfig(_Strict):
    host: str = Field(
        "127.0.0.1",
        description="Address the front doors bind. Beyond loopback, `specfleet up` and the Serve app refuse to start without "
        "API keys unless told insecure explicitly.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http_port: int = Field(
        8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible API (the front door's own server under "
        "`specfleet up`; Ray Serve's proxy with `--serve-proxy`).")
    api_keys_file: Path | None = Field(
        None, description="File of API keys, one per line ('#' comments). With this or api_keys_env set, every generation "
        "call must carry a key (HTTP `Authorization: Bearer`, gRPC metadata `authorization`); health stays open.")
    api_keys_env: str | None = Field(
        None, description="Name of an environment variable holding API keys, comma-separated (e.g. from a Kubernetes Secret).")
    protect_metrics: bool = Field(False, description="Require an API key for GET /metrics too.")
    tls: TlsConfig | None = Field(None, description="Serve gRPC and HTTP over TLS with this certificate; None: plaintext.")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens of a request that leaves it unset.")
    max_request_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request accepted, in bytes: an HTTP body (413 beyond it, refused before it is "
        "read) or a gRPC message (RESOURCE_EXHAUSTED).")
    max_prompt_chars: int = Field(
        100_000, ge=1, description="Longest text prompt, in characters, checked before it is tokenized (INVALID_ARGUMENT / 400).")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Most max_tokens a request may ask for (INVALID_ARGUMENT / 400 beyond it); None: as many as "
        "the model's context leaves after the prompt.")
    max_concurrent_requests: int = Field(
        256, ge=1, description="Requests in flight on the whole fleet (all front doors together) before "
        "RESOURCE_EXHAUSTED / 429; the doors share their counts through the controller (cluster/admission.py).")
    max_concurrent_requests_per_key: int | None = Field(
        None, ge=1, description="Requests in flight per API key on the whole fleet before RESOURCE_EXHAUSTED / 429; "
        "None: only the fleet's limit.")
    stream_interval_s: float = Field(
        0.01, ge=0, le=1.0,
        description="A stream's first update goes out at once; later rounds are merged into one update per this "
        "many seconds at least (each update is a message through the front door; a target replica sends the updates "
        "due in a round to each door as one Ray object). 0: every round.",
    )
    max_stream_updates_per_s: float | None = Field(
        400.0, gt=0,
        description="Updates per second a target replica sends over all its streams: with more open streams than "
        "this times stream_interval_s, each stream's interval grows to streams / this (16 streams: 40 ms). "
        "None: no budget.",
    )
    drafter_timeout_s: float = Field(
        10.0, gt=0, description="A drafter call slower than this counts as a dead drafter: the target decodes plainly."
    )
    resume_attempts: int = Field(
        2, ge=0, le=10,
        description="Times a stream whose target replica died is resumed on another (or the replacement) replica from "
        "its prompt and the tokens already sent, before it fails with UNAVAILABLE; 0: never resumed.",
    )
    resume_wait_s: float = Field(
        120.0, gt=0,
        description="How long a stream to resume waits for a live replica of its target (a replacement loads its model "
        "first) before it fails with UNAVAILABLE.",
    )
    cpu_layout: Literal["auto", "off"] = Field(
        "auto", description="'auto': when `specfleet up` starts its own Ray on a machine of two or more CPUs, the model "
        "actors run on all CPUs but the last and everything else (front doors, Serve, the controller, Ray's daemons) on "
        "the last, so that a target and its drafter alternate on warm cores undisturbed (actors.cpu_affinity has the "
        "measurements). 'off': the operating system places every process. A joined Ray cluster (--address) is never "
        "pinned.",
    )
    direct_drafter_channel: bool = Field(
        True, description="A target reaches a drafter on its own machine (pod) through the drafter's loopback socket (a token "
        "handed over by Ray admits it) instead of a Ray call per round; other machines always use Ray calls.",
    )


class ControllerConfig(_Strict):
    period_s: float = Field(1.0, gt=0, description="Seconds between control steps (telemetry, healing, plans, scaling).")
    adaptive: bool = Field(
        True, description="Let a bandit choose each target's exit and k, or no speculation, from measured goodput; False keeps the configured plan."
    )
    k_choices: list[Annotated[int, Field(ge=1, le=MAX_DRAFT_LENGTH)]] = Field(
        [2, 4, 6], min_length=1, description="Draft lengths the bandit chooses among (with every drafter exit)."
    )
    tree_choices: list[TreeLabel] = Field(
        default_factory=list, description="Token-tree shapes the bandit also chooses among, beside the chains (with "
        "every drafter exit), e.g. ['dynamic-4x2']; empty: chains only. Replicas then compile tree steps at start-up.",
    )
    rebalance_margin: float = Field(
        0.25, ge=0, le=1,
        description="Move a target replica to another drafter replica only when the busiest drafter replica's drafting "
        "load exceeds the idlest's by more than this share of the busiest's (a move restarts its live sequences).",
    )
    load_smoothing: float = Field(
        0.5, ge=0, lt=1, description="Weight the previous estimate of a target replica's drafting load keeps each period.")


class ClusterConfig(_Strict):
    pools: dict[str, PoolConfig] = Field(description="Kinds of node, by name.")
    drafters: dict[str, DrafterConfig] = Field(default_factory=dict, description="Drafter models, by name.")
    targets: dict[str, TargetConfig] = Field(description="Target models clients can ask for, by name.", min_length=1)
    server: ServerConfig = Field(default_factory=ServerConfig, description="The gRPC front door.")
    controller: ControllerConfig = Field(default_factory=ControllerConfig, description="The fleet controller's steering.")

    def uses_trees(self, target: str) -> bool:
        """Whether a target's sequences may draft token trees: configured, or among its controller's choices."""
        config = self.targets[target]
        return config.drafter is not None and (config.tree is not None or
                                               bool(self.controller.adaptive and self.controller.tree_choices))

    def drafts_trees(self, drafter: str) -> bool:
        """Whether a drafter may be asked for token trees by one of its targets."""
        return any(t.drafter == drafter and self.uses_trees(name) for name, t in self.targets.items())

    @model_validator(mode="after")
    def _references_resolve(self) -> "ClusterConfig":
        for name, model in {**self.drafters, **self.targets}.items():
            if model.pool not in self.pools:
                raise ValueError(f"model {name!r} names pool {model.pool!r}, which is not among {sorted(self.pools)}")
        for name, target in self.targets.items():
            if target.drafter is not None and target.drafter not in self.drafters:
                raise ValueError(f"target {name!r} names drafter {target.drafter!r}, which is not among {sorted(self.drafters)}")
        clash = set(self.drafters) & set(self.targets)
        if clash:
            raise ValueError(f"names used for both a drafter and a target: {sorted(clash)}")
        for name, target in self.targets.items():
            _check_chain(name, target, self.targets)
        for name, drafter in self.drafters.items():
            _check_embedding(name, drafter, self.targets)
        return self

    def embedded_drafter(self, target: str) -> DrafterConfig | None:
        """The drafter a target loads into its own process, if its drafter is embedded."""
        drafter = self.targets[target].drafter
        config = self.drafters.get(drafter) if drafter is not None else None
        return config if config is not None and config.embedded else None


def _check_chain(name: str, target: TargetConfig, targets: dict[str, TargetConfig]) -> None:
    """A chain needs a drafter to start from and distinct middle targets other than itself."""
    if not target.via:
        return
    if target.drafter is None:
        raise ValueError(f"target {name!r} has a chain (via {target.via}) but no drafter: a chain needs a drafter to start from")
    for middle in target.via:
        if middle not in targets:
            raise ValueError(f"target {name!r} goes via {middle!r}, which is not among the targets {sorted(targets)}")
    if name in target.via:
        raise ValueError(f"target {name!r} cannot pass through itself")
    if len(set(target.via)) != len(target.via):
        raise ValueError(f"target {name!r} names a middle target more than once in via {target.via}")


def _check_embedding(name: str, drafter: DrafterConfig, targets: dict[str, TargetConfig]) -> None:
    """An embedded drafter lives in its targets' processes: nothing of its own to replicate, and no chain to start."""
    if not drafter.embedded:
        return
    if drafter.replicas != 1 or drafter.autoscale is not None:
        raise ValueError(f"drafter {name!r} is embedded: it runs inside each of its targets' replicas, so it takes "
                         "no replicas or autoscale of its own")
    served = {t: config for t, config in targets.items() if config.drafter == name}
    chained = sorted(t for t, config in served.items() if config.via)
    if chained:
        raise ValueError(f"drafter {name!r} is embedded but starts the staged chains of {chained}: a chain's stages "
                         "need a drafter actor")
    overlapped = sorted(t for t, config in served.items() if config.overlap_rounds)
    if overlapped:
        raise ValueError(f"drafter {name!r} is embedded but {overlapped} overlap rounds: overlapping hides a drafter "
                         "actor's hop, and an embedded drafter has none")


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a YAML cluster config; relative model paths resolve against the file's folder."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise InvalidConfig(f"cannot read cluster config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise InvalidConfig(f"{path} is not valid YAML: {err}") from None
    config = parse_config(raw, source=str(path))
    return _resolve_paths(config, Path(path).resolve().parent)


def parse_config(raw: object, source: str = "cluster config") -> ClusterConfig:
    if not isinstance(raw, dict):
        raise InvalidConfig(f"{source}: expected a mapping at the top level")
    try:
        return ClusterConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise InvalidConfig(f"{source}: {problems}") from None


def default_config() -> ClusterConfig:
    """The embedded default: the zoo's sorted drafter serving its four targets, on two pools."""
    zoo = models_dir()
    pools = {"draft": PoolConfig(resources={"draft": 1}), "target": PoolConfig(resources={"target": 1})}
    targets = {
        name: TargetConfig(path=zoo / name, pool="target", drafter="drafter", k=4)
        for name in ("target-s", "target-m", "target-l", "target-xl")
    }
    return ClusterConfig(pools=pools, drafters={"drafter": DrafterConfig(path=zoo / "drafter", pool="draft")}, targets=targets)


def _resolve_paths(config: ClusterConfig, base: Path) -> ClusterConfig:
    def resolve(model):
        return model.model_copy(update={"path": model.path if model.path.is_absolute() else base / model.path})

    return config.model_copy(
        update={
            "drafters": {n: resolve(m) for n, m in config.drafters.items()},
            "targets": {n: resolve(m) for n, m in config.targets.items()},
        }
    )
