"""Ranks and sharding: which examples a rank sees, passes over a split that every rank runs in step
(ZeRO-3 needs every rank to run the same number of forwards), and the trainable values in full."""

from __future__ import annotations

from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from torch.utils.data import DistributedSampler

from infoprompt_ds.internals import full_numel, invalidate_zero3_trace, local_numel
from infoprompt_ds.runtime.batching import eval_batches, length_grouped_batches, lengths_of


def shard_batches(n: int, batch_size: int, world: int, rank: int, shuffle: bool, seed: int, epoch: int):
    """This rank's micro-batches of example indices. DistributedSampler pads every rank to the same
    count, which ZeRO-3 needs: every rank must run the same number of forward passes."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


def train_batches(split, batch_size: int, world: int, rank: int, seed: int, epoch: int, group_by_length: bool):
    """This rank's training micro-batches of one epoch: DistributedSampler's order, or grouped by length
    (runtime/batching.py). Either way the same count on every rank, and a pure function of (seed, epoch)."""
    if group_by_length:
        return length_grouped_batches(lengths_of(split), batch_size, world, rank, seed, epoch)
    return shard_batches(len(split), batch_size, world, rank, True, seed, epoch)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def all_min(flag: bool) -> bool:
    """True only if `flag` is true on every rank (a collective: every rank must call it)."""
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_max_int(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def retrace_zero3(engine) -> None:
    """Our passes (train step, eval, unprompted cache) fetch different parameters, so ZeRO-3 must start a
    new fetch-order recording when switching between them, or DeepSpeed raises a 'tracing error'."""
    invalidate_zero3_trace(engine)


def no_grad_pass(engine, split, collate, batch_size: int, world: int, rank: int, device,
                 rows_of: Callable[[dict], list], extra: int = 0) -> list:
    """Run `rows_of(batch)` over every example of `split`, sharded over ranks, in eval mode; return all
    ranks' rows (all_gather), in no fixed order. Batches are sorted by length and sized to a token budget
    (batching.eval_batches: `batch_size` examples of the longest length, + `extra` positions each).
    Every rank runs the same number of batches, as ZeRO-3 requires."""
    engine.eval()
    retrace_zero3(engine)
    rows = []
    with torch.no_grad():
        for idx in eval_batches(lengths_of(split), batch_size, world, rank, extra):
            rows += rows_of(to_device(collate([split[i] for i in idx]), device))
    engine.train()
    retrace_zero3(engine)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def gather_trainable(engine) -> dict[str, Any]:
    """Full fp32 values of the trainable parameters (the optimizer's master copies). Collective."""
    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
            out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


def set_trainable(engine, tensors: dict[str, Any]) -> None:
    """Write values into the (possibly partitioned) trainable parameters, for evaluation."""
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
        for name, p in params.items():
            p.data.copy_(tensors[name].to(p.dtype))


def backbone_shard_report(model, rank: int, world: int) -> dict[str, int]:
    """How much of the frozen backbone this rank holds (under ZeRO-3 about 1/world of it), and in which
    dtype (bfloat16 with --bf16, also on CPU)."""
    params = list(model.backbone.parameters())
    return {"rank": rank, "world_size": world, "backbone_params_total": sum(full_numel(p) for p in params),
            "backbone_params_local": sum(local_numel(p) for p in params),
            "backbone_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params})}
