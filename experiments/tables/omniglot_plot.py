"""The Omniglot table as a figure: held-out accuracy per setting and the official-run error.

``plot_table`` draws one panel per N-way K-shot setting (each learner's mean accuracy with its 95%
interval, the published figure as a cross, rows still under 3 seeds hatched) and one panel of the
error on the 20 official one-shot runs against people's and Bayesian program learning's, with
the ProtoNets ensembles scored on those runs in another colour.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

FULL_SEEDS = 3  # rows with fewer seeds are drawn hatched: still to be completed
PEOPLE_ERROR = 4.5  # Lake et al. 2015
BPL_MINIMAL_ERROR = 4.2  # Bayesian program learning on the minimal sets, Lake et al. 2019


def accuracy_panels(rows: list[dict[str, Any]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """Table rows grouped by (N ways, K shots), in the table's order, as the bars to draw."""
    panels: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        panels.setdefault((row["ways"], row["shots"]), []).append(
            {
                "method": row["method"],
                "mean": row["accuracy"]["mean"],
                "ci95": row["accuracy"]["ci95"],
                "published": row["published"],
                "seeds": len(row["seeds"]),
            }
        )
    return dict(sorted(panels.items()))


def _bars(ax: Any, bars: list[dict[str, Any]], value: str) -> None:
    y = list(range(len(bars)))[::-1]
    for yi, bar in zip(y, bars, strict=True):
        ci = bar["ci95"] if math.isfinite(bar["ci95"]) else 0.0
        partial = bar["seeds"] < FULL_SEEDS
        ax.barh(
            yi,
            bar[value],
            xerr=ci,
            color=bar.get("color", "C0") if not partial else "white",
            edgecolor=bar.get("color", "C0"),
            hatch="//" if partial else None,
            capsize=2,
        )
    labels = [b["method"] if "color" in b else f"{b['method']} (n={b['seeds']})" for b in bars]
    ax.set_yticks(y, labels, fontsize=7)
    ax.grid(axis="x", alpha=0.3)


def _accuracy_panel(ax: Any, ways: int, shots: int, bars: list[dict[str, Any]]) -> None:
    _bars(ax, bars, "mean")
    published = [(b["published"], j) for j, b in enumerate(bars[::-1]) if b["published"]]
    if published:
        ax.scatter(
            *zip(*published, strict=True),
            marker="x",
            color="k",
            zorder=3,
            label="published (full background set)",
        )
    low = min(b["mean"] - (b["ci95"] if math.isfinite(b["ci95"]) else 0.0) for b in bars)
    ax.set_xlim(max(0.0, low - 5), 100)
    ax.set_title(f"{ways}-way {shots}-shot, held-out characters", fontsize=9)
    ax.set_xlabel("accuracy (%)")


def _official_panel(
    ax: Any, official: list[dict[str, Any]], ensembles: list[dict[str, Any]]
) -> None:
    bars = [
        {
            "method": f"{r['method']} ({r['model']})",
            "error": r["error"]["mean"],
            "ci95": r["error"]["ci95"],
            "seeds": len(r["seeds"]),
        }
        for r in official
    ] + [
        {
            "method": f"ensemble #{e['order']}: {e['num_models']} ProtoNets, {e['views']} views",
            "error": e["error"],
            "ci95": e["ci95"],
            "seeds": FULL_SEEDS,  # an ensemble's members are its seeds
            "color": "C1",
        }
        for e in ensembles
    ]
    _bars(ax, bars, "error")
    ax.axvline(PEOPLE_ERROR, color="C3", ls="--", label=f"people {PEOPLE_ERROR}%")
    ax.axvline(
        BPL_MINIMAL_ERROR,
        color="C2",
        ls=":",
        label=f"Bayesian program learning, minimal sets {BPL_MINIMAL_ERROR}%",
    )
    ax.set_xlim(0, None)
    ax.set_xlabel("error (%) on the 20 official within-alphabet 20-way one-shot runs")
    ax.legend(fontsize=7, loc="lower right")


def plot_table(
    rows: list[dict[str, Any]],
    official: list[dict[str, Any]],
    out: Path,
    ensembles: list[dict[str, Any]] | None = None,
) -> Path:
    """Writes ``out``.png and returns its path; ``ensembles`` (from ``omniglot_ensembles``) are
    drawn in the official-run panel after the single learners, in another colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = accuracy_panels(rows)
    ensembles = ensembles or []
    fig = plt.figure(figsize=(14, 8.5 + 0.2 * len(ensembles)))
    grid = fig.add_gridspec(
        2, max(len(panels), 1), height_ratios=(3, 2 + 0.12 * len(ensembles))
    )
    for i, ((ways, shots), bars) in enumerate(panels.items()):
        _accuracy_panel(fig.add_subplot(grid[0, i]), ways, shots, bars)
    if official:
        _official_panel(fig.add_subplot(grid[1, :]), official, ensembles)
    handles, labels = fig.axes[0].get_legend_handles_labels() if fig.axes else ([], [])
    if handles:
        fig.legend(handles[:1], labels[:1], fontsize=8, loc="upper right")
    fig.suptitle(
        "Omniglot, trained on the minimal background sets (mean ± 95% CI; hatched: under "
        f"{FULL_SEEDS} seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
