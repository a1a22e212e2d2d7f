"""Everything a run checks and resolves before it loads a weight or starts a process group, so that bad
input fails in seconds: the launcher's environment, the DeepSpeed json, the backbone's config, the output
folder (and its lock), the MLflow store, a checkpoint to resume, the tokenizer, the data and its task,
the step plan. `prepare(cfg) -> Prepared`; train_loop.setup builds the run from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from infoprompt_ds.runtime import outdir
from infoprompt_ds.runtime import preflight
from infoprompt_ds.runtime.checkpoint import resolve_checkpoint, verify_checkpoint_files
from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.config_load import config_from_env_rank
from infoprompt_ds.data.load import prepare_data
from infoprompt_ds.runtime.ds_config import fill_ds_config, load_ds_config, zero_stage
from infoprompt_ds.runtime.plan import plan_run
from infoprompt_ds.runtime.selection import with_default_metric
from infoprompt_ds.metrics import check_metric
from infoprompt_ds.method.model import load_model_config, load_tokenizer
from infoprompt_ds.method.deep import check_prompt_depth
from infoprompt_ds.tracking.store import check_tracking


def plan_steps(cfg: TrainConfig, n_train: int, world: int) -> tuple[int, int]:
    """(micro-batches per epoch per rank, total optimizer steps)."""
    micro_per_epoch = math.ceil(math.ceil(n_train / world) / cfg.per_device_train_batch_size)
    if cfg.max_steps > 0:
        return micro_per_epoch, cfg.max_steps
    return micro_per_epoch, max(1, math.ceil(cfg.num_train_epochs * micro_per_epoch / cfg.gradient_accumulation_steps))


def check_output_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.output_dir)
    if (out / "metrics.json").exists() and not cfg.overwrite_output_dir and not cfg.resume_from_checkpoint:
        raise ConfigError("output_dir", f"{out} holds a finished run; pass --overwrite_output_dir true, "
                          f"--resume_from_checkpoint latest, or another output_dir")
    if out.exists() and not out.is_dir():
        raise ConfigError("output_dir", f"{out} exists and is not a folder")
    preflight.check_output_dir_path(cfg)
    outdir.check_output_dir_state(cfg)  # a folder in use, or holding another run / files not ours


@dataclass
class Prepared:
    """What prepare() resolved without weights or a process group."""
    rank: int
    local_rank: int
    world: int
    model_config: Any
    tokenizer: Any
    data: Any  # data.PreparedData: splits + label names
    micro_per_epoch: int
    total_steps: int
    ds_config: dict
    resume: Optional[Path]
    identity: dict  # what this run's checkpoints record and a resume must match (outdir.run_identity)
    lock: Any       # the output_dir lock, held for the life of the process


def prepare(cfg: TrainConfig) -> Prepared:
    """Every check that needs no model weights and no process group: fails in seconds on bad input."""
    preflight.check_launcher_env()
    rank, local_rank, world = config_from_env_rank()
    ds_raw = load_ds_config(cfg.deepspeed)
    preflight.check_precision_and_devices(cfg, ds_raw)
    preflight.check_model_path(cfg)
    model_config = load_model_config(cfg)
    check_output_dir(cfg)
    check_tracking(cfg)  # a bad MLflow store is bad input: exit 2 now, not a run without tracking
    resume = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir) if cfg.resume_from_checkpoint else None
    if resume is not None:
        verify_checkpoint_files(resume)  # a tampered pickle is refused here, before anything is created
    tokenizer = load_tokenizer(cfg)
    preflight.check_tokenizer(cfg, tokenizer)
    data = prepare_data(cfg, tokenizer, model_config)  # resolves the read-out too (data.readout)
    data = with_default_metric(data, cfg.metric_for_best_model, rank)  # auto on imbalanced validation: macro_f1
    preflight.check_label_words(data.task, tokenizer)
    preflight.check_gradient_checkpointing(cfg, model_config, data.readout.kind)
    check_prompt_depth(cfg, model_config, data.readout.kind)  # deep: the layers must be found (method/deep.py)
    preflight.check_validation_labels(data)
    identity = outdir.run_identity(cfg, data, model_config, world, zero_stage(ds_raw), resume)
    if resume is not None:
        outdir.check_resume(resume, identity)  # before any weight: refuse another run's checkpoint
    problem = check_metric(data.task.type, data.task.metric, len(data.label_names))
    if problem:
        raise ConfigError("metric_for_best_model", problem)
    micro_per_epoch, total_steps = plan_steps(cfg, len(data.splits["train"]), world)
    ds_config = fill_ds_config(ds_raw, cfg, world, total_steps, model_config.hidden_size,
                               largest_weight=getattr(model_config, "vocab_size", 0) * model_config.hidden_size)
    if resume is not None:
        outdir.check_resume_plan(resume, total_steps, ds_config, Path(cfg.output_dir))
    estimate = plan_run(cfg, ds_config, model_config, world, strict=False)  # None: a backbone it cannot build
    preflight.report_plan(cfg, estimate)
    preflight.check_offload(cfg, ds_config, estimate.nvme_bytes if estimate else 0)
    preflight.check_weight_files(cfg)  # after the weight-free checks (their tests use folders without weights)
    lock = outdir.lock_output_dir(cfg, rank)  # last: held until the process ends
    return Prepared(rank, local_rank, world, model_config, tokenizer, data, micro_per_epoch, total_steps,
                    ds_config, resume, identity, lock)
