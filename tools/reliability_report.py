"""Run the reliability tests (tests/reliability/, marker `reliability`) and write their figures to
docs/reliability.md: faults injected and survived, malformed inputs tried and refused cleanly.

    python tools/reliability_report.py                      # seed 0, 200 fuzz examples per input kind
    python tools/reliability_report.py --seeds 0 1 2 --fuzz-examples 500

Each seed re-runs the fault tests with other random choices (which rank dies, at which step, which
saves are killed); the fuzz runs once (hypothesis is derandomized, so a seed would repeat it).
Exit status: 0 when every test passed, 1 otherwise (the report is written either way)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAULTS = [  # item key in the figures -> (issue item, what was done, what "survived" means)
    ("rank_kill", "1. a rank dies",
     "SIGKILL of one of 2 ranks (random rank, random step) of `deepspeed --num_gpus 2 ... zero3.json`",
     "job exits non-zero within the bound, no rank left running, `latest` complete and loads with weights_only=True"),
    ("save_kill", "2. kill inside a save",
     "SIGKILL at 5 points of a save (torn shard file, between shards, before the marker, before `latest`, "
     "half-way through deleting the oldest checkpoint), one per run, each run resuming from `latest`",
     "`latest` still resolves to the previous complete checkpoint; the half-written one is never loaded; the "
     "final resume is bitwise equal to an uninterrupted run"),
    ("graceful_stop", "3. graceful stop",
     "SIGTERM to one rank of the 2-rank job at a random step",
     "every rank finishes the step and saves, exit code 75, the MLflow run is KILLED"),
    ("resume_exact", "1./3. exact resume",
     "after the rank kill and the SIGTERM: `--resume_from_checkpoint latest` to the end",
     "trainable weights bitwise equal to the uninterrupted 2-rank run (fp32, CPU); same MLflow run, FINISHED"),
    ("nonfinite", "4. numerics",
     "a run that really diverges (learning_rate=1e30, fp32): NaN losses",
     "each non-finite step skipped and counted (train/nonfinite_steps), stop after max_nonfinite_steps=3 in a "
     "row with exit code 3 and one line, last good checkpoint kept, MLflow run FAILED"),
    ("tampered_pickle", "6. tampered checkpoint",
     "a pickle with a __reduce__ payload as model states (through `train.py`), as optimizer states (raw "
     "pickle), and as an extra file",
     "refused with a one-line error naming the file (exit 2); the payload never runs"),
    ("tampered_export", "6. tampered export", "a pickle in place of infoprompt.safetensors",
     "refused (ConfigError); the payload never runs"),
]


CASES = [  # item key recorded by tests/reliability (record_case / record) -> what is tried
    ("network", "what a run listens on, sampled through a real `python train.py` and a 2-rank `deepspeed` job: "
     "every socket on a loopback address (test_network_and_stops.py)"),
    ("stops", "SIGINT (Ctrl-C) and SIGHUP (terminal closed) to a real run: checkpoint saved, exit 75"),
    ("outdir_resume", "a second training on a locked folder; a fresh run in a folder holding a run; overwrite "
     "with a user's file in export/; `latest` naming another run's folder; resume with another prompt length, "
     "method, label list, dataset, world size; a deleted / emptied shard; resume pruning only its own checkpoints "
     "next to a foreign one and a malformed marker; an exploding loss (learning_rate 1e9) ending with exit 3 "
     "(test_outdir_and_resume.py)"),
    ("preflight", "DeepSpeed json bf16 vs --bf16; fp16 on CPU (flag, json); Lamb on CPU; nvme offload without a "
     "path; output_dir empty / under a file / read-only (skipped as root); a model path that is a file; a model "
     "folder without tokenizer files; a blank prompt_init_text; max_length below the special tokens; stray "
     "RANK / WORLD_SIZE; an empty label word; [UNK] label words (warning); `~` in a YAML output_dir; duplicate "
     "YAML/JSON keys; a .toml config; an unknown config suffix; an uncached hub name offline / hub unreachable; "
     "the exploded-loss guard (test_preflight.py)"),
    ("data_errors", "UTF-16 and latin-1 files, a TSV named .csv, a header with a trailing space, a duplicate "
     "column, numbers and text in one JSONL column, a numeric text column, label ids in one split and names in "
     "another, a broken JSONL line mid-file, a nested JSON object, a duplicate JSON key, a one-row train file, a "
     "one-class validation split with mcc (warning); issue 34: records nested under a key of a .json file, a "
     "train file whose texts are all empty, the same data as train and test (leakage warning), an uncached hub "
     "dataset offline / hub unreachable (test_data_errors.py)"),
    ("predict_errors", "a hand-edited export (missing key, wrong prompt length, wrong label count, wrong type), a "
     "backbone of another width, a latin-1 --file, an all-blank file, stdin (`--file -`, /dev/stdin) with blank "
     "lines kept: N lines in, N out; issue 34: an all-NaN adapter, a head whose width disagrees with the "
     "export's prompt (test_predict_errors.py)"),
    ("retry_markers", "issue 34 items 2, 5, 6: a backbone folder without weights / with truncated safetensors "
     "(then the retry into the same folder) / a missing shard of an index / a truncated .bin; a folder where no "
     "step ran; a forged mlflow_run.json naming another folder's live run in a shared store; SIGUSR1 during "
     "start-up (test_retry_and_markers.py)"),
    ("resume_changes", "issue 34 items 6, 7: a resume past a smaller --max_steps; an edited DeepSpeed json on "
     "resume; a bf16 run resumed as fp32 (test_resume_changes.py)"),
    ("disk_full", "issue 34 item 4: output_dir on a small tmpfs filled during the checkpoint saves of a real run, "
     "then a resume on the full disk and after freeing it (root only) (test_disk_full.py)"),
    ("offload_faults", "issue 34 item 7: SIGKILL and SIGTERM under NVMe offload, resumed on another --offload_dir; "
     "SIGKILL and SIGTERM during a checkpointed backward; --offload_dir deleted mid-run; --offload_dir full "
     "mid-run (root only); each resume bitwise equal to an uninterrupted run (test_offload_faults.py)"),
]


def run_pytest(log: Path, env: dict, select: str) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "reliability",
           "tests/reliability", *(["-k", select] if select else [])]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env, "INFOPROMPT_RELIABILITY_LOG": str(log)},
                          capture_output=True, text=True)
    summary = next((line for line in reversed(proc.stdout.splitlines()) if re.search(r"\d+ (passed|failed)", line)),
                   proc.stdout[-300:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-3000:])
    return proc.returncode, summary.strip("= "), time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--fuzz-examples", type=int, default=200, help="hypothesis examples per input kind")
    ap.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    args = ap.parse_args(argv)

    records, sessions = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, seed in enumerate(args.seeds):
            log = Path(tmp) / f"seed{seed}.jsonl"
            env = {"INFOPROMPT_RELIABILITY_SEED": str(seed), "INFOPROMPT_FUZZ_EXAMPLES": str(args.fuzz_examples)}
            # later seeds: only the tests whose faults depend on the seed
            rc, summary, seconds = run_pytest(log, env, "" if i == 0 else "rank_faults or save_kill")
            sessions.append({"seed": seed, "rc": rc, "summary": summary, "seconds": round(seconds)})
            print(f"seed {seed}: {summary} ({seconds:.0f} s)", flush=True)
            if log.exists():
                records += [{**json.loads(line), "seed": seed} for line in log.read_text().splitlines() if line]

    by_item = defaultdict(list)
    for r in records:
        by_item[r["item"]].append(r)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    ok = all(s["rc"] == 0 for s in sessions)
    md = ["# Reliability: faults survived, bad input refused", "",
          f"Produced by `python tools/reliability_report.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
          .rstrip() + f" on commit `{commit}` ({platform.machine()}, {os.cpu_count()} CPU cores, CPU-only torch, "
          f"{time.strftime('%Y-%m-%d')}). It runs `pytest -m reliability tests/reliability` (also part of the "
          "main test command) and collects the figures each test records. Do not edit by hand.", "",
          "| seed | tests | seconds |", "|---|---|---|"]
    md += [f"| {s['seed']} | {s['summary']} | {s['seconds']} |" for s in sessions]
    md += ["", "## Faults injected and survived", "",
           "| issue item | fault injected | survived means | injected | survived |", "|---|---|---|---|---|"]
    for key, item, what, means in FAULTS:
        rows = by_item.get(key, [])
        inj, surv = sum(r.get("injected", 0) for r in rows), sum(r.get("survived", 0) for r in rows)
        md.append(f"| {item} | {what} | {means} | {inj} | {surv}{'' if rows else ' (test failed or not run)'} |")
    tot_inj_faults = sum(sum(r.get("injected", 0) for r in by_item.get(k, [])) for k, *_ in FAULTS)
    # resume_exact injects nothing: it is how the rank kill and the stop were survived, not a fault itself
    tot_surv_faults = sum(sum(r.get("survived", 0) for r in by_item.get(k, [])) for k, *_ in FAULTS if k != "resume_exact")
    md += ["", f"**Total: {tot_inj_faults} faults injected, {tot_surv_faults} survived.**", ""]
    kills = by_item.get("rank_kill", [])
    if kills:
        md += ["Rank kill details: " + "; ".join(
            f"seed {r['seed']}: rank {r['victim_rank']} killed after checkpoint step {r['latest_step']}, job ended "
            f"{r['exit_after_s']} s later" for r in kills) + " (bound asserted: 300 s; `--dist_timeout_minutes 1`).", ""]
    stops = by_item.get("graceful_stop", [])
    if stops:
        md += ["Graceful stop details: " + "; ".join(
            f"seed {r['seed']}: {r['signal']} to rank {r['victim_rank']}, stopped at step {r['stopped_at_step']}"
            for r in stops) + ".", ""]

    md += ["## Malformed inputs tried and refused cleanly", "",
           "Every case must end with exactly one stderr line `error: <field>: ...`, exit code 2, no traceback, "
           "within 30 s (in practice well under 1 s in process), and no output directory created.", "",
           "| input kind | tried | refused cleanly |", "|---|---|---|"]
    fuzz = by_item.get("fuzz", [])
    tried = refused = 0
    for r in fuzz:
        for kind, t in sorted(r["tally"].items()):
            md.append(f"| {kind.replace('_', ' ')} | {t['tried']} | {t['refused']} |")
            tried, refused = tried + t["tried"], refused + t["refused"]
    md += ["", f"**Total: {tried} malformed inputs tried, {refused} refused cleanly.**" if fuzz else
           "(fuzz not run)", "",
           "Kinds generated (hypothesis, derandomized): flags of the wrong type, out of range, NaN/inf, huge "
           "integers (>= 2**32), unknown options; config files with broken syntax, a non-mapping top level, "
           "unknown keys, wrong value types, UTF-16/latin-1 encodings, binary; DeepSpeed jsons with broken "
           "syntax, a non-object, empty, UTF-16/latin-1, invalid ZeRO stage, batch sizes disagreeing with the "
           "config, `auto` where unsupported, wrong types for known keys (clipping, lr, bf16, scheduler, "
           "optimizer/scheduler names, offload); dataset files that are empty, header-only, UTF-16/UTF-32/"
           "latin-1, binary, missing the label column, with a label not in the label set or an empty label, "
           "ragged csv rows, broken jsonl, non-record json, a single class. `real processes` runs one case of "
           "each kind as `python train.py`.", ""]
    mlflow = by_item.get("mlflow_bind", [])
    md += ["## MLflow server binding", ""]
    if mlflow:
        r = mlflow[0]
        md += [f"`mlflow server`/`mlflow ui` commands in README.md and docs/: {r['commands_checked']} checked; "
               "`infoprompt_ds.tracking.store.LocalServer` and docs/tracking.md bind to 127.0.0.1 (mlflow's own default "
               "when `--host` is absent is 127.0.0.1 too). Explicit opt-ins to another interface: "
               + ("; ".join(f"`{c}`" for c in r["explicit_non_local"]) or "none") + ".", ""]
    md += ["## Adversarial cases (issue 15)", "",
           "Each case a test; `clean` = the test passed (refused in one line with exit code 2 before any weight "
           "loads, or behaved as described).", "",
           "| group | what is tried | tried | clean |", "|---|---|---|---|"]
    case_total = case_clean = 0
    for key, what in CASES:
        rows = by_item.get(key, [])
        t, c = sum(r.get("tried", 0) for r in rows), sum(r.get("clean", 0) for r in rows)
        case_total, case_clean = case_total + t, case_clean + c
        md.append(f"| {key.replace('_', ' ')} | {what} | {t} | {c}{'' if rows else ' (not run)'} |")
    md += ["", f"**Total: {case_total} adversarial cases tried, {case_clean} clean.**", ""]
    md += ["## What guarantees this", "",
           "* **Rank death**: the deepspeed launcher terminates the other ranks when one dies, and the gloo/NCCL "
           "collective timeout (`dist_timeout_minutes`, default 30) bounds any rank left waiting on a dead peer. "
           "A checkpoint counts only once `infoprompt_complete.json` is written by rank 0 after a barrier that "
           "every rank passes after its shard is on disk; `latest` is replaced atomically afterwards.",
           "* **Kill inside a save**: a folder without the marker is skipped by `resolve_checkpoint` and deleted "
           "by the next save of that step; the oldest checkpoint's marker is removed before the folder, so a "
           "half-deleted checkpoint never looks complete.",
           "* **Graceful stop**: SIGTERM/SIGUSR1, SIGINT (Ctrl-C; a second one aborts at once) and SIGHUP (the "
           "terminal closed) set a flag; the ranks agree on it (all-reduce MAX) after each step, save, close the "
           "MLflow run as KILLED and exit **75**; the checkpoint holds the run id. (The `deepspeed` launcher itself "
           "kills its ranks on Ctrl-C; send SIGTERM to the ranks, or use `python train.py`/srun, for a clean stop.)",
           "* **Numerics**: the loss is checked before backward and the verdict all-reduced (MIN), so every rank "
           "skips the same micro-batch (no backward, no update; the data stream still advances, so resume stays "
           "exact). A non-finite gradient norm makes DeepSpeed skip the update itself (ZeRO-3 all dtypes; ZeRO-1/2 "
           "fp32, or bf16 with `check_grad_overflow`); the loop counts those steps too (not under fp16, whose loss "
           "scaler skips overflow steps routinely). A finite loss above 10^4 times the first one (or 10^4 when "
           "that was below 1) has exploded and counts the same (`infoprompt_ds/runtime/loss_guard.py`). "
           "`train/nonfinite_steps` is logged; only an applied update ends "
           "a streak; no checkpoint is saved during a streak; `max_nonfinite_steps` (default 5) in a row end the "
           "run with exit code **3** and one line naming the last good checkpoint (the newest one saved before "
           "the streak).",
           "* **Bad input**: every check that needs no weights runs in `prepare()` before the process group, the "
           "model or any output exist; DeepSpeed jsons are checked against DeepSpeed's own schema there too; "
           "`preflight.py` adds the environment (stray RANK/WORLD_SIZE), precision and device (fp16, Lamb on CPU, "
           "nvme), output and model paths, the hub when a name is not cached, the tokenizer's limits and the label "
           "words; `data_checks.py` reads a local file's encoding, header and JSON lines first, so that a bad file "
           "is named with its line and cause.",
           "* **Nothing lost, nothing mixed**: rank 0 holds an exclusive `fcntl.flock` on `output_dir/.infoprompt.lock` "
           "from the end of pre-flight to the end of the process. A fresh run refuses a folder holding a run unless "
           "`--overwrite_output_dir`, which then removes only this program's files (a file it did not write in "
           "export/, best/ or checkpoints/ is refused, never deleted). Each checkpoint's marker records its run "
           "(uid, backbone and width, method, task type, labels, prompt length, bottleneck, a sha256 of the "
           "tokenized train split, world size, ZeRO stage); only this run's checkpoints are pruned; a resume "
           "compares all of it before any weight loads and refuses in one line naming the first mismatch (ZeRO "
           "optimizer states are per rank: another world size is refused, not resharded); `latest` must name a "
           "folder inside checkpoints/; a malformed marker makes a folder incomplete, never a crash.",
           "* **Network**: one process uses an in-memory store and no store socket; a one-host job binds the store "
           "and gloo/NCCL to loopback; a multi-node job binds the store to MASTER_ADDR's address only (docs/slurm.md, "
           "'Network exposure').",
           "* **Nothing unsafe loaded**: exports are safetensors + JSON only; before a checkpoint is handed to "
           "DeepSpeed (whose `load_checkpoint` calls `torch.load(weights_only=False)`), every pickle-like file in "
           "it must load with `torch.load(weights_only=True)` (allowing only DeepSpeed's `ZeroStageEnum` and "
           "loss-scaler classes), checked in `prepare()` and again in `load_checkpoint`.", "",
           "Exit codes of `train.py`: 0 finished, 2 bad input, 3 diverged, 75 stopped by a signal (resumable); "
           "anything else is a crash (killed rank, collective timeout).", ""]
    Path(args.out).write_text("\n".join(md))
    print(f"wrote {args.out}: {tot_inj_faults} faults injected, {tot_surv_faults} survived; {tried} malformed "
          f"inputs tried, {refused} refused cleanly", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
