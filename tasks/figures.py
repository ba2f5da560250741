"""PNG figures of the paper studies (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tasks.paper import MAIN_PARAMETER  # noqa: E402

STYLE = {"mle": ("tab:red", "MLE"), "ple": ("tab:blue", "PLE (hypernetwork)"),
         "ple_closed": ("tab:green", "PLE (closed form)"), "hyper_nopenalty": ("tab:gray", "hypernetwork, lambda=0")}


def style(estimator: str) -> tuple[str, str]:
    return STYLE.get(estimator, ("tab:purple", estimator))


def fig4(rows: list[dict], path: Path) -> None:
    """One panel per distribution: its main parameter vs generation; mean +- standard error (band) and median
    (dashed) across seeds, per estimator; the truth as a black line."""
    distributions = list(dict.fromkeys(r["distribution"] for r in rows))
    cols = min(3, len(distributions))
    rows_n = math.ceil(len(distributions) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
    for ax, dist in zip(axes.flat, distributions):
        param = MAIN_PARAMETER[dist]
        sel = [r for r in rows if r["distribution"] == dist and r["parameter"] == param]
        for estimator in dict.fromkeys(r["estimator"] for r in sel):
            line = sorted((r for r in sel if r["estimator"] == estimator), key=lambda r: r["generation"])
            g = np.array([r["generation"] for r in line])
            mean, sem, median = (np.array([r[k] for r in line]) for k in ("mean", "sem", "median"))
            color, label = style(estimator)
            ax.plot(g, mean, color=color, label=f"{label}: mean +- s.e.")
            ax.fill_between(g, mean - sem, mean + sem, color=color, alpha=0.25, lw=0)
            ax.plot(g, median, color=color, ls="--", lw=1, label=f"{label}: median")
        truth = sel[0]["truth"]
        ax.axhline(truth, color="k", lw=0.8)
        if param != "p":  # scales and rates drift multiplicatively: a log axis, clipped to truth x/÷ 30
            ax.set_yscale("log")
            ax.set_ylim(truth / 30, truth * 30)
        ax.set_title(f"{dist} (n={sel[0]['n']}, {sel[0]['seeds']} seeds): {param}")
        ax.set_xlabel("generation")
    for ax in list(axes.flat)[len(distributions):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig3(cells: list[dict], path: Path) -> None:
    """Heatmap of the seed-averaged KL_MLE - KL_PLE (positive: PLE closer to the truth)."""
    weights = sorted({c["minority_weight"] for c in cells}, reverse=True)
    sizes = sorted({c["n"] for c in cells})
    grid = np.full((len(weights), len(sizes)), np.nan)
    for c in cells:
        grid[weights.index(c["minority_weight"]), sizes.index(c["n"])] = c["kl_diff"]
    limit = np.nanmax(np.abs(grid)) or 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit)
    for i in range(len(weights)):
        for j in range(len(sizes)):
            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set_yticks(range(len(weights)), [f"{w:g}" for w in weights])
    ax.set_xlabel("training size n")
    ax.set_ylabel("minority weight")
    ax.set_title("KL(MLE||truth) - KL(PLE||truth), mean over seeds\n(blue > 0: PLE better)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table1(summary: list[dict], path: Path) -> None:
    """R_Fair vs R_I (with R_Fair = R_I, procedurally fair, and R_Fair = 1, fair) and the generated minority
    share vs the training share, per estimator; error bars: standard deviation over seeds."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ratios = sorted({s["ratio"] for s in summary})
    for estimator in dict.fromkeys(s["estimator"] for s in summary):
        sel = sorted((s for s in summary if s["estimator"] == estimator), key=lambda s: s["ratio"])
        color, label = style(estimator)
        x = np.array([s["ratio"] for s in sel])
        left.errorbar(x, [s["r_fair"] for s in sel], yerr=[s["r_fair_sd"] for s in sel], color=color,
                      marker="o", capsize=3, label=label)
        right.errorbar([s["minority_share_train"] for s in sel], [s["minority_share"] for s in sel],
                       yerr=[s["minority_share_sd"] for s in sel], color=color, marker="o", capsize=3, label=label)
    left.plot(ratios, ratios, "k--", lw=0.8, label="R_Fair = R_I (procedurally fair)")
    left.axhline(1.0, color="k", lw=0.8, label="R_Fair = 1 (fair)")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("imbalance ratio R_I")
    left.set_ylabel("R_Fair = FID_min / FID_maj")
    left.legend(frameon=False, fontsize=8)
    shares = [1 / (1 + r) for r in ratios]
    right.plot(shares, shares, "k--", lw=0.8, label="as in training")
    right.set_xlabel("minority share in training")
    right.set_ylabel("minority share of generated images")
    right.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig2(summary: list[dict], path: Path, metrics=("fid", "recall", "precision", "minority_share")) -> None:
    """Metrics vs generation of the full loop, mean +- standard error over seeds, per estimator."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    for ax, metric in zip(axes, metrics):
        for estimator in dict.fromkeys(s["estimator"] for s in summary):
            sel = sorted((s for s in summary if s["estimator"] == estimator), key=lambda s: s["generation"])
            color, label = style(estimator)
            ax.errorbar([s["generation"] for s in sel], [s[metric] for s in sel],
                        yerr=[s[f"{metric}_sem"] for s in sel], color=color, marker="o", capsize=3, label=label)
        ax.set_xlabel("generation")
        ax.set_title(metric)
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
