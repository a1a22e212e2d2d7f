"""setup(cfg) -> Run: checks, process group, output folder, model + DeepSpeed engine, resume, tracking.

The stages in order (each one-way; nothing later writes back to an earlier one):
  1. prepare(cfg): every weight-free check (runtime/preflight.py), the data, the output folder's lock;
  2. the process group (gloo on CPU, nccl on GPU);
  3. the output folder's config.json / ds_config.json (rank 0), settled before the model is built;
  4. the model (method/model.py) inside deepspeed.initialize; a resumed checkpoint loaded into it;
  5. the MLflow run (tracking/client.py), continued when the checkpoint names one.
Import this module only after env.setup_environment() ran (it imports torch and DeepSpeed).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional
import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding
from infoprompt_ds.runtime.checkpoint import (load_checkpoint)
from infoprompt_ds.config import TrainConfig
from infoprompt_ds.runtime.ds_config import zero_stage
from infoprompt_ds.runtime.distributed import (backbone_shard_report)
from infoprompt_ds.env import setup_environment  # noqa: F401  (re-exported: callers that imported it from here)
from infoprompt_ds.errors import EXIT_DIVERGED, EXIT_PREEMPTED, StopRequested, TrainingDiverged  # noqa: F401 (re-exported)
from infoprompt_ds.errors import early_signal
from infoprompt_ds.internals import full_numel
from infoprompt_ds.backbone import local_backbone_path
from infoprompt_ds.io import write_json_atomic
from infoprompt_ds.runtime.loss_guard import LossGuard
from infoprompt_ds.runtime.process_group import announce_shm_op_build, init_process_group, unlink_deepspeed_shm
from infoprompt_ds.method.loss import Diagnostics, inverse_frequency
from infoprompt_ds.method.model import build_model, backbone_dtype, pick_attention_kernel
from infoprompt_ds.method.deep import init_propagated
from infoprompt_ds.tracking.run_metadata import run_name_for, run_tags
from infoprompt_ds.tracking.client import Tracker
from infoprompt_ds.runtime.prepare import prepare


class _StopFlag:
    """SIGTERM/SIGUSR1 (what SLURM sends before preemption or the time limit), SIGINT (Ctrl-C) and SIGHUP
    (the terminal closed) only set a flag; the loop finishes the step it is in, agrees with the other ranks,
    saves, and exits with EXIT_PREEMPTED. A second Ctrl-C aborts at once (KeyboardInterrupt, no save)."""

    def __init__(self):
        self.signum = early_signal()  # one that came during start-up (errors.catch_stop_signals_early)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


@dataclass
class Run:
    """Everything one training run holds: set up once by setup(), read and updated by the functions below."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    engine: Any             # deepspeed.DeepSpeedEngine around model.InfoPromptModel
    data: Any               # data.PreparedData
    collate: Any
    tokenizer: Any
    tracker: Tracker
    out: Path
    total_steps: int
    micro_per_epoch: int
    start_step: int
    export_meta: dict[str, Any]  # what an export records beside its tensors
    stop: _StopFlag
    client: dict[str, Any]  # the resumed checkpoint's client state ({} on a fresh run)
    identity: dict          # what this run is (backbone, data, labels, shapes, world): recorded in each checkpoint
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    best_single_class: bool = False  # the best model predicted one class on validation (runtime/selection.py)
    # Non-finite losses/gradients: counted in total (train/nonfinite_steps) and in a row; only an applied
    # optimizer update ends a streak. While a streak runs no checkpoint is saved (none could displace the
    # last good one), and max_nonfinite_steps in a row stop the run (TrainingDiverged, exit code 3).
    nonfinite_total: int = 0
    nonfinite_row: int = 0
    guard: LossGuard = field(default_factory=LossGuard)  # NaN/inf, or a finite loss that exploded
    lock: Any = None        # the output_dir lock (outdir.lock_output_dir), held as long as the run
    z_cache: Optional[torch.Tensor] = None  # z(x, no prompt) per training example (cache_unprompted)
    diag: Any = None        # method.Diagnostics: the method's per-window metrics and warnings
    params: Optional[dict[str, Any]] = None  # the tracker's run parameters (a fresh run only)
    bar: Any = None
    status: str = "FAILED"  # the MLflow run status finish()/run() end with

    @property
    def step(self) -> int:
        return self.engine.global_steps

    @property
    def has_mi(self) -> bool:
        return self.engine.module.uses_mi


