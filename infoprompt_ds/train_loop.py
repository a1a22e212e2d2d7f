"""The DeepSpeed training loop: setup, step, eval, checkpoint, resume. One loop for every task, method
and launcher (deepspeed, torchrun, srun, plain python).

Data flows one way: config → data → model → loss → engine step → tracking/checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, config_from_env_rank, fill_ds_config, load_ds_config, one_line, zero_stage


def setup_environment() -> None:
    """Environment defaults that must be in place before torch/deepspeed are imported."""
    # A plain `python train.py` is a one-rank job: give torch.distributed what a launcher would.
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("LOCAL_RANK", "0")
    # The deepspeed launcher does not split the cores between ranks; oversubscribed ranks run 2-3x slower.
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch deprecates the collective names DeepSpeed 0.19 still calls, once per call: pure noise.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)


# Exit code of a run stopped by SIGTERM/SIGUSR1 after saving a checkpoint (EX_TEMPFAIL: "try again"):
# SLURM scripts requeue on it, and `--resume_from_checkpoint latest` continues the same run.
EXIT_PREEMPTED = 75
# Exit code of a run stopped after max_nonfinite_steps NaN/inf losses or gradients in a row.
EXIT_DIVERGED = 3


class StopRequested(Exception):
    """Raised after a graceful stop has saved its checkpoint."""


class TrainingDiverged(Exception):
    """max_nonfinite_steps non-finite losses/gradients in a row; nothing was saved after the streak began."""


class _StopFlag:
    """SIGTERM/SIGUSR1 (what SLURM sends before preemption or the time limit) only set a flag; the loop
    finishes the step it is in, agrees with the other ranks, saves, and exits with EXIT_PREEMPTED."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


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


def prepare(cfg: TrainConfig) -> dict[str, Any]:
    """Every check that needs no model weights and no process group: fails in seconds on bad input."""
    from .checkpoint import resolve_checkpoint
    from .data import prepare_data
    from .model import load_model_config, load_tokenizer

    rank, local_rank, world = config_from_env_rank()
    ds_raw = load_ds_config(cfg.deepspeed)
    model_config = load_model_config(cfg)
    check_output_dir(cfg)
    resume = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir) if cfg.resume_from_checkpoint else None
    if resume is not None:
        from .checkpoint import verify_checkpoint_files

        verify_checkpoint_files(resume)  # a tampered pickle is refused here, before anything is created
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    from .metrics import check_metric

    problem = check_metric(cfg.task_type, cfg.metric_for_best_model, len(data.label_names))
    if problem:
        raise ConfigError("metric_for_best_model", problem)
    micro_per_epoch, total_steps = plan_steps(cfg, len(data.splits["train"]), world)
    ds_config = fill_ds_config(ds_raw, cfg, world, total_steps, model_config.hidden_size)
    return dict(rank=rank, local_rank=local_rank, world=world, model_config=model_config, tokenizer=tokenizer,
                data=data, micro_per_epoch=micro_per_epoch, total_steps=total_steps, ds_config=ds_config,
                resume=resume)


# --- distributed helpers --------------------------------------------------------------------------

def _shard_batches(n: int, batch_size: int, world: int, rank: int, shuffle: bool, seed: int, epoch: int):
    """This rank's micro-batches of example indices. DistributedSampler pads every rank to the same
    count, which ZeRO-3 needs: every rank must run the same number of forward passes."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def gather_trainable(engine) -> dict[str, Any]:
    """Full fp32 values of the trainable parameters (the optimizer's master copies). Collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
            out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


def set_trainable(engine, tensors: dict[str, Any]) -> None:
    """Write values into the (possibly partitioned) trainable parameters, for evaluation."""
    import deepspeed
    import torch

    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
        for name, p in params.items():
            p.data.copy_(tensors[name].to(p.dtype))


def backbone_shard_report(model, rank: int, world: int) -> dict[str, int]:
    """How much of the frozen backbone this rank holds: under ZeRO-3 about 1/world of it."""
    local = total = 0
    for p in model.backbone.parameters():
        total += getattr(p, "ds_numel", p.numel())
        # ZeRO-3 keeps tiny params (below stage3_param_persistence_threshold) whole on every rank.
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False) else \
            getattr(p, "ds_numel", p.numel())
    return {"rank": rank, "world_size": world, "backbone_params_total": total, "backbone_params_local": local}


