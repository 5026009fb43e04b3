"""The front doors under bad input, and the thin client's wall time, against a real `specfleet up` (issue 16).

    python -m bench.front_door [--out bench/reports/front_door]

Starts `specfleet up` on the embedded zoo (its default config, free ports) and measures:

- **limits**: each oversized request (a 50 MB HTTP body with and without a
  declared length, a 5 MB prompt through each door, a prompt just under the
  body limit but over `server.max_prompt_chars`, one within every limit but too
  long for the model's context) is sent while a small request runs in a loop
  beside it through the same door: the oversized one's time to its refusal,
  the small ones' worst latency against their latency alone, and the private
  resident memory (RssAnon) of the front-door replica (it serves both doors)
  before and after;
- **thin client**: `specfleet generate --server` for 32 tokens, end to end as
  a user runs it (a new Python process each time), against the same request
  made from a warm client in this process.

Every figure is wall time on this machine while nothing else runs; the report
records the load average.
"""

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from bench.baselines.cluster_process import ClusterProcess
from bench.machine import describe_machine
from bench.memory import private_rss_mib
from specfleet.v1 import generation_pb2 as pb
from specfleet.v1 import generation_pb2_grpc as pb_grpc

ZOO_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "configs" / "zoo.yaml"  # the embedded default
SPECFLEET = str(Path(sys.executable).parent / "specfleet")  # the console script a user runs
MODEL = "target-l"
MB = 1 << 20
SERVING_PROCESSES = {"front door": "FrontDoor"}  # `specfleet up`: one replica serves both doors
SMALL_PROMPT = "def add(a, b):"
CLIENT_RUNS = 5
SMALL_REQUEST_SAMPLES = 20  # the small request alone, for its baseline latency


def serving_pids(server: ClusterProcess) -> dict[str, int]:
    """The processes of the doors, by role (read from the process tree's names)."""
    tree = server.peaks()
    return {role: next(p["pid"] for p in tree if marker in p["name"]) for role, marker in SERVING_PROCESSES.items()}


# ---- requests --------------------------------------------------------------------------------------------


def http_post(server: ClusterProcess, path: str, body: bytes | None = None, chunks=None, timeout_s: float = 60.0) -> int:
    """POST a body (or an iterable of chunks, sent without a declared length); returns the status."""
    url = urlsplit(server.http_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout_s)
    try:
        connection.request("POST", path, body if chunks is None else chunks,
                           {"content-type": "application/json"}, encode_chunked=chunks is not None)
        response = connection.getresponse()
        response.read()
        return response.status
    except (BrokenPipeError, ConnectionResetError):  # refused while still sending: the server closed the connection
        return 413
    finally:
        connection.close()


def completion_body(prompt: str, max_tokens: int = 1) -> bytes:
    return json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()