def setup(cfg: TrainConfig) -> Run:
    """Checks first (bad input fails before any process group, weights or output), then the process
    group, output folder, model + DeepSpeed engine, resume, and the tracking run."""
    setup_environment()
    prep = prepare(cfg)
    accel = get_accelerator()
    on_gpu = accel.device_name() != "cpu"
    stop = _StopFlag()
    # a store on loopback / in memory, not on every interface; deepspeed then reuses the process group
    init_process_group("nccl" if on_gpu else "gloo", timedelta(minutes=cfg.dist_timeout_minutes))
    if not on_gpu:
        announce_shm_op_build(prep.rank)  # the first run in a fresh venv compiles a DeepSpeed op here
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                               timeout=timedelta(minutes=cfg.dist_timeout_minutes))
    if not on_gpu:  # DeepSpeed leaves its CPU all-reduce segments in /dev/shm (the op is CPU-only)
        unlink_deepspeed_shm(prep.rank, prep.world)
    if on_gpu:
        accel.set_device(prep.local_rank)
    device = torch.device(accel.device_name(prep.local_rank) if on_gpu else "cpu")
    dtype = backbone_dtype(cfg)
    pick_attention_kernel(dtype, device)
    out = Path(cfg.output_dir)
    if prep.rank == 0:
        _prepare_output_dir(cfg, out, prep.ds_config)

    torch.manual_seed(cfg.seed)  # head/estimator init: the same on every rank
    task = prep.data.task
    model = build_model(cfg, prep.model_config, prep.tokenizer, task, dtype, prep.ds_config, prep.data.readout)
    if cfg.class_weights == "auto":  # read by method/loss.assemble's CE (None: a balanced training split)
        model.class_weight = inverse_frequency(prep.data.splits["train"]["labels"], len(prep.data.label_names))
        if prep.rank == 0 and model.class_weight is not None:
            print("class_weights: " + ", ".join(f"{n}={w:.3f}" for n, w in zip(prep.data.label_names,
                                                                              model.class_weight.tolist())), flush=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=prep.ds_config)
    shard = backbone_shard_report(engine.module, prep.rank, prep.world)
    (out / "ranks").mkdir(exist_ok=True, parents=True)
    write_json_atomic(out / "ranks" / f"rank{prep.rank}.json", shard)

    # NER labels are per token and need padding too (with the loss's ignore index).
    collate = DataCollatorForTokenClassification(prep.tokenizer, return_tensors="pt") if task.type == "ner" \
        else DataCollatorWithPadding(prep.tokenizer, return_tensors="pt")
    client = load_checkpoint(engine, prep.resume) if prep.resume is not None else {}
    if not client and engine.module.deep_prompt is not None and cfg.deep_prompt_init == "propagate":
        init_propagated(engine.module, engine)  # needs the engine (ZeRO-3's hooks); a resume loads the vectors
    tracker = Tracker(enabled=prep.rank == 0)
    tracker.start(cfg.mlflow_experiment, cfg.output_dir, run_name_for(cfg), client.get("mlflow_run_id"), run_tags(cfg),
                  system_metrics=cfg.system_metrics or None)
    meta = {"backbone": cfg.model_name_or_path, "backbone_path": local_backbone_path(cfg.model_name_or_path),
            "labels": prep.data.label_names,
            "n_virtual_tokens": engine.module.n_virtual_tokens,
            "pooling": engine.module.pooling, "max_length": cfg.max_length, "method": cfg.method,
            "text_column": task.text_column, "text_pair_column": task.text_pair_column,
            "bottleneck_dim": cfg.bottleneck_dim if engine.module.vib is not None else None,
            "vib_head": engine.module.vib is not None, "estimator": cfg.estimator,
            "z_stats": None,  # set by fit once the unprompted pass has run (estimator=normalized)
            **engine.module.readout.meta(), "prompt_type": cfg.prompt_type,  # readout, template, cue
            "prompt_depth": cfg.prompt_depth,
            "task_type": task.type, "entity_markers": cfg.entity_markers, "label_words": task.label_words,
            "metric": task.metric}
    run = Run(cfg, prep.rank, prep.world, device, engine, prep.data, collate, prep.tokenizer, tracker, out,
              prep.total_steps, prep.micro_per_epoch, int(client.get("global_step", 0)), meta, stop, client,
              prep.identity, lock=prep.lock,
              best_metric=client.get("best_metric"), best_step=client.get("best_step"),
              best_single_class=bool(client.get("best_single_class", False)),
              nonfinite_total=int(client.get("nonfinite_steps", 0)), diag=Diagnostics(cfg, engine.module, zero_stage(prep.ds_config), prep.rank))
    if not client:  # a resumed run logged its parameters when it started
        # resolved values (pooling, task, warmup...) first: the first value logged for a param wins
        tracker.log_resolved(cfg, prep.data, engine.module.pooling, prep.ds_config)
        train, val, test = (prep.data.splits[k] for k in ("train", "validation", "test"))
        run.params = {**cfg.to_dict(), "world_size": prep.world, "zero_stage": zero_stage(prep.ds_config),
                      "n_train": len(train), "n_validation": len(val), "n_test": len(test),
                      "total_steps": prep.total_steps, "trainable_params": sum(full_numel(p) for p in trainable),
                      "backbone_params": shard["backbone_params_total"]}
    return run


def _prepare_output_dir(cfg: TrainConfig, out: Path, ds_config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)  # (--overwrite_output_dir: cleared by outdir.lock_output_dir)
    write_json_atomic(out / "config.json", cfg.to_dict())
    write_json_atomic(out / "ds_config.json", ds_config)
