"""Task metrics with the field's libraries: scikit-learn for classes, seqeval for entities.

classification: accuracy, macro_f1, mcc (+ f1 of the second label when there are two, as GLUE reports
for MRPC/QQP); relation: the same + relation_f1 (macro-F1 without the no-relation class, as SemEval-2010
Task 8 and TACRED score); ner: entity_f1 (entity-level micro-F1, seqeval) + token accuracy.
"""

from __future__ import annotations

from typing import Optional

from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRICS = {
    "classification": ("accuracy", "macro_f1", "mcc", "f1"),
    "relation": ("accuracy", "macro_f1", "mcc", "relation_f1"),
    "ner": ("entity_f1", "accuracy"),
}


def classification_metrics(preds: list[int], labels: list[int], n_labels: int) -> dict[str, float]:
    out = {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", labels=list(range(n_labels)), zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, preds)),
    }
    if n_labels == 2:
        out["f1"] = float(f1_score(labels, preds, pos_label=1, zero_division=0))
    return out


def compute_metrics(task_type: str, preds: list, labels: list, names: list[str],
                    no_relation: Optional[str] = None, strict_bio: bool = False) -> dict[str, float]:
    if task_type == "ner":
        from seqeval.metrics import f1_score as entity_f1
        from seqeval.scheme import IOB2

        y_true = [[names[t] for t in row] for row in labels]
        y_pred = [[names[t] for t in row] for row in preds]
        kwargs = {"mode": "strict", "scheme": IOB2} if strict_bio else {}
        flat_t = [t for row in labels for t in row]
        flat_p = [t for row in preds for t in row]
        return {"entity_f1": float(entity_f1(y_true, y_pred, zero_division=0, **kwargs)),
                "accuracy": float(accuracy_score(flat_t, flat_p))}
    out = classification_metrics(preds, labels, len(names))
    if task_type == "relation":
        keep = [i for i, n in enumerate(names) if n != no_relation]
        out["relation_f1"] = float(f1_score(labels, preds, average="macro", labels=keep, zero_division=0))
    return out


def check_metric(task_type: str, metric: str, n_labels: int) -> Optional[str]:
    """Why `metric` cannot be computed for this task, or None."""
    if metric not in METRICS[task_type]:
        return f"{metric} is not computed for {task_type}; use one of {', '.join(METRICS[task_type])}"
    if metric == "f1" and n_labels != 2:
        return "f1 needs exactly 2 labels; use macro_f1"
    return None
