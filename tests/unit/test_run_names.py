"""Issue 36 item 2: runs read apart in the MLflow UI: the distinguishing parts of the name first, the headline
metrics under best/ (sorted before eval/, system/, test/, train/) and in the run's description."""

from infoprompt_ds.config import TrainConfig
from infoprompt_ds.tracking.run_metadata import run_name_for, summary_metrics, summary_note


def test_run_name_puts_method_seed_k_first():
    cfg = TrainConfig(method="prompt", seed=0, k_shot=64, model_name_or_path="sentence-transformers/all-MiniLM-L6-v2",
                      dataset="rotten_tomatoes")
    assert run_name_for(cfg) == "prompt-s0-k64-minilm-rt"
    # a sweep's other grid values come next, before backbone and task
    assert run_name_for(cfg, ("learning_rate=0.1",)) == "prompt-s0-k64-learning_rate=0.1-minilm-rt"
    assert run_name_for(TrainConfig(method="infoprompt", seed=3, k_shot=None)).startswith("infoprompt-s3-full-")
    assert run_name_for(TrainConfig(run_name="mine")) == "mine"


def test_summary_metrics_sort_first_and_name_the_headline():
    result = {"global_step": 12, "best_step": 6, "best_validation_accuracy": 0.75,
              "test": {"accuracy": 0.625, "mcc": 0.2, "macro_f1": 0.6}, "test_weights": "best"}
    m = summary_metrics(result)
    assert m == {"best/step": 6.0, "best/validation_accuracy": 0.75, "best/test_accuracy": 0.625}
    diagnostics = ["eval/accuracy", "system/cpu_utilization_percentage", "test/accuracy", "train/loss", "train/ce"]
    assert sorted([*m, *diagnostics])[:3] == sorted(m)
    assert summary_note(result) == "test accuracy 0.6250, validation accuracy 0.7500, best step 6"
    # the last weights were tested: no test number under best/
    assert "best/test_accuracy" not in summary_metrics({**result, "test_weights": "last"})
