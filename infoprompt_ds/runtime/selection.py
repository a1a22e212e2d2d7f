"""Best-model selection (issue 35): which validation metric picks the best model, and which of two
evaluated models is the better one.

* An imbalanced validation split (majority class over IMBALANCED of it) makes accuracy reward the model
  that predicts the majority class for everything; there `metric_for_best_model=auto` becomes macro-F1.
  A metric the user named always stands.
* A model that predicts one class for the whole validation split is never preferred over one that
  predicts several, unless the user asked for accuracy explicitly (then accuracy alone decides).
* Ties keep the earlier step (the loop evaluates in step order, step 0 first: the untrained model).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

IMBALANCED = 0.6  # majority-class share of validation above which accuracy stops being the default


def majority_share(labels: Sequence[int]) -> float:
    counts = Counter(labels)
    return max(counts.values()) / len(labels) if labels else 0.0


def default_metric(requested: str, task_type: str, resolved: str, val_labels: Sequence[int]) -> tuple[str, Optional[str]]:
    """(metric, a log line or None). `requested`: the config's metric_for_best_model; `resolved`: what
    auto gave (the preset's or the task type's). Only an auto accuracy on a classification task switches."""
    if requested != "auto" or task_type != "classification" or resolved != "accuracy":
        return resolved, None
    share = majority_share(list(val_labels))
    if share <= IMBALANCED:
        return resolved, None
    return "macro_f1", (f"metric_for_best_model: auto -> macro_f1 (the validation split's majority class is "
                        f"{share:.0%} of it, over {IMBALANCED:.0%}: accuracy would favour predicting it for "
                        f"everything); pass --metric_for_best_model accuracy to keep accuracy")


def with_default_metric(data, requested: str, rank: int = 0):
    """The prepared data with its task's metric switched as default_metric says (one line on rank 0)."""
    task = data.task
    if task.type != "classification" or "validation" not in data.splits:
        return data
    metric, note = default_metric(requested, task.type, task.metric, data.splits["validation"]["labels"])
    if note and rank == 0:
        print(note, flush=True)
    return data if metric == task.metric else dataclasses.replace(data, task=dataclasses.replace(task, metric=metric))


@dataclass(frozen=True)
class Candidate:
    step: int
    value: float         # the selection metric on validation
    single_class: bool   # predicted one class for every validation example


def single_class(preds: Sequence) -> bool:
    """One class predicted for every example (sequence tasks, whose predictions are lists, never count)."""
    return len(preds) > 1 and not isinstance(preds[0], list) and len(set(preds)) == 1


def better(new: Candidate, best: Optional[Candidate], explicit_accuracy: bool = False) -> bool:
    """Whether `new` replaces `best`. Strictly greater wins, so a tie keeps the earlier step."""
    if best is None:
        return True
    if not explicit_accuracy and new.single_class != best.single_class:
        return best.single_class  # a several-class predictor beats a single-class one, whatever the metric
    return new.value > best.value