def retrace_zero3(engine) -> None:
    """ZeRO-3 records the order in which a forward fetches parameters and replays it as a prefetch
    schedule. Our passes (train step, eval, unprompted cache) touch different parameters, so a new
    recording must start when switching between them, or DeepSpeed raises a 'tracing error'.
    DeepSpeed has no public call for this; the coordinator's own invalidation is what it uses inside."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    coordinator = offload.get_param_coordinator() if offload is not None else None
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()


# --- evaluation ------------------------------------------------------------------------------------

def _no_grad_pass(engine, split, collate, cfg: TrainConfig, world: int, rank: int, device, rows_of) -> list:
    """Run `rows_of(batch)` over every example of `split`, sharded over ranks, in eval mode; return all
    ranks' rows (all_gather). Every rank runs the same number of batches, as ZeRO-3 requires."""
    import torch
    import torch.distributed as dist

    engine.eval()
    retrace_zero3(engine)
    rows = []
    with torch.no_grad():
        for idx in _shard_batches(len(split), cfg.per_device_eval_batch_size, world, rank, False, 0, 0):
            rows += rows_of(_to_device(collate([split[i] for i in idx]), device))
    engine.train()
    retrace_zero3(engine)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def evaluate(engine, split, collate, cfg: TrainConfig, world: int, rank: int, names: list[str], device) -> dict:
    from .metrics import compute_metrics
    from .model import model_inputs

    def rows_of(batch):
        preds, labels = engine(**model_inputs(batch))["logits"].argmax(-1), batch["labels"]
        if cfg.task_type == "ner":  # one tag per word: the positions the loss does not ignore
            keep = labels != -100
            return [(i, p[k].tolist(), y[k].tolist()) for i, p, y, k in zip(batch["idx"].tolist(), preds, labels, keep)]
        return list(zip(batch["idx"].tolist(), preds.tolist(), labels.tolist()))

    rows = _no_grad_pass(engine, split, collate, cfg, world, rank, device, rows_of)
    by_idx = {i: (p, y) for i, p, y in rows}  # drops the sampler's padding duplicates
    preds, labels = zip(*by_idx.values())
    return compute_metrics(cfg.task_type, list(preds), list(labels), names, cfg.no_relation_label, cfg.strict_bio)


def compute_unprompted(engine, split, collate, cfg: TrainConfig, world: int, rank: int, device,
                       tokenizer, tracker, step: int):
    """z(x, no prompt) for every training example, once: the backbone is frozen, so it never changes.
    Each rank computes a shard and all ranks receive all of it. With `unprompted_cache_dir`, rows that
    an earlier run computed for the same backbone key come from the persistent cache instead."""
    import torch

    from .model import model_inputs

    def rows_of(batch):
        z = engine(**model_inputs(batch), unprompted_only=True)["z"]
        return list(zip(batch["idx"].tolist(), z.float().cpu()))

    if cfg.unprompted_cache_dir:
        return _unprompted_from_cache(engine, split, collate, cfg, world, rank, device, rows_of, tokenizer,
                                      tracker, step)
    cache = dict(_no_grad_pass(engine, split, collate, cfg, world, rank, device, rows_of))
    return torch.stack([cache[i] for i in range(len(split))]).to(device)


