"""Issue 33 item 1: the cost of the saturation diagnostic (one no-grad forward at the initial prompt P0 per
logging window) against a training step, on the default job's model and data (RT, MiniLM, 64/class, batch 16),
and the figure of the default job's terms beside their values at P0.

    python benchmarks/bench_saturation.py [--repeats 20] [--run outputs/default_p0]

Cost: in process, no DeepSpeed: the median of `repeats` training micro-steps (forward + backward, the real
model and loss) and of `repeats` P0 passes (forward(at_p0=True) under no_grad), on the same batches. Per
logging window the diagnostic adds p0 / (logging_steps * step) of the training time.
Figure (with --run): train/head vs train/head_at_p0 and train/repr vs train/repr_at_p0 over the steps of a
finished run's MLflow store (the default job with --method infoprompt --logging_steps 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import RESULTS, summarize, write_results  # noqa: E402


def timings(repeats: int) -> dict:
    import torch

    from infoprompt_ds.config_load import parse_config
    from infoprompt_ds.data.load import prepare_data
    from infoprompt_ds.method.model import build_model, load_model_config, load_tokenizer, model_inputs

    work = Path(tempfile.mkdtemp(prefix="bench_saturation_"))
    cfg = parse_config(["--config", str(HERE.parent / "configs" / "default.yaml"), "--output_dir", str(work / "o")])
    tok, mc = load_tokenizer(cfg), load_model_config(cfg)
    data = prepare_data(cfg, tok, mc)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, mc, tok, data.task, torch.float32, None, data.readout)
    from transformers import DataCollatorWithPadding

    collate, train = DataCollatorWithPadding(tok, return_tensors="pt"), data.splits["train"]
    b = cfg.per_device_train_batch_size
    batches = [collate([train[i % len(train)] for i in range(k * b, (k + 1) * b)]) for k in range(repeats)]
    with torch.no_grad():
        z = [model(**model_inputs(x), unprompted_only=True)["z"] for x in batches]
    model.set_z_stats(torch.cat(z))
    model.train()
    step, p0 = [], []
    for x, z0 in zip(batches, z):
        g = torch.Generator().manual_seed(0)
        kw = {**model_inputs(x), "labels": x["labels"], "z_unprompted": z0,
              "eps_pos": torch.randn(b, cfg.bottleneck_dim, generator=g),
              "eps_neg": torch.randn(b, cfg.k_negatives, cfg.bottleneck_dim, generator=g)}
        t = time.perf_counter()
        model(**kw)["loss"].backward()
        step.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            model(**kw, at_p0=True)
        p0.append(time.perf_counter() - t)
    s, p = summarize(step), summarize(p0)
    return {"train_step_s": s, "p0_pass_s": p, "p0_over_step": p["median"] / s["median"],
            "overhead_per_window": {str(k): p["median"] / (k * s["median"]) for k in (1, 5, 20)},
            "batch_size": b, "repeats": repeats, "threads": torch.get_num_threads()}


def figure(run: Path, png: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    run_id = json.loads((run / "metrics.json").read_text())["mlflow_run_id"]

    def curve(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    out = {}
    for ax, t, name in zip(axes, ("head", "repr"), ("L_head", "L_repr")):
        for key, style in ((f"train/{t}", "-"), (f"train/{t}_at_p0", "--"), (f"train/{t}_chance", ":")):
            xs, ys = zip(*curve(key))
            ax.plot(xs, ys, style, label=key.removeprefix("train/"))
            out[key] = list(ys)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{name}: current prompt vs initial prompt P0")
        ax.legend()
    fig.suptitle("default job (RT, MiniLM, 64/class), --method infoprompt: the estimators carry the bounds")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return {"steps": [s for s, _ in curve("train/head")], **out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--run", default=None, help="a finished default-job run with --logging_steps 1 (its output_dir)")
    ap.add_argument("--results", default=str(RESULTS / "saturation.json"))
    ap.add_argument("--png", default=str(RESULTS / "saturation_default_job.png"))
    args = ap.parse_args(argv)
    from infoprompt_ds.env import setup_environment

    setup_environment()
    payload = {"cost": timings(args.repeats)}
    if args.run:
        payload["curves"] = figure(Path(args.run), Path(args.png))
        payload["figure"] = Path(args.png).name
    write_results(Path(args.results), payload, ["python", "benchmarks/bench_saturation.py", *(argv or sys.argv[1:])])
    print(json.dumps(payload["cost"], indent=1))


if __name__ == "__main__":
    main()
