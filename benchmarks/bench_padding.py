"""Issue 37 item 1: the padding fraction of the training micro-batches, default order vs --group_by_length,
and of the evaluation batches, the split's order in batches of 64 (before) vs sorted with a token budget
(now), on Rotten Tomatoes, Reuters R8 and 20 Newsgroups with the MiniLM tokenizer.

    python benchmarks/bench_padding.py [--seeds 0,1,2] [--epochs 5]

No model runs: the batches are the product's own (distributed.shard_batches / train_batches,
batching.eval_batches) over the product's tokenized splits (data.load.prepare_data with study.py's flags
for each data set), so the fractions are exact. Padding fraction = padded positions / all input positions
(each batch padded to its longest example; the prompt's virtual tokens not counted), the same quantity as
MLflow's train/padding_frac.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import MINILM, RESULTS, summarize, write_results  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="rt,r8,20ng")
    ap.add_argument("--k_shot", type=int, default=64)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the order averaged per seed")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval_batch", type=int, default=64)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--results", default=str(RESULTS / "padding.json"))
    args = ap.parse_args(argv)

    from infoprompt_ds.env import setup_environment

    setup_environment()
    from study import dataset_flags

    from infoprompt_ds.config_load import parse_config
    from infoprompt_ds.data.load import prepare_data
    from infoprompt_ds.method.model import load_model_config, load_tokenizer
    from infoprompt_ds.runtime.batching import eval_batches, lengths_of, padding_fraction
    from infoprompt_ds.runtime.distributed import shard_batches, train_batches

    work = Path(tempfile.mkdtemp(prefix="bench_padding_"))
    rows = []
    for name in args.datasets.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            flags = {"model_name_or_path": MINILM, "seed": str(seed), "output_dir": str(work / "out"),
                     "per_device_train_batch_size": str(args.batch), **dataset_flags(name, args.k_shot, seed, None, work)}
            cfg = parse_config([x for k, v in flags.items() for x in (f"--{k}", v)])
            data = prepare_data(cfg, load_tokenizer(cfg), load_model_config(cfg))
            train, val = lengths_of(data.splits["train"]), lengths_of(data.splits["validation"])
            for world in [int(w) for w in args.worlds.split(",")]:
                def frac(grouped: bool) -> float:  # over ranks and epochs: positions-weighted
                    real = padded = 0
                    for epoch in range(args.epochs):
                        for rank in range(world):
                            b = train_batches(data.splits["train"], args.batch, world, rank, seed, epoch, grouped)
                            f = padding_fraction(train, b)
                            real_b = sum(train[i] for x in b for i in x)
                            real, padded = real + real_b, padded + real_b / (1 - f)
                    return 1 - real / padded

                ev_before = padding_fraction(val, shard_batches(len(val), args.eval_batch, world, 0, False, 0, 0))
                ev_after_b = eval_batches(val, args.eval_batch, world, 0, extra=cfg.n_virtual_tokens)
                rows.append({"dataset": name, "seed": seed, "world": world, "n_train": len(train),
                             "n_validation": len(val), "train_mean_len": sum(train) / len(train),
                             "train_max_len": max(train),
                             "train_padding_default": frac(False), "train_padding_grouped": frac(True),
                             "eval_padding_before": ev_before, "eval_padding_after": padding_fraction(val, ev_after_b),
                             "eval_forwards_before": len(shard_batches(len(val), args.eval_batch, world, 0, False, 0, 0)),
                             "eval_forwards_after": len(ev_after_b)})
                r = rows[-1]
                print(f"[padding] {name} seed {seed} world {world}: train {r['train_padding_default']:.3f} -> "
                      f"{r['train_padding_grouped']:.3f}; eval {r['eval_padding_before']:.3f} -> "
                      f"{r['eval_padding_after']:.3f} ({r['eval_forwards_before']} -> {r['eval_forwards_after']} "
                      f"forwards)", flush=True)
    summary = {}
    for name in args.datasets.split(","):
        for world in [int(w) for w in args.worlds.split(",")]:
            sel = [r for r in rows if r["dataset"] == name and r["world"] == world]
            summary[f"{name}_world{world}"] = {k: summarize([r[k] for r in sel]) for k in (
                "train_padding_default", "train_padding_grouped", "eval_padding_before", "eval_padding_after")}
    write_results(Path(args.results), {"benchmark": "padding", "settings": vars(args), "summary": summary,
                                       "rows": rows})
    print(f"[bench_padding] wrote {args.results}")


if __name__ == "__main__":
    main()