def _unprompted_from_cache(engine, split, collate, cfg: TrainConfig, world: int, rank: int, device, rows_of,
                           tokenizer, tracker, step: int):
    """Rank 0 reads the cache (other nodes may not share its file system) and sends every rank the hit
    indices and their rows; all ranks then compute only the misses, sharded as usual, and rank 0 merges
    them into the cache file. The result is the tensor compute_unprompted returns without a cache."""
    import torch
    import torch.distributed as dist

    from . import unprompted_cache as uc

    n, dim = len(split), engine.module.backbone.config.hidden_size
    key = path = None
    hit_idx: list[int] = []
    if rank == 0:
        try:
            fields = uc.key_fields(cfg, engine.module, tokenizer, device.type)
            key = uc.key_of(fields)
            path = uc.cache_path(cfg.unprompted_cache_dir, key)
            ex_keys = [uc.example_key(split[i]) for i in range(n)]
            stored = uc.load_cache(path, key, dim)
            hit_idx = [i for i, k in enumerate(ex_keys) if k in stored]
        except Exception as e:  # rank 0 must still reach the broadcast, or the other ranks would hang
            uc.warn(f"disabled for this run: {type(e).__name__}: {one_line(e)}")
            key, hit_idx = None, []
    agreed = [hit_idx]
    dist.broadcast_object_list(agreed, src=0)  # every rank must run the same misses (ZeRO-3 collectives)
    hit_idx = agreed[0]
    z_hit = torch.empty(len(hit_idx), dim, dtype=torch.float32)
    if rank == 0 and hit_idx:
        z_hit = torch.stack([stored[ex_keys[i]] for i in hit_idx]).float()
    if hit_idx:
        z_hit = z_hit.to(device)
        dist.broadcast(z_hit, src=0)
    z = torch.empty(n, dim, dtype=torch.float32)
    if hit_idx:
        z[torch.tensor(hit_idx, dtype=torch.long)] = z_hit.cpu()
    hits = set(hit_idx)
    missing = [i for i in range(n) if i not in hits]
    if missing:  # the same decision on every rank: the hit set was agreed above
        subset = [split[i] for i in missing]  # each keeps its "idx", the row of the full split
        for i, row in _no_grad_pass(engine, subset, collate, cfg, world, rank, device, rows_of):
            z[i] = row
    if rank == 0 and key is not None:
        total = uc.save_cache(path, key, fields, {ex_keys[i]: z[i] for i in missing}, dim) if missing else len(stored)
        print(f"[cache] z(x, no prompt): {len(hit_idx)}/{n} hits from {path} ({len(missing)} computed; "
              f"the file holds {total} rows)", flush=True)
        if tracker is not None:
            tracker.set_tags({"unprompted_cache.key": key})
            tracker.log_metrics({"train/unprompted_cache_hits": float(len(hit_idx))}, step)
    return z.to(device)


# --- the run ------------------------------------------------------------------------------------------

