"""Large backbones on this machine (issue 31): a random Llama of the 7B shape through ZeRO-3 + NVMe
offload (ZeRO-Infinity) + activation checkpointing, and the 3B shape through ZeRO-3 + CPU offload, each
prompt-tuned for a few optimizer steps (and InfoPrompt for one) with the real train.py.

    python benchmarks/bench_scale_large.py --scratch /data/scratch                 # 7B (NVMe) then 3B (CPU offload)
    python benchmarks/bench_scale_large.py --scratch DIR --cells 7b:zero3_nvme:prompt:3

The model is written shard by shard without ever existing whole in RAM: the module is built on the meta
device (shapes only), then each ~500 MB group of tensors is drawn at random in bf16, written with
safetensors and dropped; model.safetensors.index.json, config.json and a word-level tokenizer go next to
it, as save_pretrained would write them. Model files and swap live under --scratch (outside the repo) and
are deleted at the end (--keep to keep the model). Per run it appends a row to results/scale_large.json:
params, ds_config, gradient_checkpointing, steps_done, s/step, measured_peak_gib (peak RSS summed over the
process tree, sampled by psutil every 0.5 s), planned_peak_gib (`infoprompt plan`'s host estimate) and the
bytes under offload_dir at their largest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_scale import FILLER, NEG, POS, write_data  # noqa: E402
from bench_scale import SHAPES as SCALE_SHAPES  # noqa: E402
from common import RESULTS, ROOT  # noqa: E402

SHAPES = {  # LlamaConfig fields; MHA (no GQA) as Llama-2-7B
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096),
    "3b": dict(hidden_size=3200, num_hidden_layers=26, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=8640, vocab_size=32000, max_position_embeddings=2048),  # OpenLLaMA-3B's shape
    "1.1b": SCALE_SHAPES["1.1b"],  # TinyLlama-1.1B's shape (benchmarks/gpu_check.sh)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=128),
}
SHARD_BYTES = 500 * 2**20
GIB = 2**30


def tokenizer_for(vocab_size: int):
    """The word-level tokenizer of bench_scale's random Llama: the sentiment words plus filler entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "</s>"] + sorted(set(POS + NEG + FILLER))
    words += [f"<w{i}>" for i in range(vocab_size - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def write_random_llama(shape: str, out: Path) -> int:
    """A random bf16 LlamaModel of `shape` in `out`, one shard at a time; returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(**SHAPES[shape], pad_token_id=1, eos_token_id=2, bos_token_id=2, dtype="bfloat16")
    with torch.device("meta"):  # shapes only: nothing allocated
        specs = [(n, tuple(t.shape)) for n, t in LlamaModel(config).state_dict().items()]
    out.mkdir(parents=True, exist_ok=True)
    groups, cur, size = [], [], 0
    for name, shp in specs:
        nbytes = 2 * int(torch.Size(shp).numel())
        if cur and size + nbytes > SHARD_BYTES:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shp))
        size += nbytes
    groups.append(cur)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        # norms start at 1 (as LlamaRMSNorm), everything else N(0, 0.02) (initializer_range)
        tensors = {n: (torch.ones(s, dtype=torch.bfloat16) if n.endswith("norm.weight")
                       else torch.randn(s, generator=gen, dtype=torch.bfloat16).mul_(0.02)) for n, s in group}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel()
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(out)
    tokenizer_for(config.vocab_size).save_pretrained(out)
    return total


class TreeSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants (every rank), and of the bytes under a
    folder (the swap files), sampled every `every` seconds."""

    def __init__(self, pid: int, folder: Path, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.folder, self.every = pid, folder, every
        self.peak_rss = self.peak_disk = 0
        self.done = threading.Event()

    def run(self):
        import psutil

        while not self.done.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root] + root.children(recursive=True)
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                pass
            try:  # swap files come and go while we walk the folder
                disk = sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file())
                self.peak_disk = max(self.peak_disk, disk)
            except OSError:
                pass
            self.done.wait(self.every)


def run_flags(model: str, ds: str, method: str, steps: int, data: dict, out: Path, offload: Path, args) -> dict:
    flags = {"model_name_or_path": model, **data, "label_words": "pos=good,neg=bad", "k_shot": "none",
             "method": method, "deepspeed": ds, "output_dir": str(out), "offload_dir": str(offload),
             "n_virtual_tokens": args.n_virtual_tokens, "max_length": args.max_length,
             "per_device_train_batch_size": 1, "per_device_eval_batch_size": 4, "max_eval_samples": 2,
             "max_steps": steps, "logging_steps": 1, "eval_steps": 10**6, "learning_rate": 0.01,
             "save_steps": 0, "mlflow_experiment": "scale_large", "overwrite_output_dir": "true",
             "gradient_checkpointing": str(args.checkpointing).lower()}
    if args.bf16:
        flags["bf16"] = "true"
    return flags


def as_argv(flags: dict) -> list[str]:
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def planned_host_gib(flags: dict) -> tuple[float, float] | None:
    """`infoprompt plan --json`'s host estimates (all ranks, GiB) for the same flags: (RSS peak with the
    weight files mapped while loading, anonymous memory in training)."""
    cmd = [sys.executable, "-m", "infoprompt_ds.cli", "plan", *as_argv(flags), "--json", "true"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        print(f"[large] plan failed: {r.stderr.strip()[-500:]}", flush=True)
        return None
    plan = json.loads(r.stdout)
    return plan["host_total_bytes"] / GIB, plan["host_train_bytes"] * plan["ranks"] / GIB


def add_plan(row: dict, planned: tuple[float, float] | None) -> dict:
    if row.get("world_size") == 1 and row.get("peak_rss_gib_rank0", 0) > row["measured_peak_gib"]:
        row["measured_peak_gib"] = row["peak_rss_gib_rank0"]  # the kernel's high-water mark beats 0.5 s samples
    if planned is not None:
        row["planned_peak_gib"], row["planned_anon_train_gib"] = round(planned[0], 3), round(planned[1], 3)
        row["plan_error"] = round(planned[0] / row["measured_peak_gib"] - 1, 3)
        if row.get("peak_anon_gib_train"):
            row["plan_error_anon_train"] = round(planned[1] / row["peak_anon_gib_train"] - 1, 3)
    return row


def markdown(path: Path) -> str:
    """results/scale_large.json as docs/scaling.md's table."""
    out = ["| backbone | DeepSpeed json | checkpointing | method | steps | s/step (each) | load s | peak RSS GiB "
           "(planned, error) | peak anon in training GiB (planned, error) | offload_dir GiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in json.loads(path.read_text()):
        if r["returncode"] != 0:
            out.append(f"| {r['shape']} | {r['ds_config']} | {r['gradient_checkpointing']} | {r['method']} | failed "
                       f"(rc {r['returncode']}) | | | | | |")
            continue
        out.append(f"| {r['shape']} ({r['params'] / 1e9:.2f}B) | {r['ds_config']} | {str(r['gradient_checkpointing']).lower()} "
                   f"| {r['method']} | {r['steps_done']} | {', '.join(str(x) for x in r['s_per_step_all'])} "
                   f"| {r.get('load_s', 0):.0f} | {r['measured_peak_gib']:.2f} ({r.get('planned_peak_gib', 0):.2f}, "
                   f"{r.get('plan_error', 0):+.0%}) | {r.get('peak_anon_gib_train', 0):.2f} "
                   f"({r.get('planned_anon_train_gib', 0):.2f}, {r.get('plan_error_anon_train', 0):+.0%}) "
                   f"| {r['offload_dir_peak_bytes'] / GIB:.1f} |")
    return "\n".join(out)


def replan(path: Path) -> None:
    """Recompute the planner's columns of results/scale_large.json from each row's command (the model's
    config.json and weight files must still exist)."""
    rows = json.loads(path.read_text())
    for row in rows:
        argv = row["command"].split()[2:]  # python scale_rank.py --flag value ...
        flags = dict(zip([a[2:] for a in argv[0::2]], argv[1::2]))
        if Path(flags["model_name_or_path"], "config.json").is_file():
            add_plan(row, planned_host_gib(flags))
            print(f"[large] replanned {row['shape']} {row['method']}: {row.get('planned_peak_gib')}", flush=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")


def step_seconds(out: Path) -> list[float]:
    """Seconds per optimizer step from the run's MLflow history (train/samples_per_s, batch 1)."""
    from mlflow.tracking import MlflowClient

    from infoprompt_ds.tracking.store import default_store

    metrics = json.loads((out / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=default_store(out).uri)
    return [1.0 / m.value for m in sorted(client.get_metric_history(metrics["mlflow_run_id"], "train/samples_per_s"),
                                         key=lambda m: m.step)]


def run_one(shape: str, params: int, model: str, ds: str, method: str, steps: int, data: dict, work: Path,
            args) -> dict:
    name = f"{shape}-{ds}-{method}"
    out, offload, probe = work / name / "run", work / name / "swap", work / name / "probe"
    shutil.rmtree(work / name, ignore_errors=True)
    probe.mkdir(parents=True)
    flags = run_flags(model, ds, method, steps, data, out, offload, args)
    planned = planned_host_gib(flags)
    cmd = ["nice", "-n", "5", sys.executable, str(HERE / "scale_rank.py"), *as_argv(flags)]
    env = {**os.environ, "SCALE_PROBE_DIR": str(probe), "OMP_NUM_THREADS": str(args.threads),
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    print(f"[large] {name}: planned {planned} GiB (RSS, anon); {' '.join(cmd)}", flush=True)
    t = time.time()
    with open(work / name / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, offload)
        sampler.start()
        rc = proc.wait()
        sampler.done.set()
        sampler.join()
    row = {"shape": shape, "params": params, "ds_config": ds, "method": method, "world_size": 1,
           "gradient_checkpointing": args.checkpointing, "dtype": "bfloat16" if args.bf16 else "float32",
           "max_length": args.max_length, "n_virtual_tokens": args.n_virtual_tokens, "micro_batch": 1,
           "threads": args.threads, "returncode": rc, "job_wall_s": round(time.time() - t, 1),
           "measured_peak_gib": round(sampler.peak_rss / 2**30, 3),
           "offload_dir_peak_bytes": sampler.peak_disk, "command": " ".join(cmd[3:])}
    try:
        rank0 = json.loads((probe / "rank0.json").read_text())
        row.update({"peak_rss_gib_rank0": round(rank0["peak_rss_bytes"] / 2**30, 3),
                    "peak_anon_gib_train": round((rank0["peak_anon_bytes_train"] or 0) / 2**30, 3),
                    "load_s": rank0["load_s"]})
    except (OSError, ValueError, KeyError):
        pass
    if rc == 0:
        secs = step_seconds(out)
        row.update({"steps_done": len(secs), "s_per_step_all": [round(s, 1) for s in secs],
                    "s_per_step": round(sorted(secs[1:] or secs)[len(secs[1:] or secs) // 2], 1)})
    else:
        row["steps_done"] = 0
        row["error"] = (work / name / "log.txt").read_text()[-1500:]
    add_plan(row, planned)
    print(f"[large] {name}: {json.dumps({k: v for k, v in row.items() if k not in ('error', 'command')})}", flush=True)
    shutil.rmtree(offload, ignore_errors=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return row


def append_row(path: Path, row: dict) -> None:
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows.append(row)
    path.write_text(json.dumps(rows, indent=1) + "\n")


def tune_aio(folder: Path, mib: int = 512) -> list[dict]:
    """DeepSpeed's async_io handle writing and reading one `mib` MiB pinned tensor (O_DIRECT) with each
    block size x queue depth -> results/aio_tune.json; zero3_nvme.json's "aio" takes the best."""
    import torch
    from deepspeed.ops.op_builder import AsyncIOBuilder

    aio = AsyncIOBuilder().load(verbose=False)
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / "aio_tune.swp")
    buf = torch.randn(mib * 2**19, dtype=torch.bfloat16)
    rows = []
    for block in (256 * 1024, 1024 * 1024, 4 * 1024 * 1024):
        for depth in (4, 8, 32):
            h = aio.aio_handle(block, depth, False, True, 1)
            t = time.time()
            h.sync_pwrite(buf, path)
            w = time.time() - t
            t = time.time()
            h.sync_pread(buf, path)
            r = time.time() - t
            rows.append({"block_size": block, "queue_depth": depth, "write_gb_s": round(mib * 2**20 / w / 1e9, 3),
                         "read_gb_s": round(mib * 2**20 / r / 1e9, 3)})
            print(f"[aio] block {block >> 10} KiB, queue {depth}: write {rows[-1]['write_gb_s']} GB/s, "
                  f"read {rows[-1]['read_gb_s']} GB/s", flush=True)
    os.remove(path)
    (RESULTS / "aio_tune.json").write_text(json.dumps({"what": tune_aio.__doc__.split("\n")[0], "mib": mib,
                                                       "folder": str(folder), "rows": rows}, indent=1) + "\n")
    return rows


# The measured runs' backbones (LlamaConfig fields): bench_scale's shapes and SmolLM2-135M's config.
MEASURED_SHAPES = {
    "llama-1.1b-random": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                              intermediate_size=5632, vocab_size=32000),
    "llama-300m-random": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
                              intermediate_size=2816, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
}


def _measured_rows() -> list[dict]:
    """(model, ds settings, ranks, method, measured bytes and what they are) for every run in scale.json and
    scale_memory.json. Measured: the largest rank's peak anonymous memory in training where recorded (what
    the OOM killer counts), else its peak RSS (whole run, load included)."""
    out = []
    for cell in json.loads((RESULTS / "scale.json").read_text())["cells"]:
        if cell["returncode"] != 0:
            continue
        anon = [r.get("peak_anon_bytes_train") for r in cell["ranks"]]
        kind = "peak_anon_train" if all(anon) else "peak_rss"
        out.append({"source": "scale.json", "cell": cell["cell"], "model": cell["model"], "ds": cell["ds_config"],
                    "ranks": cell["world_size"], "method": cell["method"], "measured_kind": kind,
                    "measured_bytes": max(anon) if kind == "peak_anon_train" else cell["peak_rss_bytes_max"],
                    "prefetch_off": True})
    doc = json.loads((RESULTS / "scale_memory.json").read_text())
    for run in doc["runs"]:
        glibc = run["malloc"] == "glibc default"
        off = "reuse 0 + prefetch 0" in run["run"]
        out.append({"source": "scale_memory.json", "cell": run["run"], "model": "llama-300m-random", "ds": "zero3",
                    "ranks": run["world_size"], "method": "prompt", "measured_kind": "peak_anon_train",
                    "measured_bytes": max(r["peak_anon_bytes_train"] for r in run["ranks"]),
                    "prefetch_off": off or run["world_size"] == 1,
                    **({"excluded": "glibc's default allocator kept what ZeRO-3 freed (fixed since by "
                                    "env.return_freed_memory); the planner models the fixed runtime"}
                       if glibc and run["world_size"] > 1 else {})})
    return out


def plan_vs_measured(path: Path) -> list[dict]:
    """Every measured peak next to the planner's estimate for the same settings -> results/plan_vs_measured.json
    (tests/unit/test_plan.py recomputes each estimate from the row's inputs)."""
    from dataclasses import asdict

    from transformers import LlamaConfig

    from infoprompt_ds.runtime.plan import Setup, estimate, shape_of

    rows = []
    for m in _measured_rows():
        shape = shape_of(LlamaConfig(**MEASURED_SHAPES[m["model"]]))
        d = shape.hidden
        trainable = 8 * d + 2 * d + (2 * d * d + 2 * d * 32 if m["method"] == "infoprompt" else 0)
        setup = Setup(stage=3, ranks=m["ranks"], micro_batch=2, positions=8 + 32, bytes_per_weight=4,
                      checkpointing=False, offload_param="cpu" if m["ds"] == "zero3_offload" else None,
                      offload_optimizer="cpu" if m["ds"] == "zero3_offload" else None,
                      gather_one_at_a_time=m["prefetch_off"], trainable=trainable, on_gpu=False,
                      weight_file_bytes=2 * shape.params)  # every model was saved in bf16
        plan = estimate(shape, setup)
        planned = plan.host_train_bytes if m["measured_kind"] == "peak_anon_train" else plan.host_peak_bytes
        rows.append({**m, "shape": asdict(shape), "setup": asdict(setup), "planned_bytes": planned,
                     "measured_gib": round(m["measured_bytes"] / GIB, 3), "planned_gib": round(planned / GIB, 3),
                     "error": round(planned / m["measured_bytes"] - 1, 3)})
    large = RESULTS / "scale_large.json"
    for r in json.loads(large.read_text()) if large.is_file() else []:
        if r.get("returncode") == 0 and r.get("planned_peak_gib"):
            rows.append({"source": "scale_large.json", "cell": f"{r['shape']}-{r['ds_config']}-{r['method']}",
                         "measured_kind": "peak_rss_tree", "measured_gib": r["measured_peak_gib"],
                         "planned_gib": r["planned_peak_gib"], "error": r.get("plan_error")})
    path.write_text(json.dumps({"what": plan_vs_measured.__doc__.split("\n")[0], "tolerance": 0.2,
                                "rows": rows}, indent=1) + "\n")
    for r in rows:
        print(f"{r['source']:18s} {r['cell'][:55]:55s} measured {r['measured_gib']:6.2f} planned "
              f"{r['planned_gib']:6.2f} GiB ({r['error']:+.0%}){'  EXCLUDED' if r.get('excluded') else ''}")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scratch", help="folder outside the repo for the model files and swap")
    ap.add_argument("--cells", default="7b:zero3_nvme:prompt:3,7b:zero3_nvme:infoprompt:1,3b:zero3_offload:prompt:3",
                    help="shape:ds_config:method:steps, comma-separated")
    ap.add_argument("--max_length", type=int, default=64)
    ap.add_argument("--n_virtual_tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", type=lambda s: s.lower() == "true", default=True)
    ap.add_argument("--bf16", type=lambda s: s.lower() == "true", default=True)
    ap.add_argument("--out", default=str(RESULTS / "scale_large.json"))
    ap.add_argument("--keep", action="store_true", help="keep the model files")
    ap.add_argument("--markdown", action="store_true", help="only print --out as docs/scaling.md's table")
    ap.add_argument("--replan", action="store_true", help="only recompute the planner's columns of --out")
    ap.add_argument("--tune_aio", action="store_true", help="only measure aio block size x queue depth under --scratch")
    ap.add_argument("--plan_vs_measured", action="store_true",
                    help="only write results/plan_vs_measured.json from the measured results")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(Path(args.out)))
        return
    if args.replan:
        replan(Path(args.out))
        return
    if args.tune_aio:
        tune_aio(Path(args.scratch or "/tmp") / "aio_tune")
        return
    if args.plan_vs_measured:
        plan_vs_measured(RESULTS / "plan_vs_measured.json")
        return
    scratch = Path(args.scratch).resolve()
    if ROOT in scratch.parents or scratch == ROOT:
        sys.exit("--scratch must lie outside the repository")
    scratch.mkdir(parents=True, exist_ok=True)
    data = write_data(scratch)
    models: dict[str, tuple[str, int]] = {}
    try:
        for cell in args.cells.split(","):
            shape, ds, method, steps = cell.split(":")
            if shape not in models:
                free = shutil.disk_usage(scratch).free
                print(f"[large] writing the {shape} model ({free / 2**30:.0f} GiB free under {scratch})", flush=True)
                t = time.time()
                done = scratch / f"llama-{shape}" / "DONE"
                n = int(done.read_text()) if done.is_file() else write_random_llama(shape, scratch / f"llama-{shape}")
                done.write_text(str(n))
                models[shape] = (str(scratch / f"llama-{shape}"), n)
                print(f"[large] {shape}: {n:,} parameters written in {time.time() - t:.0f} s", flush=True)
            row = run_one(shape, models[shape][1], models[shape][0], ds, method, int(steps), data, scratch, args)
            append_row(Path(args.out), row)
    finally:
        if not args.keep:
            for path, _ in models.values():
                shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
