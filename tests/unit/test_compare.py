"""compare's paired test on edge cases (in process). The numbers on runs logged to a real `mlflow
server` are in tests/e2e/test_compare.py."""

from __future__ import annotations

import math

import pytest

from infoprompt_ds.compare.stats import paired_test


def test_paired_test_edge_cases():
    assert paired_test({"0": 1.0}, {"1": 0.5})[0] == 0
    n, diff, p = paired_test({"0": 0.9}, {"0": 0.5})
    assert n == 1 and diff == pytest.approx(0.4) and math.isnan(p)
    assert paired_test({"0": 0.9, "1": 0.8}, {"0": 0.9, "1": 0.8})[2] == 1.0  # identical: no difference
    assert paired_test({"0": 0.9, "1": 0.8}, {"0": 0.8, "1": 0.7})[2] == 0.0  # constant shift, no spread
    assert 0 < paired_test({"0": 0.9, "1": 0.8, "2": 0.7}, {"0": 0.8, "1": 0.75, "2": 0.5})[2] < 1