def run(cfg: TrainConfig) -> dict[str, Any]:
    setup_environment()
    ctx = prepare(cfg)  # bad input fails here, before any process group, weights or output
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from tqdm.auto import tqdm
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    from .checkpoint import load_checkpoint, save_checkpoint, save_export, write_json_atomic
    from .method import Diagnostics
    from .model import build_model, model_inputs
    from .tracking import Tracker

    rank, world, data = ctx["rank"], ctx["world"], ctx["data"]
    ds_config, total_steps, micro_per_epoch = ctx["ds_config"], ctx["total_steps"], ctx["micro_per_epoch"]
    accel = get_accelerator()
    on_gpu = accel.device_name() != "cpu"
    stop = _StopFlag()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                               timeout=timedelta(minutes=cfg.dist_timeout_minutes))
    if on_gpu:
        accel.set_device(ctx["local_rank"])
    device = torch.device(accel.device_name(ctx["local_rank"]) if on_gpu else "cpu")
    dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32

    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite_output_dir and not cfg.resume_from_checkpoint:
            for stale in ("metrics.json", "export", "best"):
                shutil.rmtree(out / stale, ignore_errors=True) if (out / stale).is_dir() else (out / stale).unlink(missing_ok=True)
        write_json_atomic(out / "config.json", cfg.to_dict())
        write_json_atomic(out / "ds_config.json", ds_config)

    torch.manual_seed(cfg.seed)  # head/estimator init: the same on every rank
    model = build_model(cfg, ctx["model_config"], ctx["tokenizer"], data.label_names, dtype, ds_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    shard = backbone_shard_report(engine.module, rank, world)
    (out / "ranks").mkdir(exist_ok=True, parents=True)
    write_json_atomic(out / "ranks" / f"rank{rank}.json", shard)

    # NER labels are per token and need padding too (with the loss's ignore index).
    collate = DataCollatorForTokenClassification(ctx["tokenizer"], return_tensors="pt") if cfg.task_type == "ner" \
        else DataCollatorWithPadding(ctx["tokenizer"], return_tensors="pt")
    train, val, test = data.splits["train"], data.splits["validation"], data.splits["test"]

    client: dict[str, Any] = {}
    if ctx["resume"] is not None:
        client = load_checkpoint(engine, ctx["resume"])
    start_step = int(client.get("global_step", 0))
    best = {"metric": client.get("best_metric"), "step": client.get("best_step")}

    tracker = Tracker(enabled=rank == 0)
    run_name = cfg.run_name or f"{cfg.method}-{Path(cfg.model_name_or_path).name}-seed{cfg.seed}"
    tags = {"method": cfg.method, "backbone": cfg.model_name_or_path,
            "task": cfg.task or (Path(cfg.train_file).stem if cfg.train_file else cfg.dataset)}
    tracker.start(cfg.mlflow_experiment, cfg.output_dir, run_name, client.get("mlflow_run_id"), tags,
                  system_metrics=cfg.system_metrics or None)
    status = "FAILED"
    try:
        if not client:
            tracker.log_params({**cfg.to_dict(), "world_size": world, "zero_stage": zero_stage(ds_config),
                                "n_train": len(train), "n_validation": len(val), "n_test": len(test),
                                "total_steps": total_steps, "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
                                "backbone_params": shard["backbone_params_total"]})
            tracker.log_artifact(out / "ds_config.json")
        z_cache = None
        if engine.module.needs_unprompted:  # the estimators, the VIB's KL, or the z statistics need it
            z_cache = compute_unprompted(engine, train, collate, cfg, world, rank, device,
                                         ctx["tokenizer"], tracker, start_step)
            engine.module.set_z_stats(z_cache)  # estimator=normalized standardises z with these
            z_cache = z_cache if cfg.cache_unprompted else None

        meta = {"backbone": cfg.model_name_or_path, "labels": data.label_names,
                "n_virtual_tokens": engine.module.n_virtual_tokens,
                "pooling": engine.module.pooling, "max_length": cfg.max_length, "method": cfg.method,
                "text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column,
                "bottleneck_dim": cfg.bottleneck_dim if engine.module.vib is not None else None,
                "vib_head": engine.module.vib is not None, "estimator": cfg.estimator,
                "z_stats": engine.module.z_stats_meta(), "readout": "linear", "prompt_type": cfg.prompt_type,
                "task_type": cfg.task_type, "entity_markers": cfg.entity_markers}

        def eval_and_track(step: int):
            metrics = evaluate(engine, val, collate, cfg, world, rank, data.label_names, device)
            tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
            value = metrics[cfg.metric_for_best_model]
            if best["metric"] is None or value > best["metric"]:
                best.update(metric=value, step=step)
                tensors = gather_trainable(engine)
                if rank == 0:
                    save_export(out / "best", tensors, {**meta, "step": step, cfg.metric_for_best_model: value})
            if rank == 0:
                tqdm.write(f"[eval step {step}] " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                           + f" (best {cfg.metric_for_best_model}={best['metric']:.4f} @ {best['step']})")
            return metrics

        def checkpoint(step: int):
            save_checkpoint(engine, cfg.output_dir, step, {"global_step": step, "mlflow_run_id": tracker.run_id,
                            "best_metric": best["metric"], "best_step": best["step"],
                            "nonfinite_steps": nonfinite["total"]}, cfg.save_total_limit, rank)

        # Non-finite losses/gradients: counted in total (train/nonfinite_steps) and in a row; only an applied
        # optimizer update ends a streak. While a streak runs no checkpoint is saved (none could displace the
        # last good one), and max_nonfinite_steps in a row stop the run (TrainingDiverged, exit code 3).
        nonfinite = {"total": int(client.get("nonfinite_steps", 0)), "row": 0}
        diag = Diagnostics(cfg, engine.module)  # the method's per-window metrics and warnings

        def count_nonfinite(what: str, step: int):
            nonfinite["total"] += 1
            nonfinite["row"] += 1
            tracker.log_metrics({"train/nonfinite_steps": float(nonfinite["total"])}, step)
            if rank == 0:
                tqdm.write(f"[nonfinite] {what} at optimizer step {step}: skipped "
                           f"({nonfinite['row']} in a row, {nonfinite['total']} in total)")
            if nonfinite["row"] >= cfg.max_nonfinite_steps:
                from .checkpoint import checkpoint_root, complete_checkpoints

                done = complete_checkpoints(checkpoint_root(cfg.output_dir))
                bar.close()  # the error line must not land on the progress bar's line
                raise TrainingDiverged(
                    f"training diverged: {nonfinite['row']} non-finite steps in a row (last: {what} at optimizer "
                    f"step {step}; max_nonfinite_steps={cfg.max_nonfinite_steps}); last good checkpoint: "
                    f"{done[-1] if done else 'none'}; lower learning_rate or check the data, then resume with "
                    f"--resume_from_checkpoint latest")

        ga = cfg.gradient_accumulation_steps
        epochs_total = total_steps * ga / micro_per_epoch
        micro = start_step * ga  # the data stream is a pure function of the micro-step: exact resume
        window = torch.zeros(8, dtype=torch.float64)  # loss, ce, head, repr, kl, n, samples, tokens
        t0 = time.perf_counter()
        bar = tqdm(total=total_steps, initial=start_step, disable=rank != 0, desc="train", dynamic_ncols=True)
        epoch_cache: dict[int, list] = {}
        engine.train()
        while engine.global_steps < total_steps:
            epoch, pos = divmod(micro, micro_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache = {epoch: _shard_batches(len(train), cfg.per_device_train_batch_size, world, rank,
                                                     True, cfg.seed, epoch)}
            batch = _to_device(collate([train[i] for i in epoch_cache[epoch][pos]]), device)
            kwargs = {}
            if engine.module.needs_noise:
                # Noise from a generator keyed by (seed, micro-step, rank): the same after a resume.
                gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + micro * world + rank)
                b = batch["input_ids"].shape[0]
                kwargs["eps_pos"] = torch.randn(b, cfg.bottleneck_dim, generator=gen, device=device)
                kwargs["eps_neg"] = torch.randn(b, cfg.k_negatives, cfg.bottleneck_dim, generator=gen, device=device)
                kwargs["mi_scale"] = 1.0 - cfg.mi_decay * epoch / epochs_total
                if z_cache is not None:
                    kwargs["z_unprompted"] = z_cache[batch["idx"]]
            result = engine(**model_inputs(batch), labels=batch["labels"], **kwargs)
            micro += 1
            # A NaN/inf loss on any rank skips this micro-batch on every rank (they must agree, or ZeRO's
            # collectives would deadlock): no backward, no update; the data stream still moves on.
            finite = torch.tensor([float(torch.isfinite(result["loss"].detach()).all())])
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite.item():
                retrace_zero3(engine)  # this forward had no backward: start a fresh ZeRO-3 fetch trace
                count_nonfinite(f"loss={result['loss'].item()}", engine.global_steps)
                continue
            if micro % ga == 0 and ((engine.global_steps + 1) % cfg.logging_steps == 0
                                    or engine.global_steps + 1 == total_steps):
                diag.grad_ratios(result)  # the terms' gradients on the prompt, logging steps only
            engine.backward(result["loss"])
            diag.add(result)
            before = engine.global_steps
            engine.step()
            window += torch.tensor([result["loss"].item(), result["ce"].item(),
                                    *(result[k].item() if k in result else 0.0 for k in ("head", "repr", "kl")),
                                    1, batch["input_ids"].shape[0], batch["attention_mask"].sum().item()],
                                   dtype=torch.float64)
            if engine.global_steps == before:
                continue
            step = engine.global_steps
            if engine.was_step_applied():
                nonfinite["row"] = 0
            elif not cfg.fp16:  # fp16: the loss scaler's overflow skips are routine, it handles them itself
                # DeepSpeed skipped the update: the gradient norm was NaN/inf (the same on every rank).
                count_nonfinite("gradient norm=inf/nan", step)
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                dist.all_reduce(window)  # sums over ranks: global means and global throughput
                elapsed = time.perf_counter() - t0
                n = window[5].item()
                logs = {"train/loss": window[0] / n, "train/ce": window[1] / n, "train/lr": engine.get_lr()[0],
                        "train/samples_per_s": window[6] / elapsed, "train/tokens_per_s": window[7] / elapsed,
                        "train/epoch": micro / micro_per_epoch}
                if engine.module.uses_mi:
                    logs.update({"train/head": window[2] / n, "train/repr": window[3] / n, "train/kl": window[4] / n})
                logs = {k: float(v) for k, v in {**logs, **diag.flush()}.items()}
                diag.warn(logs, rank)
                tracker.log_metrics(logs, step)
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}", samples_s=f"{logs['train/samples_per_s']:.1f}")
                window.zero_()
                t0 = time.perf_counter()
            paused = time.perf_counter()  # throughput counts training only, not eval/checkpoint time
            if step % cfg.eval_steps == 0 or step == total_steps:
                eval_and_track(step)
            if ((cfg.save_steps and step % cfg.save_steps == 0) or step == total_steps) and not nonfinite["row"]:
                checkpoint(step)
            t0 += time.perf_counter() - paused
            # Every rank must agree to stop at the same step, or the checkpoint save would deadlock.
            flag = torch.tensor([stop.signum], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and step < total_steps:
                if not (cfg.save_steps and step % cfg.save_steps == 0):
                    checkpoint(step)
                if rank == 0:
                    tqdm.write(f"[stop] signal {flag.item()} at step {step}: checkpoint saved, exiting "
                               f"with code {EXIT_PREEMPTED}; resume with --resume_from_checkpoint latest")
                raise StopRequested()
        bar.close()

        final = gather_trainable(engine)
        if rank == 0:
            save_export(out / "export", final, {**meta, "step": engine.global_steps})
        if cfg.load_best_model_at_end and best["step"] is not None and (out / "best").is_dir():
            from .checkpoint import load_export

            set_trainable(engine, load_export(out / "best")[0])
        test_metrics = evaluate(engine, test, collate, cfg, world, rank, data.label_names, device)
        tracker.log_metrics({f"test/{k}": v for k, v in test_metrics.items()}, engine.global_steps)
        result = {"global_step": engine.global_steps, "best_step": best["step"],
                  f"best_validation_{cfg.metric_for_best_model}": best["metric"],
                  "test": test_metrics, "test_weights": "best" if cfg.load_best_model_at_end else "last",
                  "mlflow_run_id": tracker.run_id, "world_size": world}
        if rank == 0:
            print("[test] " + " ".join(f"{k}={v:.4f}" for k, v in test_metrics.items()), flush=True)
            tracker.log_artifact(out / "export", "export")
            write_json_atomic(out / "metrics.json", result)  # last: its presence means "finished"
            tracker.log_artifact(out / "metrics.json")
        status = "FINISHED"
        return result
    except (KeyboardInterrupt, StopRequested):
        status = "KILLED"  # resumable: the checkpoint holds the MLflow run id, a resume reopens it
        raise
    finally:
        tracker.end(status)
