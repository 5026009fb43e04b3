"""Interleaved phases: the way to compare throughputs on a shared, drifting machine.

Measuring all of A and then all of B lets a change in the machine's load
between the two show up as a speedup. Here every phase runs `repeats` times,
the order rotating each repeat, and a speedup is the ratio of two phases *in
the same repeat*, summarized by its median over repeats.
"""

import statistics
from collections.abc import Callable


def run_interleaved(phases: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Each phase's results, one per repeat; repeat r starts with phase r mod len(phases)."""
    names = list(phases)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        turn = repeat % len(names)
        for name in names[turn:] + names[:turn]:
            results[name].append(phases[name]())
    return results


def paired_speedups(fast: list[float], base: list[float]) -> dict:
    """Per-repeat ratios fast[i] / base[i] (tokens/s), their median, and the smallest and largest."""
    ratios = [f / b for f, b in zip(fast, base, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "per_repeat": ratios}


def spread(summary: dict, form: str) -> str:
    """A `paired_speedups` summary as "median (smallest - largest)", each value formatted with `form`."""
    return f"{form.format(summary['median'])} ({form.format(summary['min'])} - {form.format(summary['max'])})"
