"""Draws docs/figures/architecture.png: the data flow from config to tracking, with the modules.

.venv/bin/python tools/architecture_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

# (title, modules, x, y) on a 3-row grid; arrows follow FLOW.
STAGES = {
    "config": ("config", "config.py\nmodel/config.py", 0, 2),
    "data": ("data", "data_pipeline/\ndigit_chain, shards, loader", 1, 2),
    "model": ("model (architecture only)", "model/: rdt, recurrent,\nattention, moe, dispatch", 2, 2),
    "engine": ("engine", "parallel.py (EP, DeepSpeed)\noptim.py, plan.py", 3, 2),
    "train": ("training loop", "train.py (Trainer.step)\ntrain_metrics, resilience", 3, 1),
    "ckpt": ("checkpoint", "checkpoint.py (save/resume)\nsafe_io.py", 2, 1),
    "export": ("export", "export.py (safetensors shards)\nupcycle.py", 1, 1),
    "load": ("loading", "loading.py (whole or\none rank's experts)", 0, 1),
    "eval": ("evaluation", "evaluate.py, sweep.py\nresults_store.py (zarr)", 0, 0),
    "report": ("report", "report.py, plots.py\nstability.py", 1, 0),
    "track": ("tracking", "tracking.py (MLflow,\nrank 0 + node metrics)", 2, 0),
    "xp": ("main job", "experiment.py, cli.py", 3, 0),
}
FLOW = [("config", "data"), ("data", "model"), ("model", "engine"), ("engine", "train"), ("train", "ckpt"),
        ("ckpt", "export"), ("export", "load"), ("load", "eval"), ("eval", "report"), ("report", "track"),
        ("track", "xp")]  # fmt: skip
W, H, DX, DY = 2.7, 1.0, 3.3, 1.8


def main() -> None:
    fig, ax = plt.subplots(figsize=(12, 5.6))
    centre = {}
    for key, (title, modules, col, row) in STAGES.items():
        x, y = col * DX, row * DY
        centre[key] = (x + W / 2, y + H / 2)
        ax.add_patch(FancyBboxPatch((x, y), W, H, boxstyle="round,pad=0.05", fc="#e8f0fb", ec="#3060a0"))
        ax.text(x + W / 2, y + H * 0.78, title, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x + W / 2, y + H * 0.35, modules, ha="center", va="center", fontsize=7.5, family="monospace")
    for a, b in FLOW:
        (x0, y0), (x1, y1) = centre[a], centre[b]
        dx = (W / 2 + 0.08) * (1 if x1 > x0 else -1) if x0 != x1 else 0
        dy = (H / 2 + 0.08) * (1 if y1 > y0 else -1) if y0 != y1 else 0
        ax.annotate("", (x1 - dx, y1 - dy), (x0 + dx, y0 + dy), arrowprops={"arrowstyle": "->", "lw": 1.4})
    ax.set_xlim(-0.3, 3 * DX + W + 0.3)
    ax.set_ylim(-0.3, 2 * DY + H + 0.3)
    ax.axis("off")
    ax.set_title(
        "mythos-dist: config → data → model → engine → training → checkpoint → export → eval → tracking"
    )
    out = Path(__file__).resolve().parents[1] / "docs" / "figures" / "architecture.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
