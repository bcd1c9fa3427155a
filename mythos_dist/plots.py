"""Evaluation figures (PNG, headless): accuracy vs loops, accuracy vs chain length (a line per loop
count), length × loops heatmap, convergence of
‖h_t − h_{t−1}‖, the stability figure and several recipes side by side. Inputs are
`results_store.summarize` / `spectral_report` dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_vs_loops(summary: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for split, d in summary["splits"].items():
        ax.plot(summary["loops"], d["acc"], marker="o", label=f"{split} (n={d['n']})")
    ax.set(xlabel="loops", ylabel="accuracy", ylim=(-0.02, 1.02), title="Accuracy vs loop count")
    ax.set_xticks(summary["loops"])
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def accuracy_vs_loops_recipes(summaries: dict[str, dict[str, Any]], path: Path) -> Path:
    """Several recipes in one figure: a panel per split, accuracy vs loop count, a line per recipe."""
    splits = list(dict.fromkeys(s for summary in summaries.values() for s in summary["splits"]))
    loops = sorted({n for summary in summaries.values() for n in summary["loops"]})
    fig, axes = plt.subplots(1, len(splits), figsize=(3.6 * len(splits), 3.4), sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits):
        for name, summary in summaries.items():
            if split in summary["splits"]:
                ax.plot(summary["loops"], summary["splits"][split]["acc"], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(loops, [str(n) for n in loops])
        ax.set(xlabel="loops", title=split, ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=8)
    heldout = {s.get("heldout", "test") for s in summaries.values()}
    fig.suptitle(f"Accuracy vs loop count ({'/'.join(sorted(heldout))} set)")
    return _save(fig, path)


def accuracy_vs_length(summary: dict[str, Any], path: Path) -> Path:
    """Accuracy per chain length (all splits together), a line per loop count."""
    rows = sorted((int(n), acc) for d in summary["splits"].values() for n, acc in d["acc_by_length"].items())
    lengths, acc_RL = [n for n, _ in rows], np.array([acc for _, acc in rows])
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(summary["loops"])))
    for i, (n_loops, color) in enumerate(zip(summary["loops"], colors)):
        ax.plot(lengths, acc_RL[:, i], color=color, lw=1.2, label=f"{n_loops} loops")
    ax.set(
        xlabel="chain length (digits)",
        ylabel="accuracy",
        ylim=(-0.02, 1.02),
        title="Accuracy vs chain length",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def accuracy_heatmap(summary: dict[str, Any], path: Path) -> Path:
    """Chain length (rows, all splits together: their length ranges are disjoint) × loop count."""
    rows = sorted((n, acc) for d in summary["splits"].values() for n, acc in d["acc_by_length"].items())
    lengths = [int(n) for n, _ in rows]
    acc_RL = np.array([acc for _, acc in rows])
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(summary["loops"]), 1.5 + 0.18 * len(lengths)))
    im = ax.imshow(acc_RL, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower")
    ax.set_xticks(range(len(summary["loops"])), summary["loops"])
    step = max(1, len(lengths) // 20)
    ax.set_yticks(range(0, len(lengths), step), lengths[::step])
    ax.set(xlabel="loops", ylabel="chain length", title="Accuracy by length × loops")
    fig.colorbar(im, ax=ax, label="accuracy")
    return _save(fig, path)


def convergence(summary: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for split, d in summary["splits"].items():
        y = np.asarray(d["delta_norm_mean"])
        ax.plot(np.arange(1, len(y) + 1), y, marker=".", label=split)
    ax.set(xlabel="loop t", ylabel="mean ‖h_t − h_{t−1}‖ at EQ", title="Convergence of the recurrence")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def stability(spectral: dict[str, Any], path: Path) -> Path:
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(8, 3.5))
    names = ["ρ(A)", "Jacobian radius"]
    values = [spectral["rho_A"], spectral["jacobian_radius"]]
    ax0.bar(names, values, color=["tab:blue", "tab:orange"])
    ax0.axhline(1.0, color="k", ls="--", lw=1)
    ax0.set(title=f"Spectral radii (after {spectral['n_loops']} loops)")
    ratios = spectral["contraction_ratios"]
    ax1.plot(range(2, len(ratios) + 2), ratios, marker="o", label="‖Δh_{t}‖ / ‖Δh_{t−1}‖")
    ax1.plot(
        range(1, len(spectral["jacobian_norm_ratios"]) + 1),
        spectral["jacobian_norm_ratios"],
        alpha=0.5,
        label="power-iteration ‖Jv‖",
    )
    ax1.axhline(1.0, color="k", ls="--", lw=1)
    ax1.set(xlabel="loop t / iteration", ylabel="ratio", title="Contraction")
    ax1.grid(alpha=0.3)
    ax1.legend()
    return _save(fig, path)


def accuracy_vs_loops_runs(report: dict[str, Any], path: Path) -> Path:
    """Mean accuracy per split over runs (e.g. seeds), min-max band, each run as a thin line."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    loops = report["loops"]
    for split, d in report["splits"].items():
        (line,) = ax.plot(loops, d["acc"], marker="o", label=f"{split} (mean of {len(d['per_run'])})")
        ax.fill_between(loops, d["min"], d["max"], color=line.get_color(), alpha=0.15)
        for acc in d["per_run"]:
            ax.plot(loops, acc, color=line.get_color(), lw=0.7, alpha=0.5)
    ax.set(
        xlabel="loops at evaluation", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy vs loops over runs"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def stability_over_training(rows: list[dict[str, Any]], path: Path) -> Path:
    """ρ(A) and the Jacobian radius (one line per loop count) against the training step."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["rho_A"] for r in rows], marker="o", label="ρ(A)")
    for n in rows[0]["jacobian_radius"]:
        ax.plot(steps, [r["jacobian_radius"][n] for r in rows], marker="o", label=f"Jacobian radius at h_{n}")
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set(xlabel="training step", ylabel="spectral radius", title="Loop stability over training")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def write_plots(summary: dict[str, Any], spectral: dict[str, Any], out_dir: Path) -> list[Path]:
    return [
        accuracy_vs_loops(summary, out_dir / "accuracy_vs_loops.png"),
        accuracy_vs_length(summary, out_dir / "accuracy_vs_length.png"),
        accuracy_heatmap(summary, out_dir / "accuracy_heatmap.png"),
        convergence(summary, out_dir / "convergence.png"),
        stability(spectral, out_dir / "stability.png"),
    ]
