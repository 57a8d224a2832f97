"""A PNG chart of speed-ups against torch.nn per configuration (matplotlib, an optional extra)."""
from __future__ import annotations

from typing import Sequence

MISSING_MATPLOTLIB = ("--plot needs matplotlib, which is not installed. Install it with "
                      "`pip install 'fusedrnn[bench]'` (or `pip install matplotlib`), or leave out --plot.")


class PlotUnavailable(RuntimeError):
    pass


def require_matplotlib():
    """Imports matplotlib with a headless backend, or raises PlotUnavailable with what to do."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(MISSING_MATPLOTLIB) from exc
    return plt


def plot_speedups(results: Sequence[dict], path: str, title: str) -> None:
    plt = require_matplotlib()
    cells = []
    for r in results:
        key = (r["config"]["name"], r["mode"])
        if key not in cells:
            cells.append(key)
    impls = [i for i in dict.fromkeys(r["impl"] for r in results) if i != "torch"]
    speed = {(r["config"]["name"], r["mode"], r["impl"]): r.get("speedup_vs_torch") for r in results}
    # A fast wrong answer must show: outside its tolerance, a bar is hatched and labelled so.
    wrong = {(r["config"]["name"], r["mode"], r["impl"]) for r in results if r.get("err_ok") is False}
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cells) + 2), 4.8))
    for k, impl in enumerate(impls):
        xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(cells))]
        ys = [speed.get((c, m, impl)) or float("nan") for c, m in cells]  # nan: no bar
        bars = ax.bar(xs, ys, width=width, label=impl)
        for bar, y, (c, m) in zip(bars, ys, cells):
            bad = (c, m, impl) in wrong
            if bad:
                bar.set_hatch("xx")
                bar.set_edgecolor("red")
            if y == y:
                ax.annotate(f"{y:.2g}" + (" WRONG" if bad else ""),
                            (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                            fontsize=6, color="red" if bad else "black")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    from matplotlib.ticker import LogLocator  # (matplotlib is imported by now)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_ylabel("speed-up vs torch.nn (higher is faster)")
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{c}\n{m}" for c, m in cells], rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
