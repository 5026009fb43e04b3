"""The report's PNG plots: speedup per category, and throughput against concurrency."""

from pathlib import Path

from bench.results import label, select

SPECULATIVE_SYSTEMS = ("specfleet", "specfleet-grpc", "specfleet-http", "vllm", "hf")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(rows: list[dict], categories: list[str], temperatures: list[float], path: Path) -> Path | None:
    """Bars: speculative speedup over the same system's plain decoding, per category, at concurrency 1."""
    systems = [s for s in SPECULATIVE_SYSTEMS if select(rows, system=s, mode="speculative", concurrency=1)]
    if not systems:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(temperatures), figsize=(6 * len(temperatures), 4), squeeze=False)
    width = 0.8 / len(systems)
    for ax, temperature in zip(axes[0], temperatures):
        for i, system in enumerate(systems):
            values = [_speedup(rows, system, c, temperature) for c in categories]
            ax.bar([x + i * width for x in range(len(categories))], values, width, label=label(system, "speculative"))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(categories))], categories, fontsize=8)
        ax.set_ylabel("speedup over the target alone")
        ax.set_title(f"concurrency 1, temperature {temperature:g}")
    axes[0][0].legend(fontsize=7)
    return _save(plt, figure, path)


def _speedup(rows, system, category, temperature) -> float:
    chosen = select(rows, system=system, mode="speculative", category=category, temperature=temperature, concurrency=1)
    return (chosen[0].get("speedup") or 0.0) if chosen else 0.0


def plot_throughput(rows: list[dict], temperature: float, path: Path) -> Path | None:
    """Lines: total tokens/s against concurrency, every system and mode, all categories pooled.

    One colour per system; solid lines speculate, dashed lines decode the target alone.
    """
    series = {}
    for row in select(rows, category="all", temperature=temperature):
        series.setdefault((row["system"], row["mode"]), []).append((row["concurrency"], row["tokens_per_s"]))
    if not series:
        return None
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(7, 4.5))
    colours = {system: f"C{i}" for i, system in enumerate(SPECULATIVE_SYSTEMS)}  # one colour per system
    for (system, mode), points in sorted(series.items()):
        points.sort()
        ax.plot([c for c, _ in points], [v for _, v in points], marker="o", color=colours.get(system),
                linestyle="-" if mode == "speculative" else "--", label=label(system, mode))
    levels = sorted({c for points in series.values() for c, _ in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("total tokens/s")
    ax.set_title(f"throughput, all categories, temperature {temperature:g}")
    ax.legend(fontsize=7)
    return _save(plt, figure, path)


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
