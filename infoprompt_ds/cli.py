"""Console entry points. Bad input ends as one line on stderr and exit code 2, never a traceback.

    infoprompt train   --deepspeed ds_configs/zero3.json [--key value ...]   (= train.py, infoprompt-train)
    infoprompt predict --export outputs/run/best --text "..."                (= infoprompt-predict)
    infoprompt sweep   --config sweeps/rt_64shot.yaml                        (= infoprompt-sweep)
                       (the example ships in the package: `--config rt_64shot` finds it from any folder)
    infoprompt compare --experiment NAME                                     (= infoprompt-compare)
    infoprompt mlflow  import OUTPUT_DIR                                     (= infoprompt-mlflow)
    infoprompt plan    --model_name_or_path DIR [train flags] [--ranks N]     (memory planner; no weights)

Exit codes (infoprompt_ds/errors.py): 0 finished; 2 bad input; 3 training diverged; 75 stopped by
SIGTERM/SIGUSR1 after saving a checkpoint (resumable). Anything else is a crash.
"""

from __future__ import annotations

import os
import sys

from infoprompt_ds.errors import (EXIT_DIVERGED, EXIT_PREEMPTED, StopRequested, TrainingDiverged, catch_stop_signals_early, exit_on_config_error, fail)


def train_main(argv=None) -> None:
    from infoprompt_ds.config import ConfigError
    from infoprompt_ds.config_load import parse_config
    from infoprompt_ds.env import setup_environment

    catch_stop_signals_early()  # a stop during start-up is a stop (exit 75), not a silent death
    cfg = exit_on_config_error(parse_config, sys.argv[1:] if argv is None else argv, rank0_only=True)
    setup_environment()  # before train_loop imports torch and DeepSpeed
    from infoprompt_ds.runtime import train_loop
    from infoprompt_ds.runtime.process_group import shutdown_process_group

    try:
        result = train_loop.run(cfg)
    except ConfigError as e:
        fail(e, rank0_only=True)
    except StopRequested:
        # Every rank agreed to stop at this step; leave together: a launcher that sees one rank exit
        # non-zero terminates the others, which must not happen while a peer is still tearing down.
        shutdown_process_group()
        sys.exit(EXIT_PREEMPTED)
    except TrainingDiverged as e:
        fail(e, EXIT_DIVERGED, rank0_only=True)
    shutdown_process_group()  # every rank finished: leave the group before interpreter exit tears it down
    if int(os.environ.get("RANK", "0")) == 0:  # after the MLflow run has ended: the last lines on screen
        from infoprompt_ds.runtime.summary import print_summary

        try:
            print_summary(cfg, result)
        except Exception as e:  # the run finished and wrote metrics.json: a summary fault must not fail it
            print(f"warning: no closing summary ({type(e).__name__}: {e}); results: {cfg.output_dir}/metrics.json",
                  file=sys.stderr, flush=True)


def predict_main(argv=None) -> None:
    def go():
        from infoprompt_ds.predict import main

        main(sys.argv[1:] if argv is None else argv)

    exit_on_config_error(go)


def _sweep(argv):
    from infoprompt_ds.compare.sweep import main

    main(argv)


def _compare(argv):
    from infoprompt_ds.compare.cli import main

    main(argv)


def _mlflow(argv):
    from infoprompt_ds.tracking.client import main

    main(argv)


def _plan(argv):
    def go():
        from infoprompt_ds.runtime.plan import main

        main(argv)

    exit_on_config_error(go)


COMMANDS = {"train": train_main, "predict": predict_main, "sweep": _sweep, "compare": _compare, "mlflow": _mlflow, "plan": _plan}

# `infoprompt --help`: one line per command, then what a first session runs, in order.
HELP = """usage: infoprompt <command> [flags]      (infoprompt <command> --help: that command's flags)

Soft prompt tuning (InfoPrompt or vanilla) of a frozen backbone sharded with DeepSpeed ZeRO-3, tracked in MLflow.

commands:
  train     train a soft prompt and task head, one process (= python train.py; many: deepspeed train.py)
  predict   label texts with a run's export (output_dir/best or output_dir/export)
  sweep     run a grid of trainings (methods x seeds x settings) from a sweep file, into one MLflow store
  compare   compare an experiment's runs: table, paired tests over seeds, learning-curve plots
  mlflow    send a run's tracking entries buffered while the MLflow store was unreachable (mlflow import DIR)
  plan      memory per rank of a training, from the model's config alone (no weights loaded)

examples:
  deepspeed train.py --deepspeed ds_configs/zero3.json            # the default job; ends with a summary
  infoprompt train --config configs/ner_conll.yaml --max_steps 20
  infoprompt predict --export outputs/run/best --text "a gripping, funny film"
  infoprompt compare --experiment infoprompt --tracking_uri sqlite:///$PWD/outputs/run/mlflow.db
  infoprompt sweep --config sweeps/rt_64shot.yaml                # the example sweep (ships in the package too)
  infoprompt plan --model_name_or_path DIR --ranks 8

exit codes: 0 finished; 2 bad input; 3 training diverged; 75 stopped after saving a checkpoint (resumable)."""


def main(argv=None) -> None:
    """`infoprompt <command> [args]`: each command takes the flags of its own entry (`--help` lists them)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help", "help"):
            print(HELP)
            return
        fail(f"command: expected one of {', '.join(COMMANDS)} (infoprompt --help), got "
             f"{argv[0] if argv else 'nothing'!r}")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
