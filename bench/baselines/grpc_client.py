"""The benchmark's gRPC client: one `GenerateStream` call, each message timed as it arrives."""

import time

from bench.metrics import RequestTrace, SpeculationCounts
from specfleet.v1 import generation_pb2 as pb

REQUEST_TIMEOUT_S = 600.0


def stream_request(model: str, prompt: list[int], max_tokens: int, temperature: float, seed: int,
                   speculation: dict | None) -> pb.GenerateRequest:
    """A request for token ids; `speculation` None decodes plainly, else FIXED {drafter, exit_layer, k}."""
    request = pb.GenerateRequest(model=model, token_ids=pb.TokenIds(ids=prompt), max_tokens=max_tokens,
                                 temperature=temperature, seed=seed, ignore_eos=True)
    if speculation is None:
        request.speculation.mode = pb.Speculation.OFF
    else:
        request.speculation.CopyFrom(pb.Speculation(mode=pb.Speculation.FIXED, **speculation))
    return request


def stream(stub, request: pb.GenerateRequest) -> RequestTrace:
    """One streamed request; the last message carries the speculation counters."""
    trace = RequestTrace(time.perf_counter())
    for message in stub.GenerateStream(request, timeout=REQUEST_TIMEOUT_S):
        trace.record(time.perf_counter(), len(message.token_ids), message.token_ids)
        if message.HasField("speculation"):
            trace.counts = counts_of(message.speculation)
    return trace


def counts_of(stats) -> SpeculationCounts:
    """Counters of a SpeculationStats message (or its JSON fields, which have the same names)."""
    get = stats.get if isinstance(stats, dict) else lambda name: getattr(stats, name)
    forwards = int(get("target_forwards"))
    return SpeculationCounts(int(get("drafted")), int(get("accepted")), forwards,
                             round(get("mean_accepted_length") * forwards))