def grpc_generate(stub, prompt: str, max_tokens: int = 1) -> str:
    """The call's status name ("OK" or the refusal's code)."""
    try:
        stub.Generate(pb.GenerateRequest(model=MODEL, text=prompt, max_tokens=max_tokens, temperature=0.0), timeout=60)
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def big_chunks(total: int, chunk: int = MB):
    """A JSON body of `total` bytes in chunks, as a client streaming an upload would send it."""
    yield b'{"model": "target-l", "prompt": "'
    for _ in range(total // chunk):
        yield b"x" * chunk
    yield b'"}'


# ---- measurements -----------------------------------------------------------------------------------------


def timed(call: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def beside(bad: Callable[[], object], small: Callable[[], object]) -> dict:
    """Run `bad` once while `small` runs in a loop beside it; the bad one's outcome and time, the small ones' times."""
    small_times, done = [], threading.Event()

    def loop():
        while not done.is_set():
            small_times.append(timed(small)[1])

    worker = threading.Thread(target=loop)
    worker.start()
    time.sleep(0.2)  # the loop is running when the bad request arrives
    outcome, seconds = timed(bad)
    time.sleep(0.2)
    done.set()
    worker.join()
    return {"outcome": outcome, "refused_in_s": round(seconds, 3), "small_requests": len(small_times),
            "small_worst_s": round(max(small_times), 3)}


def limit_cases(server: ClusterProcess, stub) -> list[tuple[str, str, Callable[[], object]]]:
    """(door, what, the oversized request)."""
    five_mb_prompt = "x" * (5 * MB)
    under_body_over_chars = "x" * (900 * 1024)
    over_context = "word " * 20_000  # 100,000 characters: within max_prompt_chars, far over the context
    return [
        ("http", "50 MB body, declared length", lambda: http_post(server, "/v1/completions", b"{" + b" " * (50 * MB) + b"}")),
        ("http", "50 MB body, chunked", lambda: http_post(server, "/v1/completions", chunks=big_chunks(50 * MB))),
        ("http", "5 MB prompt", lambda: http_post(server, "/v1/completions", completion_body(five_mb_prompt))),
        ("http", "900 KB prompt (over max_prompt_chars)", lambda: http_post(server, "/v1/completions", completion_body(under_body_over_chars))),
        ("http", "100,000-character prompt (over the context)", lambda: http_post(server, "/v1/completions", completion_body(over_context[:99_999]))),
        ("grpc", "5 MB prompt", lambda: grpc_generate(stub, five_mb_prompt)),
        ("grpc", "900 KB prompt (over max_prompt_chars)", lambda: grpc_generate(stub, under_body_over_chars)),
        ("grpc", "100,000-character prompt (over the context)", lambda: grpc_generate(stub, over_context[:99_999])),
    ]


def measure_limits(server: ClusterProcess, stub) -> dict:
    small = {"http": lambda: http_post(server, "/v1/completions", completion_body(SMALL_PROMPT)),
             "grpc": lambda: grpc_generate(stub, SMALL_PROMPT)}
    alone = {door: statistics.median(timed(call)[1] for _ in range(SMALL_REQUEST_SAMPLES)) for door, call in small.items()}
    pids = serving_pids(server)
    cases = []
    for door, what, bad in limit_cases(server, stub):
        before = {role: private_rss_mib(pid) for role, pid in pids.items()}
        result = beside(bad, small[door])
        after = {role: private_rss_mib(pid) for role, pid in pids.items()}
        growth = {role: round(after[role] - before[role], 1) for role in pids}
        cases.append({"door": door, "request": what, **result, "small_alone_s": round(alone[door], 3),
                      "small_delay_s": round(result["small_worst_s"] - alone[door], 3), "rss_growth_mib": growth})
    return {"small_alone_s": {door: round(s, 3) for door, s in alone.items()}, "cases": cases}


def measure_thin_client(server: ClusterProcess, stub) -> dict:
    command = [SPECFLEET, "generate", "--server", server.address, "--model", MODEL, "--max-tokens", "32", "def fibonacci(n):"]
    runs = []
    for _ in range(CLIENT_RUNS):
        finished, seconds = timed(lambda: subprocess.run(command, capture_output=True, text=True, timeout=120))
        if finished.returncode:
            raise RuntimeError(f"specfleet generate --server failed: {finished.stderr[-500:]}")
        runs.append(seconds)
    request = [timed(lambda: stub.Generate(pb.GenerateRequest(model=MODEL, text="def fibonacci(n):", max_tokens=32), timeout=60))[1]
               for _ in range(CLIENT_RUNS)]
    return {"command": " ".join(["specfleet", *command[1:]]), "wall_s": [round(s, 3) for s in runs],
            "median_wall_s": round(statistics.median(runs), 3), "request_alone_median_s": round(statistics.median(request), 3)}


def run(log: Path) -> dict:
    machine = describe_machine()
    server = ClusterProcess(ZOO_CONFIG, threads=1, log_path=log)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            grpc_generate(stub, SMALL_PROMPT)  # warm: the first request pays connection set-up
            limits = measure_limits(server, stub)
            client = measure_thin_client(server, stub)
    finally:
        server.stop()
    return {"machine": machine, "limits": limits, "thin_client": client}


def render(result: dict) -> str:
    limits, client = result["limits"], result["thin_client"]
    lines = [
        "# The front doors under bad input, and the thin client (issue 16)",
        "",
        "Generated by `python -m bench.front_door` against `specfleet up` on the embedded zoo (default limits: "
        f"1 MiB per request, 100,000 prompt characters). Load average at start {result['machine']['load_average_at_start']}; "
        f"machine: {result['machine']['cpu']}, commit {result['machine']['git_commit']}.",
        "",
        "Each oversized request was sent once while a small request (one token of `target-l`) ran in a loop through "
        f"the same door; alone it took {limits['small_alone_s']['http']} s (HTTP) and {limits['small_alone_s']['grpc']} s "
        "(gRPC), median. Memory: private resident memory (RssAnon) after minus before, MiB.",
        "",
        "| door | request | outcome | refused in s | small requests beside | worst small delay s | RSS growth MiB, by process |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in limits["cases"]:
        growth = case["rss_growth_mib"]
        lines.append(f"| {case['door']} | {case['request']} | {case['outcome']} | {case['refused_in_s']} | "
                     f"{case['small_requests']} | {case['small_delay_s']} | "
                     f"{', '.join(f'{role} {mib}' for role, mib in growth.items())} |")
    worst_refusal = max(c["refused_in_s"] for c in limits["cases"])
    worst_delay = max(c["small_delay_s"] for c in limits["cases"])
    worst_growth = max(v for c in limits["cases"] for v in c["rss_growth_mib"].values())
    lines += [
        "",
        f"Goals: refused within 1 s: worst {worst_refusal} s, **{'met' if worst_refusal <= 1 else 'not met'}**; "
        f"a concurrent small request delayed by at most 0.5 s: worst {worst_delay} s, "
        f"**{'met' if worst_delay <= 0.5 else 'not met'}**; resident memory growth at most 32 MiB: worst {worst_growth} MiB, "
        f"**{'met' if worst_growth <= 32 else 'not met'}**.",
        "",
        "## The thin client",
        "",
        f"`{client['command']}`, {len(client['wall_s'])} runs, each a new process as a user runs it: wall "
        f"{client['wall_s']} s, median **{client['median_wall_s']} s** (goal: under 1.5 s, "
        f"**{'met' if client['median_wall_s'] < 1.5 else 'not met'}**); the same request from a warm client in the "
        f"harness: median {client['request_alone_median_s']} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/reports/front_door"), help="report path without suffix")
    args = parser.parse_args()
    result = run(Path(tempfile.mkdtemp(prefix="specfleet-front-door-")) / "up.log")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
