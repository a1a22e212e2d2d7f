"""compare, step 3a: figures. Per comparison, the validation metric vs optimizer step (one panel per
cell, one line per method, a ± std band over seeds) and, per cell, the training losses (one panel per
loss). PNG to look at and SVG with text kept as text (for editing, and for the tests)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from infoprompt_ds.compare.runs import RunStats
from infoprompt_ds.compare.stats import arm_order, by_cell, natural_key

# What each curve measures, for the y axis: every loss here is a mean per example in nats (natural log).
METRIC_UNITS = {"accuracy": "fraction correct", "macro_f1": "macro-F1, 0–1", "mcc": "MCC, −1 to 1",
                "f1": "F1, 0–1", "relation_f1": "macro-F1 w/o no-relation, 0–1", "entity_f1": "entity F1, 0–1"}
LOSS_TITLES = {"train/ce": "classification cross-entropy", "train/head": "L_head (InfoNCE, unweighted)",
               "train/repr": "L_repr (InfoNCE, unweighted)", "train/kl": "bottleneck KL (unweighted)"}
BAND = "shaded band: ± 1 sample std over seeds (none for n = 1)"


def _band(ax, runs: list[RunStats], key: str, label: str, color) -> bool:
    """Mean over seeds as a line, ± 1 sample std as a band; the legend names the method and its n."""
    import pandas as pd

    curves = [r.history[key].set_index("step")["value"].rename(r.run_id) for r in runs if key in r.history]
    if not curves:
        return False
    wide = pd.concat(curves, axis=1).sort_index()
    n = wide.shape[1]
    mean, std = wide.mean(axis=1), wide.std(axis=1, ddof=1)
    ax.plot(mean.index, mean.values, label=f"{label} (n={n} seed{'s' if n > 1 else ''})", color=color, lw=1.6)
    if n > 1:
        ax.fill_between(mean.index, (mean - std).values, (mean + std).values, color=color, alpha=0.2, lw=0)
    return True


def _finish(fig, path_stem: Path, caption: str) -> list[Path]:
    fig.text(0.01, 0.005, caption, fontsize=8, ha="left", va="bottom", style="italic")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    paths = []
    for ext in ("png", "svg"):
        paths.append(path_stem.with_suffix(f".{ext}"))
        fig.savefig(paths[-1], dpi=150)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def plot_cells(stats_: list[RunStats], cell_cols: list[str], show_cols: list[str], metric: str,
               out: Path, experiment: str = "", task: str = "") -> list[Path]:
    """Figures for a paper, PNG (to look at) and SVG (text kept as text, for editing and for the tests):

    * val_<metric>: the validation metric vs optimizer step, one panel per cell (e.g. per k_shot), one
      line per method with its n seeds, a ± std band;
    * losses__<cell>: per cell, one panel per loss: the cross-entropy (the one objective every method
      shares) with all methods on one axis; each method's total loss on its own panel (different
      objectives, not comparable); the MI terms of InfoPrompt on theirs.
    Titles name the experiment and task; captions say what the band is."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 10})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cells = sorted(by_cell(stats_).items(), key=lambda kv: natural_key(kv[0]))
    all_arms = arm_order({a for _, arms in cells for a in arms})
    color = {a: colors[i % len(colors)] for i, a in enumerate(all_arms)}
    head = f"{experiment} — {task}" if experiment else task
    titles = {cell: _cell_title(cell, cell_cols, show_cols) for cell, _ in cells}

    paths = _plot_validation(cells, titles, color, metric, head, out)
    for cell, arms in cells:
        paths += _plot_losses(arms, titles[cell], color, head, out)
    return paths


def _cell_title(cell: tuple, cell_cols: list[str], show_cols: list[str]) -> str:
    shown = [(c.removeprefix("params."), v) for c, v in zip(cell_cols, cell) if c in show_cols]
    return ", ".join(f"{k}={v}" for k, v in shown)


def _plot_validation(cells, titles: dict, color: dict, metric: str, head: str, out: Path) -> list[Path]:
    """val_<metric>: one panel per cell, one line per method."""
    import matplotlib.pyplot as plt

    unit = METRIC_UNITS.get(metric, metric)
    fig, axes = plt.subplots(1, len(cells), figsize=(4.8 * len(cells) + 0.6, 3.8), squeeze=False, sharey=True)
    for ax, (cell, arms) in zip(axes[0], cells):
        for m in arm_order(arms):
            _band(ax, arms[m], f"eval/{metric}", m, color[m])
        ax.set_xlabel("optimizer step")
        ax.set_title(titles[cell] or "all runs of the comparison", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0][0].set_ylabel(f"validation {metric} ({unit})")
    fig.suptitle(f"{head}: validation {metric} during training")
    return _finish(fig, out / f"val_{metric}", f"Lines: mean over seeds; {BAND}.")


def _loss_panels(arms: dict[str, list[RunStats]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(title, [(arm, metric key)]) per panel: the cross-entropy with every method, each method's total
    loss alone (different objectives), each MI term with the methods that have it."""
    order = arm_order(arms)
    panels = []
    if any("train/ce" in r.history for rs in arms.values() for r in rs):
        panels.append((LOSS_TITLES["train/ce"], [(m, "train/ce") for m in order]))
    for m in order:
        if any("train/loss" in r.history for r in arms[m]):
            panels.append((f"total loss of {m} (its own objective)", [(m, "train/loss")]))
    for key in ("train/head", "train/repr", "train/kl"):
        users = [m for m in order if any(key in r.history for r in arms[m])]
        if users:
            panels.append((LOSS_TITLES[key], [(m, key) for m in users]))
    return panels


def _plot_losses(arms: dict[str, list[RunStats]], where: str, color: dict, head: str, out: Path) -> list[Path]:
    """losses__<cell>: one panel per loss of one cell (nothing when its runs logged no loss)."""
    import matplotlib.pyplot as plt

    panels = _loss_panels(arms)
    if not panels:
        return []
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.3 * nrows + 0.6), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for m, key in lines:
            _band(ax, arms[m], key, m, color[m])
        ax.set(title=title, xlabel="optimizer step", ylabel="loss (nats per example)")
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{head}: training losses" + (f" ({where})" if where else ""))
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", where.replace(", ", "__")) or "all"
    return _finish(fig, out / f"losses__{slug}", f"Mean over seeds of the per-window training mean; {BAND}. "
                   "Total losses of different methods are different objectives: separate panels.")
