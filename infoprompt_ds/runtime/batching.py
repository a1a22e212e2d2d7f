"""Which examples go into which micro-batch, by length: the training order with `group_by_length` (the HF
Trainer's name and method) and the evaluation batches (sorted by length, as many examples as a token budget
holds). Both are pure functions of the lengths, the seed, the epoch and the rank, like the default order
(distributed.shard_batches): a resume rebuilds the same batches from the step number alone, and every rank
computes the whole plan and takes its share, so all ranks run the same number of forwards (ZeRO-3)."""

from __future__ import annotations

import math

import torch


def lengths_of(split) -> list[int]:
    """Token count of every example (its input_ids), in split order. A datasets.Dataset is read as one Arrow
    column (no per-example Python); a list of rows (the unprompted cache's misses) row by row."""
    if hasattr(split, "with_format"):
        import pyarrow.compute as pc

        col = split.with_format("arrow")[:].column("input_ids")
        return pc.list_value_length(col).to_numpy(zero_copy_only=False).tolist()
    return [len(row["input_ids"]) for row in split]


def length_grouped_batches(lengths: list[int], batch_size: int, world: int, rank: int, seed: int,
                           epoch: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch, grouped by length as transformers'
    get_length_grouped_indices does: a seeded permutation cut into megabatches of min(50, n / (4 x batch))
    global batches (transformers' multiplier; so each rank sorts over as many examples as a 1-rank run
    would), each sorted longest first and cut into global batches (world x batch_size examples,
    dealt to the ranks in turn, so the ranks' micro-batches of a step have similar lengths too); then the
    global batches are shuffled (same generator) and the one with the longest example goes first, so an
    out-of-memory batch shows at step 1. Like DistributedSampler, the permutation is padded with its first
    examples to a multiple of `world` and the generator is seeded with seed + epoch."""
    n = len(lengths)
    span = world * batch_size
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world) * world
    order = (order * math.ceil(total / n))[:total]  # DistributedSampler's padding (repeats when n < world)
    mega = max(1, min(total // (batch_size * 4), 50)) * span
    order = [i for s in range(0, total, mega)
             for i in sorted(order[s:s + mega], key=lambda i: lengths[i], reverse=True)]  # stable: ties keep order
    spans = [order[s:s + span] for s in range(0, total, span)]
    spans = [spans[j] for j in torch.randperm(len(spans), generator=g).tolist()]
    longest = max(range(len(spans)), key=lambda j: lengths[spans[j][0]])  # each span is sorted: [0] is its max
    spans[0], spans[longest] = spans[longest], spans[0]
    return [s[rank::world] for s in spans]


def eval_batches(lengths: list[int], batch_size: int, world: int, rank: int, extra: int = 0) -> list[list[int]]:
    """This rank's batches for a pass over a whole split, in no particular order (callers key rows by idx):
    examples sorted longest first and batched so that each batch holds at most the positions of
    `batch_size` examples of the split's longest length (+ `extra` positions each: the virtual tokens), i.e.
    the same peak as the configured batch, while short examples go many to a batch: less padding and fewer
    forwards (under ZeRO-3, fewer all-gathers of the backbone). Each global batch is dealt to the ranks in
    turn, its last one padded with its own last example to a multiple of `world` (duplicates: dropped by
    idx), so every rank runs the same number of forwards."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    if not order:
        return []
    budget = batch_size * (lengths[order[0]] + extra)
    batches, s = [], 0
    while s < len(order):
        per_rank = max(1, budget // (lengths[order[s]] + extra))  # order[s] is the longest of this batch
        chunk = order[s:s + per_rank * world]
        chunk += chunk[-1:] * (-len(chunk) % world)
        batches.append(chunk[rank::world])
        s += per_rank * world
    return batches


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Padded positions / all positions when each batch is padded to its longest example (benchmarks)."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - real / padded if padded else 0.0
