"""The `zeroshot` arm of the study: a run's read-out at its initial weights, never trained.

    python benchmarks/zero_shot.py <train.py flags>      # writes output_dir/metrics.json like train.py

With a label-word read-out (lm_label, cloze) step 0 is the frozen LM's zero-shot verbaliser: a trained
method that falls below it has thrown the backbone's own signal away. It is the real setup() of train.py
(same data, sample, prompt init, ZeRO-3 engine), then validate() on validation and test, and no step.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infoprompt_ds.config_load import parse_config  # noqa: E402
from infoprompt_ds.io import write_json_atomic  # noqa: E402
from infoprompt_ds.runtime.setup import setup
from infoprompt_ds.runtime.train_loop import unprompted_pass, validate  # noqa: E402


def main(argv=None) -> dict:
    cfg = parse_config(argv if argv is not None else sys.argv[1:])
    run = setup(cfg)
    try:
        if run.engine.module.needs_unprompted:  # an instance prompt / VIB reads z with the training split's statistics
            unprompted_pass(run)
        run.engine.eval()
        val, test = validate(run, "validation"), validate(run, "test")
        metric = run.data.task.metric
        result = {"global_step": 0, "best_step": 0, f"best_validation_{metric}": val[metric],
                  "validation": val, "test": test, "zero_shot": True}
        if run.rank == 0:
            write_json_atomic(Path(cfg.output_dir) / "metrics.json", result)
            print("[zero-shot test] " + " ".join(f"{k}={v:.4f}" for k, v in test.items()), flush=True)
        run.status = "FINISHED"
        return result
    finally:
        run.tracker.end(run.status)


if __name__ == "__main__":
    main()
