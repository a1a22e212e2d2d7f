"""Items 1, 3 and 4 of issue 8: step cost of InfoPrompt vs vanilla prompt tuning, efficiency against
the measured matmul peak, and scaling (ranks, sequence length, prompt length).

    python benchmarks/bench_step.py                       # everything below, results/step.json
    python benchmarks/bench_step.py --suite cost          # item 1: 1 and 2 ranks x ZeRO-2/3
    python benchmarks/bench_step.py --suite scaling       # item 4: sequence length, n virtual tokens
    python benchmarks/bench_step.py --suite efficiency    # item 3: MiniLM + SmolLM2-135M vs matmul peak

How it measures. Each cell (model, ranks, ZeRO stage) is one worker process (`python`, or `torchrun
--nproc_per_node 2` for 2 ranks) that builds the real model with the project's own code
(infoprompt_ds.method.model.build_model, DeepSpeed engine from the filled ds_configs/zero{2,3}.json) for every
variant, then times the product's own `train_loop.train_step` (noise, forward with labels, the ranks' finiteness
agreement, engine.backward, engine.step, loss.item()) on one fixed batch (random token ids, no padding: B x L real tokens), with the
variants INTERLEAVED: block of steps of A, of B, of C, then again in a rotated order, --reps times. So
the ratios are taken side by side, seconds apart, under the same background load. Reported per variant:
median step time over all timed steps, and the ratio to vanilla prompt tuning as the median of the
per-repetition ratios (each repetition's blocks are adjacent in time).

Variants: `prompt` (vanilla prompt tuning), `infoprompt` (cache_unprompted=true: z(x, no prompt) comes
from the per-example cache computed before training, as train_loop passes it), `infoprompt_nocache`
(cache_unprompted=false: a second, no-grad backbone forward every step).

Memory. On a GPU: torch.cuda.max_memory_allocated per variant (peak reset before each of its blocks).
On CPU torch keeps no allocator statistics, so we report (a) the bytes autograd saves for the backward
of one step (activations; unique storages, via saved_tensors_hooks) per variant, (b) each rank's
parameter bytes (backbone share under ZeRO, trainable parts, optimizer state) and (c) the worker's peak
RSS (ru_maxrss, all variants of the cell together).

FLOPs. A prompt-tuning step costs about 4*N*T (forward 2NT + activation gradients 2NT, no weight
gradients): N = backbone parameters excluding the input embedding matrix (a lookup, not a matmul),
T = B*(n+L) positions. The achieved FLOP/s of the prompted step (the 2NT of a second unprompted forward
is not counted: it is overhead, so it shows up as lower efficiency) is divided by the torch-measured
matmul peak of the same process (n x n @ n x n, best of several) for the fraction.

On a CUDA machine the same command runs on the GPU in bf16 and adds a 1B-parameter random Llama (see
--gpu_large); nothing else changes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import MINILM, RESULTS, ROOT, matmul_peak, summarize, write_results  # noqa: E402

VARIANTS = ("prompt", "infoprompt", "infoprompt_nocache")
# The readouts suite (issue 12's cost item): per read-out, static and instance prompts, each InfoPrompt
# variant against the vanilla run with the same read-out and prompt type (ratio_to_control).
READOUT_VARIANTS = ("prompt", "infoprompt", "prompt_instance", "infoprompt_instance")
CONTROL = {"infoprompt": "prompt", "infoprompt_nocache": "prompt", "infoprompt_instance": "prompt_instance"}
RT_LABELS = ["rotten", "fresh"]
RT_WORDS = {"rotten": "bad", "fresh": "good"}  # the cloze/lm_label class rows start from these words' rows


# ------------------------------------------------------------------------------------------- worker

def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while fn() runs."""
    import torch

    seen: dict[tuple, int] = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device.type)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def worker(args) -> None:
    from infoprompt_ds.env import setup_environment

    setup_environment()  # before torch and DeepSpeed are imported
    import deepspeed
    import torch
    import torch.distributed as dist

    from infoprompt_ds.config import TrainConfig
    from infoprompt_ds.config_load import config_from_env_rank
    from infoprompt_ds.runtime.ds_config import fill_ds_config, load_ds_config
    from infoprompt_ds.runtime.distributed import backbone_shard_report, retrace_zero3
    from infoprompt_ds.internals import full_numel
    from infoprompt_ds.data.load import resolve_task
    from infoprompt_ds.data import readout as readouts
    from infoprompt_ds.method.model import build_model, load_model_config, load_tokenizer
    from infoprompt_ds.method.loss import Diagnostics
    from infoprompt_ds.runtime.setup import Run
    from infoprompt_ds.runtime.train_loop import train_step

    rank, local_rank, world = config_from_env_rank()
    on_gpu = torch.cuda.is_available() and not args.cpu
    ds_path = str(ROOT / "ds_configs" / f"zero{args.zero}.json")
    # Filled before the process group exists, as train_loop.prepare does: fill_ds_config validates with
    # DeepSpeedConfig as a one-rank job, which fails once torch.distributed reports world_size > 1.
    base_cfg = TrainConfig(model_name_or_path=args.model, per_device_train_batch_size=args.batch, bf16=on_gpu,
                           deepspeed=ds_path, learning_rate=1e-3, output_dir=tempfile.mkdtemp(),
                           max_length=min(args.seq_len, 8))
    ds_filled = fill_ds_config(load_ds_config(ds_path), base_cfg, world, 100_000,
                               load_model_config(base_cfg).hidden_size)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    if on_gpu:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    bf16 = on_gpu
    dtype = torch.bfloat16 if bf16 else torch.float32
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    peak = matmul_peak(device, dtype, n=args.peak_n, seconds=1.5)
    peaks = [peak["flops_per_s"]]

    rows = []
    engines: dict[tuple, object] = {}
    readout_of: dict[str, str] = {}  # measure label -> read-out

    def make(method: str, n_virtual: int, max_length: int, readout: str = "linear", prompt_type: str = "static",
             prompt_depth: str = "input"):
        cfg = TrainConfig(model_name_or_path=args.model, method=method, n_virtual_tokens=n_virtual,
                          max_length=max_length, per_device_train_batch_size=args.batch, bf16=bf16,
                          deepspeed=ds_path, learning_rate=1e-3, output_dir=tempfile.mkdtemp(),
                          readout=readout, prompt_type=prompt_type, label_words=RT_WORDS, prompt_depth=prompt_depth)
        mc = load_model_config(cfg)
        tok = load_tokenizer(cfg)
        ds = json.loads(json.dumps(ds_filled))  # the same for every variant: batch, lr, precision, width
        task = resolve_task(cfg, RT_LABELS)
        ro = readouts.resolve(readout, mc, task.type, task.label_words, pair=False)
        torch.manual_seed(0)
        model = build_model(cfg, mc, tok, task, dtype, ds, ro)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds)
        engine.train()
        return cfg, engine, mc

    def batch_for(mc, length: int, mask_token_id=None):
        g = torch.Generator().manual_seed(1234 + rank)
        ids = torch.randint(5, mc.vocab_size - 1, (args.batch, length), generator=g)
        b = {}
        if mask_token_id is not None:  # cloze reads z at <mask>: the last position, as a template ending in it
            ids[:, -1] = mask_token_id
            b["mask_pos"] = torch.full((args.batch,), length - 1, device=device)
        b |= {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": torch.randint(0, 2, (args.batch,), generator=g).to(device),
             "idx": torch.arange(args.batch, device=device)}  # rows of the z cache train_step looks up
        if getattr(mc, "type_vocab_size", 0):
            b["token_type_ids"] = torch.zeros_like(ids).to(device)
        return b

    def real_step(engine, cfg, batch, z_cache):
        """The product's own train_step on a Run that holds only what a step reads (z_cache None: the model
        computes z(x, no prompt) itself when it needs it, a second forward per step)."""
        run = Run(cfg=cfg, rank=rank, world=world, device=device, engine=engine, data=None, collate=None,
                  tokenizer=None, tracker=None, out=Path(cfg.output_dir), total_steps=100_000, micro_per_epoch=1,
                  start_step=0, export_meta={}, stop=None, client={}, identity={},
                  diag=Diagnostics(cfg, engine.module),
                  z_cache=z_cache)
        return lambda: train_step(run, batch, 0)

    def unprompted_cache(eng, batch):
        """What train_loop.fit computes before training: z(x, no prompt) per example and its statistics.
        Not train_loop.unprompted_pass: that one walks a Run's train split; here there is one synthetic batch."""
        eng.eval()
        retrace_zero3(eng)
        with torch.no_grad():
            z = eng(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "mask_pos")
                       if k in batch}, unprompted_only=True)["z"]
        eng.module.set_z_stats(z)
        eng.train()
        retrace_zero3(eng)
        return z

    def measure(label: str, mc, engines_by_variant: dict, length: int, n_virtual: int, mask_token_id=None):
        batch = batch_for(mc, length, mask_token_id)
        z_caches = {v: unprompted_cache(e, batch) if e.module.needs_unprompted and v != "infoprompt_nocache"
                    else None for v, (_, e) in engines_by_variant.items()}
        fns = {v: real_step(e, c, batch, z_caches[v]) for v, (c, e) in engines_by_variant.items()}
        order = list(fns)
        times = {v: [] for v in order}
        block = {v: [] for v in order}  # per-repetition medians
        saved = {}
        gpu_peak = {v: 0 for v in order}
        last = {}
        for v in order:  # warm-up (also records the ZeRO-3 fetch trace) + the saved-activation count
            eng = engines_by_variant[v][1]
            retrace_zero3(eng)
            for _ in range(args.warmup):
                fns[v]()
            saved[v] = _saved_bytes(fns[v])
            last[id(eng)] = v
        for rep in range(args.reps):
            # the matmul peak is re-measured between repetitions too: the best one seen is the limit
            peaks.append(matmul_peak(device, dtype, n=args.peak_n, seconds=0.3)["flops_per_s"])
            rot = order[rep % len(order):] + order[:rep % len(order)]
            for v in rot:
                eng = engines_by_variant[v][1]
                if last.get(id(eng)) != v:  # cached/uncached share one engine: different fetch order
                    retrace_zero3(eng)
                    fns[v]()  # one untimed step to re-record the trace
                    last[id(eng)] = v
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats()
                ts = []
                for _ in range(args.steps):
                    sync()
                    t = time.perf_counter()
                    fns[v]()
                    sync()
                    ts.append(time.perf_counter() - t)
                if on_gpu:
                    gpu_peak[v] = max(gpu_peak[v], torch.cuda.max_memory_allocated())
                # the slowest rank decides the step: take the max over ranks of each block's median
                med = torch.tensor([sorted(ts)[len(ts) // 2]], dtype=torch.float64)
                dist.all_reduce(med, op=dist.ReduceOp.MAX)
                times[v] += ts
                block[v].append(med.item())
        backbone = engines_by_variant[order[0]][1].module.backbone
        n_total = sum(full_numel(p) for p in backbone.parameters())
        emb = backbone.get_input_embeddings().weight
        n_emb = full_numel(emb)
        n_matmul = n_total - n_emb
        tokens = args.batch * (n_virtual + length)
        for v in order:
            eng = engines_by_variant[v][1]
            shard = backbone_shard_report(eng.module, rank, world)
            trainable = [p for p in eng.module.parameters() if p.requires_grad]
            n_train = sum(full_numel(p) for p in trainable)
            step_s = sorted(block[v])[len(block[v]) // 2]
            flops = 4 * n_matmul * tokens
            ratios = [a / b for a, b in zip(block[v], block.get("prompt", block[v]))]
            control = CONTROL.get(v) if CONTROL.get(v) in block else None
            ctl_ratios = [a / b for a, b in zip(block[v], block[control])] if control else None
            rows.append({
                "label": label, "variant": v, "world_size": world, "zero_stage": args.zero,
                "model": args.model_label, "batch": args.batch, "seq_len": length, "n_virtual_tokens": n_virtual,
                "step_s_median": step_s, "step_s_all": summarize(times[v]), "step_s_blocks": block[v],
                "ratio_to_prompt": sorted(ratios)[len(ratios) // 2] if "prompt" in block else None,
                "ratio_to_prompt_blocks": ratios if "prompt" in block else None,
                "readout": readout_of.get(label, "linear"), "control": control,
                "ratio_to_control": sorted(ctl_ratios)[len(ctl_ratios) // 2] if control else None,
                "ratio_to_control_blocks": ctl_ratios,
                "samples_per_s": args.batch * world / step_s,
                "saved_activation_bytes": saved[v],
                "gpu_peak_allocated_bytes": gpu_peak[v] if on_gpu else None,
                "backbone_params_total": n_total, "backbone_params_matmul": n_matmul,
                "backbone_params_local": shard["backbone_params_local"],
                "backbone_bytes_local": shard["backbone_params_local"] * emb.element_size(),
                "trainable_params": n_train,
                "tokens_per_step": tokens, "flops_per_step_4NT": flops, "achieved_flops_per_s": flops * world / step_s,
                "fraction_of_matmul_peak": flops / step_s / max(peaks),
                "fraction_of_matmul_peak_same_rep": sorted(flops / b / p for b, p in zip(block[v], peaks[-len(block[v]):]))[len(block[v]) // 2],
            })

    suite = args.what.split(",")
    for item in suite:
        kind, _, spec = item.partition(":")
        if kind == "variants":  # all variants at the default shape
            n_v, L = args.n_virtual, args.seq_len
            key = ("prompt", n_v)
            engines[key] = make("prompt", n_v, max(L, 8))
            engines[("infoprompt", n_v)] = make("infoprompt", n_v, max(L, 8))
            cfg_p, eng_p, mc = engines[key]
            cfg_i, eng_i, _ = engines[("infoprompt", n_v)]
            wanted = {"prompt": (cfg_p, eng_p), "infoprompt": (cfg_i, eng_i), "infoprompt_nocache": (cfg_i, eng_i)}
            measure("variants", mc, {v: wanted[v] for v in args.variants.split(",")}, L, n_v)
        elif kind == "readout":  # one read-out: static and instance prompts, vanilla and InfoPrompt
            n_v, L = args.n_virtual, args.seq_len
            built = {v: make(v.split("_")[0], n_v, max(L, 8), readout=spec,
                             prompt_type="instance" if v.endswith("_instance") else "static")
                     for v in args.variants.split(",")}
            mc = next(iter(built.values()))[2]
            label = f"readout_{spec}"
            readout_of[label] = spec
            tok = load_tokenizer(next(iter(built.values()))[0])
            measure(label, mc, {v: (c, e) for v, (c, e, _) in built.items()}, L, n_v,
                    tok.mask_token_id if spec == "cloze" else None)
        elif kind == "depth":  # issue 33: deep prompts against input prompts (vanilla), ratio_to_prompt
            n_v, L = args.n_virtual, args.seq_len
            built = {"prompt": make("prompt", n_v, max(L, 8)),
                     "prompt_deep": make("prompt", n_v, max(L, 8), prompt_depth="deep")}
            measure("depth", built["prompt"][2], {v: (c, e) for v, (c, e, _) in built.items()}, L, n_v)
        elif kind == "seq":  # sequence-length sweep, prompt + infoprompt, one engine each
            n_v = args.n_virtual
            lengths = [int(x) for x in spec.split("/")]
            cp, ep, mc = make("prompt", n_v, max(lengths))
            ci, ei, _ = make("infoprompt", n_v, max(lengths))
            for L in lengths:
                measure("seq_len", mc, {"prompt": (cp, ep), "infoprompt": (ci, ei)}, L, n_v)
        elif kind == "nvt":  # prompt-length sweep
            for n_v in [int(x) for x in spec.split("/")]:
                cp, ep, mc = make("prompt", n_v, args.seq_len)
                ci, ei, _ = make("infoprompt", n_v, args.seq_len)
                measure("n_virtual_tokens", mc, {"prompt": (cp, ep), "infoprompt": (ci, ei)}, args.seq_len, n_v)
        else:
            raise SystemExit(f"unknown worker item {item!r}")
    maxrss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], dtype=torch.float64)
    all_rss = [torch.zeros_like(maxrss) for _ in range(world)]
    dist.all_gather(all_rss, maxrss)
    if rank == 0:
        peak["flops_per_s_best_interleaved"] = max(peaks)
        peak["flops_per_s_all"] = peaks
        out = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "matmul_peak": peak,
               "peak_rss_bytes_per_rank": [int(x.item()) for x in all_rss], "rows": rows}
        Path(args.out).write_text(json.dumps(out, indent=1))
    dist.barrier()


# ------------------------------------------------------------------------------------------- driver

def gpu_large_model(cache: Path) -> str:
    """A 1.1B-parameter Llama (TinyLlama-1.1B shape) with random weights, saved once: speed only."""
    out = cache / "llama-1.1b-random"
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from prepare_assets import smollm2
    tok = AutoTokenizer.from_pretrained(smollm2())  # any Llama tokenizer; vocab is resized to it
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaModel(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def random_mlm(cache: Path, like: str) -> str:
    """A masked LM with MiniLM's shape and random weights (BertForMaskedLM, MLM head included), saved once:
    the cloze read-out's cost only. No packaged English MLM ships its MLM head (see docs/method.md)."""
    out = cache / "minilm-shape-mlm-random"
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertForMaskedLM

    from infoprompt_ds.backbone import resolve_model_path

    like = resolve_model_path(like)  # the packaged MiniLM folder for its hub name
    cfg = AutoConfig.from_pretrained(like)
    cfg.architectures = ["BertForMaskedLM"]
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(like).save_pretrained(out)
    return str(out)


def torch_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def run_cell(cell: dict, args, log_dir: Path) -> dict:
    out = log_dir / f"{cell['name']}.json"
    flags = ["--worker", "--out", str(out), "--model", cell["model"], "--model_label", cell["model_label"],
             "--zero", str(cell["zero"]), "--batch", str(cell["batch"]), "--seq_len", str(cell["seq_len"]),
             "--n_virtual", str(cell.get("n_virtual", args.n_virtual)), "--what", cell["what"],
             "--variants", cell.get("variants", ",".join(VARIANTS)),
             "--reps", str(args.reps), "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--peak_n", str(args.peak_n)] + (["--cpu"] if args.cpu else [])
    if cell["world"] == 1:
        cmd = [sys.executable, str(Path(__file__).resolve())] + flags
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cell['world']}",
               str(Path(__file__).resolve())] + flags
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads > 0 and not (torch_cuda() and not args.cpu):
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"[bench_step] {cell['name']}: {' '.join(cmd[-len(flags):][:14])} ...", flush=True)
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    (log_dir / f"{cell['name']}.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0 or not out.is_file():
        tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
        print(f"[bench_step] {cell['name']} FAILED rc={res.returncode}: {tail}", flush=True)
        return {"cell": cell, "status": "failed", "returncode": res.returncode, "stderr_tail": tail}
    return {"cell": cell, "status": "ok", "wall_s": time.perf_counter() - t, "command": cmd,
            **json.loads(out.read_text())}


def cells_for(args) -> list[dict]:
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    minilm = {"model": args.model, "model_label": args.model_label}
    cells = []
    suites = args.suite.split(",")
    if "cost" in suites or "all" in suites:
        for world in (1, 2):
            if world > 1 and gpu and torch.cuda.device_count() < 2:
                continue
            for zero in (2, 3):
                cells.append({"name": f"cost-w{world}-z{zero}", "world": world, "zero": zero, **minilm,
                              "batch": args.batch, "seq_len": args.seq_len, "what": "variants"})
    if "readouts" in suites or "all" in suites:  # issue 12: the read-outs, static + instance, ZeRO-3, 1 and 2 ranks
        from prepare_assets import smollm2
        b, L = (args.batch, args.seq_len) if gpu else (args.smol_batch, args.smol_seq_len)
        models = {"linear": lambda: ({**minilm}, args.batch, args.seq_len),
                  "cloze": lambda: ({"model": args.cloze_model or random_mlm(Path(args.cache), args.model),
                                     "model_label": "cloze model" if args.cloze_model else "MiniLM-shape MLM (random)"},
                                    args.batch, args.seq_len),
                  "lm_label": lambda: ({"model": args.lm_model or str(smollm2()),
                                        "model_label": "causal LM" if args.lm_model else "SmolLM2-135M"}, b, L)}
        for world in (1, 2):
            if world > 1 and gpu and torch.cuda.device_count() < 2:
                continue
            for kind in args.readout_kinds.split(","):
                model, batch, length = models[kind]()
                cells.append({"name": f"readout-{kind}-w{world}-z3", "world": world, "zero": 3, **model, "batch": batch,
                              "seq_len": length, "what": f"readout:{kind}", "variants": ",".join(READOUT_VARIANTS)})
    if "depth" in suites:  # issue 33: step cost of prompt_depth=deep vs input, ZeRO-3, 1 and 2 ranks
        for world in (1, 2):
            if not (world > 1 and gpu and torch.cuda.device_count() < 2):
                cells.append({"name": f"depth-w{world}-z3", "world": world, "zero": 3, **minilm, "batch": args.batch,
                              "seq_len": args.seq_len, "what": "depth"})
    if "scaling" in suites or "all" in suites:
        cells.append({"name": "scaling-seq-w1-z3", "world": 1, "zero": 3, **minilm, "batch": args.batch,
                      "seq_len": args.seq_len, "what": "seq:" + args.seq_lens})
        cells.append({"name": "scaling-nvt-w1-z3", "world": 1, "zero": 3, **minilm, "batch": args.batch,
                      "seq_len": args.seq_len, "what": "nvt:" + args.n_virtuals})
    if "efficiency" in suites or "all" in suites:
        # MiniLM's efficiency figures are the cost-w1-z3 cell's rows (same shape); run it alone if asked.
        if "cost" not in suites and "all" not in suites:
            cells.append({"name": "efficiency-minilm-w1-z3", "world": 1, "zero": 3, **minilm, "batch": args.batch,
                          "seq_len": args.seq_len, "what": "variants"})
        if not args.no_smollm2:
            from prepare_assets import smollm2
            b, L = (args.batch, args.seq_len) if gpu else (args.smol_batch, args.smol_seq_len)
            cells.append({"name": "efficiency-smollm2-w1-z3", "world": 1, "zero": 3, "model": str(smollm2()),
                          "model_label": "SmolLM2-135M", "batch": b, "seq_len": L, "what": "variants"})
    if gpu and args.gpu_large and ("all" in suites or "gpu" in suites):
        big = gpu_large_model(Path(args.cache))
        for world in sorted({1, min(2, torch.cuda.device_count())}):
            for zero in (2, 3):
                cells.append({"name": f"gpu-llama1b-w{world}-z{zero}", "world": world, "zero": zero, "model": big,
                              "model_label": "llama-1.1B-random", "batch": 8, "seq_len": 512, "what": "variants"})
    if args.only_world:
        cells = [c for c in cells if c["world"] == args.only_world]
    if args.only_zero:
        cells = [c for c in cells if c["zero"] == args.only_zero]
    return cells


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="all", help="all | cost,readouts,scaling,efficiency,gpu | depth (not in all)")
    ap.add_argument("--model", default=MINILM)
    ap.add_argument("--model_label", default="all-MiniLM-L6-v2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--n_virtual", type=int, default=16)
    ap.add_argument("--seq_lens", default="32/64/128/256")
    ap.add_argument("--n_virtuals", default="4/16/64")
    ap.add_argument("--smol_batch", type=int, default=4)
    ap.add_argument("--smol_seq_len", type=int, default=64)
    ap.add_argument("--no_smollm2", action="store_true")
    ap.add_argument("--readout_kinds", default="linear,cloze,lm_label", help="readouts suite: which read-outs")
    ap.add_argument("--cloze_model", default="", help="readouts suite: a *ForMaskedLM folder (default: a random "
                    "MLM of --model's shape, saved once under --cache)")
    ap.add_argument("--lm_model", default="", help="readouts suite: a *ForCausalLM folder (default: SmolLM2-135M)")
    ap.add_argument("--gpu_large", type=int, default=1, help="on a GPU, add the 1.1B random Llama cells")
    ap.add_argument("--only_world", type=int, default=0, help="keep only cells with this many ranks")
    ap.add_argument("--only_zero", type=int, default=0, help="keep only cells with this ZeRO stage")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per block")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak_n", type=int, default=2048)
    ap.add_argument("--cpu", action="store_true", help="stay on CPU even when a GPU is there")
    ap.add_argument("--threads", type=int, default=1, help=(
        "CPU only: OMP_NUM_THREADS per rank (default 1: on a shared machine, spinning OpenMP threads of "
        "oversubscribed processes distort timings badly; 0 = the project default, cores / local ranks)"))
    ap.add_argument("--cache", default=str(Path(os.environ.get("INFOPROMPT_CACHE", Path.home() / ".cache" / "infoprompt_ds"))))
    ap.add_argument("--results", default=str(RESULTS / "step.json"))
    # worker-only
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--zero", type=int, default=3)
    ap.add_argument("--what", default="variants")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    log_dir = Path(tempfile.mkdtemp(prefix="bench_step_"))
    t0 = time.perf_counter()
    cells = [run_cell(c, args, log_dir) for c in cells_for(args)]
    payload = {"benchmark": "step", "settings": {k: v for k, v in vars(args).items()
                                                 if k not in ("worker", "out", "local_rank")},
               "wall_s_total": time.perf_counter() - t0, "cells": cells}
    write_results(Path(args.results), payload)
    for c in cells:
        if c["status"] != "ok":
            continue
        for r in c["rows"]:
            print(f"{c['cell']['name']:26s} {r['label']:16s} {r['variant']:19s} L={r['seq_len']:<4d} n={r['n_virtual_tokens']:<3d} "
                  f"step={r['step_s_median'] * 1e3:8.1f}ms ratio={r['ratio_to_prompt'] or float('nan'):.3f} "
                  f"vs_control={r.get('ratio_to_control') or float('nan'):.3f} "
                  f"saved={r['saved_activation_bytes'] / 2**20:7.1f}MiB eff={r['fraction_of_matmul_peak']:.3f} "
                  f"bb_local={r['backbone_params_local']}")
    print(f"[bench_step] wrote {args.results} (logs in {log_dir})")


if __name__ == "__main__":
    main()
