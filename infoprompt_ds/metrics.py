"""Classification metrics (scikit-learn): accuracy, macro-F1, Matthews correlation."""

from __future__ import annotations

from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def classification_metrics(preds: list[int], labels: list[int], n_labels: int) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", labels=list(range(n_labels)), zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, preds)),
    }
