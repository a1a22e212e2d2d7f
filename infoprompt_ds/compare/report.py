"""compare, step 3b: the text people read. The table as `mean ± std` cells, one line per paired test,
Markdown without the optional `tabulate`, the files comparison.csv / significance.csv / comparison.md,
and a link that opens the MLflow UI on the compared runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from infoprompt_ds.compare.runs import is_nan

def fmt(mean: float, std: float, digits: int = 4, n: int = 2) -> str:
    """mean ± sample std; one seed has no spread to show, so just the value."""
    if is_nan(mean):
        return "—"
    if n < 2 or is_nan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(df) -> str:
    """A GitHub-style table (pandas' to_markdown needs the optional `tabulate`)."""
    if df is None or df.empty:
        return "(none)\n"
    cols = list(df.columns)

    def cell(v):
        if isinstance(v, float):
            return "—" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def display_table(table, show_cols: list[str], metric: str):
    """The table as people read it: one 'mean ± std' cell per quantity."""
    import pandas as pd

    if table.empty:
        return table
    out = table[["method"] + [c.removeprefix("params.") for c in show_cols] + ["seeds"]].copy()
    n = table["seeds"]
    out[f"best val {metric}"] = [fmt(m, s, 4, k) for m, s, k in zip(table[f"best_val_{metric}_mean"], table[f"best_val_{metric}_std"], n)]
    out[f"test {metric}"] = [fmt(m, s, 4, k) for m, s, k in zip(table[f"test_{metric}_mean"], table[f"test_{metric}_std"], n)]
    out["steps to target"] = [f"{fmt(m, s, 1, k)} ({k}/{t})" for m, s, k, t in
                              zip(table["steps_to_target_mean"], table["steps_to_target_std"], table["reached_target"], n)]
    out["seconds to target"] = [fmt(m, s, 1, k) for m, s, k in zip(table["seconds_to_target_mean"], table["seconds_to_target_std"], table["reached_target"])]
    out["samples/s"] = [fmt(m, s, 1, k) for m, s, k in zip(table["samples_per_s_mean"], table["samples_per_s_std"], n)]
    return pd.DataFrame(out)


def significance_lines(sig, metric: str, alpha: float) -> list[str]:
    lines = []
    for _, r in sig.iterrows():
        where = ", ".join(f"{k}={r[k]}" for k in sig.columns if k not in ("method_a", "method_b")
                          and not k.startswith(("test_", "best_val_")))
        key = f"test_{metric}"
        n, d, p = r[f"{key}_paired_seeds"], r[f"{key}_mean_diff"], r[f"{key}_p"]
        if is_nan(p):
            verdict = f"not testable (need >= 2 paired seeds, have {n})"
        else:
            verdict = ("significant" if p < alpha else "not significant") + f" at alpha={alpha} (paired t-test p={p:.3g})"
        lines.append(f"{r['method_a']} vs {r['method_b']}" + (f" [{where}]" if where else "")
                     + f": test {metric} difference {d:+.4f} over {n} paired seeds: {verdict}")
    return lines


def write_report(out: Path, title: str, table, sig, excl, show_cols: list[str], metric: str, target: float,
                 alpha: float) -> str:
    """comparison.csv (one row per group), significance.csv (one row per method pair and cell) and
    comparison.md (the same as people read it, with the runs not included); returns the Markdown."""
    shown = display_table(table, show_cols, metric)
    table.to_csv(out / "comparison.csv", index=False)
    sig.to_csv(out / "significance.csv", index=False)
    sig_text = significance_lines(sig, metric, alpha) if not sig.empty else ["no method pairs to test"]
    report = [title, "", f"metric: {metric}; target: validation {metric} >= {target}; mean ± std over seeds", "",
              markdown(shown), "## Significance (paired over seeds)", "", *[f"- {x}" for x in sig_text], "",
              "## Not included", "", markdown(excl)]
    (out / "comparison.md").write_text("\n".join(report), encoding="utf-8")
    return "\n".join(report)


def ui_link(uri: str, experiment_id: str, sweep: Optional[str]) -> str:
    """A link that opens the MLflow UI (3.x routes: #/experiments/<id>/runs) on the training runs, flat:
    a search filter lists matching child runs directly instead of under their collapsed sweep parent."""
    from urllib.parse import quote

    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    query = f"tags.`sweep.name` = '{sweep}' AND tags.`sweep.role` = 'child'" if sweep \
        else "tags.method LIKE '%'"
    link = f"{base}/#/experiments/{experiment_id}/runs?searchFilter={quote(query)}&orderByKey={quote('attributes.run_name')}&orderByAsc=true"
    if not uri.startswith("http"):
        link += f"   (after: mlflow ui --backend-store-uri {uri})"
    return link
