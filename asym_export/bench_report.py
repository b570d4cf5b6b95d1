"""asym-bench's output: the terminal table and the PNG plot of latency against resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bench_measure import VERSUS
from .graphs import BENCH_GRAPHS


def table(result: dict) -> str:
    versus = [(field, column, name) for field, column, name in VERSUS if any(r.get(field) for r in result["rows"])]
    head = ("graph", "shape", "backend", "first s", "median s", "p90 s", "img/s", "TFLOP/s", "% peak", "x ref") \
        + tuple(column for _, column, _ in versus)
    rows = [head]
    for r in result["rows"]:
        rows.append((r["graph"], r["shape"], r["backend"], f"{r['first_call_s']:.3f}", f"{r['median_s']:.4f}",
                     f"{r['p90_s']:.4f}", f"{r['images_per_s']:.2f}", f"{r['tflops']:.3f}",
                     f"{100 * r['peak_share']:.1f}", f"{r['ratio_vs_reference']:.2f}")
                    + tuple(f"{r[field]:.2f}" if r.get(field) else "-" for field, _, _ in versus))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(v).rjust(w) if i > 2 else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in rows]
    loads = "; ".join(f"{b['name']} load {b['load_s']:.2f} s (+{b['load_rss_gib']:.2f} GiB)" for b in result["backends"])
    m = result["machine"]
    return "\n".join(lines + ["", loads, f"peak RSS {result['peak_rss_gib']:.2f} GiB; {m['device']}; "
                              f"measured peak {m['measured_peak_tflops']:.3f} TFLOP/s ({m['peak_matmul']}); "
                              f"x ref = {result['reference']} median / backend median"
                              + "".join(f"; {column} = {name} median / backend median" for _, column, name in versus)])


def plot(result: dict, path: Path) -> Path:
    """Latency (median, p90 as error bar) against resolution, one line per backend, one panel
    per graph and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    graphs = [g for g in BENCH_GRAPHS if any(r["graph"] == g for r in rows)]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(graphs), len(batches), figsize=(5.5 * len(batches), 3.6 * len(graphs)),
                             squeeze=False)
    for (i, graph), (j, batch) in ((gi, bj) for gi in enumerate(graphs) for bj in enumerate(batches)):
        ax = axes[i][j]
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["height"] * r["width"], r["median_s"], r["p90_s"])
                         for r in rows if r["graph"] == graph and r["batch"] == batch and r["backend"] == backend)
            if not pts:
                continue
            x = [np.sqrt(p[0]) for p in pts]
            med = [p[1] for p in pts]
            err = [p[2] - p[1] for p in pts]
            ax.errorbar(x, med, yerr=[np.zeros(len(err)), err], marker="o", capsize=3, label=backend)
        ax.set_title(f"{result['variant']} {graph}, batch {batch}", fontsize=10)
        ax.set_xlabel("resolution: sqrt(H x W) pixels")
        ax.set_ylabel("median latency (s); bar to p90")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"asym-bench on {result['machine']['device']}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
