"""Tracking names are an API: docs/tracking.md lists every name the training logs. The tests against
a real `mlflow server` are in tests/e2e/test_tracking.py."""

from __future__ import annotations

from conftest import ROOT


def test_every_logged_name_is_documented():
    """docs/tracking.md lists every param, metric and tag name the training logs (names are an API)."""
    import re
    from dataclasses import fields

    from infoprompt_ds.config import TrainConfig

    doc = (ROOT / "docs" / "tracking.md").read_text()
    documented = set(re.findall(r"`([\w./<>-]+)`", doc))
    params = [f.name for f in fields(TrainConfig)] + ["world_size", "zero_stage", "n_train", "n_validation",
                                                      "n_test", "total_steps", "trainable_params", "backbone_params"]
    source = "".join(p.read_text() for p in (ROOT / "infoprompt_ds" / "runtime").glob("*.py"))
    metrics = set(re.findall(r'"((?:train|eval|test)/\w+)"', source))
    from infoprompt_ds.method.loss import METRIC_NAMES

    metrics |= set(METRIC_NAMES)  # the method's diagnostics, logged through the loop
    from infoprompt_ds import metrics as task_metrics

    names = {m for ms in getattr(task_metrics, "METRICS", {}).values() for m in ms} | {"accuracy", "macro_f1", "mcc"}
    metrics |= {f"eval/{m}" for m in names}
    from infoprompt_ds.tracking.run_metadata import run_tags

    tags = set(run_tags(TrainConfig())) | {"best_step", "best_validation_<metric>", "version.<package>"}
    missing = [n for n in params + sorted(metrics) + sorted(tags) if n not in documented]
    assert not missing, f"not in docs/tracking.md: {missing}"
