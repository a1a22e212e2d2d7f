"""compare, step 2: statistics over seeds. Runs are grouped by cell (what two methods must share) and arm
(the method); each group gets mean ± sample std over seeds, and each pair of arms in a cell a paired
t-test over the seeds both have (`paired_test`)."""

from __future__ import annotations

import math

from infoprompt_ds.compare.runs import RunStats, is_nan

def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std, n) over the values that exist; std is 0 for a single value."""
    import numpy as np

    v = [x for x in values if not is_nan(x)]
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def paired_test(a: dict[str, float], b: dict[str, float]) -> tuple[int, float, float]:
    """(paired seeds, mean of a - b, two-sided paired t-test p) over the seeds both have."""
    import numpy as np
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return 0, math.nan, math.nan
    diff = np.array([a[s] - b[s] for s in seeds])
    mean = float(diff.mean())
    if len(seeds) < 2:
        return len(seeds), mean, math.nan
    if np.allclose(diff, diff[0]):
        # Constant differences: the t statistic is infinite (or undefined at 0): no spread to test against.
        return len(seeds), mean, 1.0 if abs(mean) < 1e-12 else 0.0
    return len(seeds), mean, float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)


def by_cell(stats_: list[RunStats]) -> dict[tuple, dict[str, list[RunStats]]]:
    """{cell: {arm: [its runs, one per seed]}}."""
    cells: dict[tuple, dict[str, list[RunStats]]] = {}
    for s in stats_:
        cells.setdefault(s.cell, {}).setdefault(s.arm, []).append(s)
    return cells


def natural_key(values: tuple) -> tuple:
    """Sort key: numbers as numbers (k_shot 64 before 256), the rest as text."""
    out = []
    for v in values:
        try:
            out.append((0, float(v), ""))
        except ValueError:
            out.append((1, 0.0, str(v)))
    return tuple(out)


def arm_order(arms) -> list[str]:
    """InfoPrompt's arms first, then the others by name: the same order in every table and figure."""
    return sorted(arms, key=lambda m: (not m.startswith("infoprompt"), m))


def build_tables(stats_: list[RunStats], cell_cols: list[str], show_cols: list[str], metric: str, alpha: float):
    """(one row per cell and arm, one row per pair of arms in a cell with its paired test)."""
    import pandas as pd

    rows, sig_rows = [], []
    for cell, arms in sorted(by_cell(stats_).items(), key=lambda kv: natural_key(kv[0])):
        where = {c.removeprefix("params."): v for c, v in zip(cell_cols, cell) if c in show_cols}
        for arm in arm_order(arms):
            runs = arms[arm]
            bv, test = mean_std([r.best_val for r in runs]), mean_std([r.test for r in runs])
            st, sec = mean_std([r.steps_to_target for r in runs]), mean_std([r.seconds_to_target for r in runs])
            sps = mean_std([r.samples_per_s for r in runs])
            rows.append({"method": arm, **where, "seeds": len(runs),
                         f"best_val_{metric}_mean": bv[0], f"best_val_{metric}_std": bv[1],
                         f"test_{metric}_mean": test[0], f"test_{metric}_std": test[1],
                         "steps_to_target_mean": st[0], "steps_to_target_std": st[1], "reached_target": st[2],
                         "seconds_to_target_mean": sec[0], "seconds_to_target_std": sec[1],
                         "samples_per_s_mean": sps[0], "samples_per_s_std": sps[1],
                         "run_ids": " ".join(r.run_id for r in runs)})
        order = arm_order(arms)
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                row = {**where, "method_a": a, "method_b": b}
                for label, attr in ((f"test_{metric}", "test"), (f"best_val_{metric}", "best_val")):
                    n, diff, p = paired_test({r.seed: getattr(r, attr) for r in arms[a]},
                                             {r.seed: getattr(r, attr) for r in arms[b]})
                    row.update({f"{label}_paired_seeds": n, f"{label}_mean_diff": diff, f"{label}_p": p,
                                f"{label}_significant": (p < alpha) if not is_nan(p) else None})
                sig_rows.append(row)
    return pd.DataFrame(rows), pd.DataFrame(sig_rows)
