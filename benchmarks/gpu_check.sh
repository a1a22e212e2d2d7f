#!/usr/bin/env bash
# Issue 31's GPU check, prepared and NOT yet run (no GPU was lent to the session that wrote it).
# One H100/H200, ~8 minutes: random Llamas of the 1.1B and 7B shapes in bf16, ZeRO-3 on 1 rank, activation
# checkpointing off and on, prompt tuning for 3 steps at batch 8 x 512 tokens; per run the peak GPU memory
# (torch.cuda.max_memory_allocated / reserved) next to `infoprompt plan`'s device estimate for the same flags.
#
#   bash benchmarks/gpu_check.sh [SCRATCH]        # SCRATCH: ~20 GB free, outside the repo (default /tmp/gpu_check)
#
# Writes benchmarks/results/gpu_check.json (one row per run) and deletes the model files afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=${1:-/tmp/gpu_check}
OUT=benchmarks/results/gpu_check.json
mkdir -p "$SCRATCH"
python - "$SCRATCH" <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
from pathlib import Path
from bench_scale import write_data
from bench_scale_large import write_random_llama
scratch = Path(sys.argv[1])
write_data(scratch)
for shape in ("1.1b", "7b"):
    if not (scratch / f"llama-{shape}" / "config.json").is_file():
        print(f"[gpu_check] writing {shape}", flush=True)
        write_random_llama(shape, scratch / f"llama-{shape}")
EOF
echo "[]" > "$OUT.tmp"
for shape in 1.1b 7b; do
  for ckpt in false true; do
    run="$SCRATCH/run-$shape-$ckpt"
    flags=(--model_name_or_path "$SCRATCH/llama-$shape" --train_file "$SCRATCH/train.csv"
           --validation_file "$SCRATCH/validation.csv" --test_file "$SCRATCH/test.csv" --label_words pos=good,neg=bad
           --k_shot none --method prompt --deepspeed zero3 --bf16 true --gradient_checkpointing "$ckpt"
           --n_virtual_tokens 16 --max_length 512 --per_device_train_batch_size 8 --per_device_eval_batch_size 8
           --max_eval_samples 8 --max_steps 3 --eval_steps 1000 --logging_steps 1 --output_dir "$run"
           --overwrite_output_dir true --mlflow_experiment gpu_check)
    plan=$(python -m infoprompt_ds.cli plan "${flags[@]}" --json true)
    # the training run in this process, with the peak GPU memory written at exit
    timeout 300 python - "$run" "${flags[@]}" <<'EOF' || echo "[gpu_check] $shape ckpt=$ckpt failed (rc $?)"
import atexit, json, runpy, sys, time
import torch
run, argv = sys.argv[1], sys.argv[2:]
t0 = time.time()
def report():
    json.dump({"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
               "wall_s": time.time() - t0}, open(run + ".peak.json", "w"))
atexit.register(report)
sys.argv = ["train.py", *argv]
runpy.run_path("train.py", run_name="__main__")
EOF
    python - "$OUT.tmp" "$run" "$shape" "$ckpt" "$plan" <<'EOF'
import json, sys
from pathlib import Path
out, run, shape, ckpt, plan = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "true", json.loads(sys.argv[5])
peak = json.loads(Path(run + ".peak.json").read_text()) if Path(run + ".peak.json").is_file() else {}
row = {"shape": shape, "gradient_checkpointing": ckpt, "deepspeed": "zero3", "ranks": 1, "bf16": True,
       "micro_batch": 8, "max_length": 512, "n_virtual_tokens": 16, "planned_device_gib": plan["device_peak_bytes"] / 2**30,
       "planned_parts_gib": {k: v / 2**30 for k, v in plan["device"].items()}, "gpu": __import__("torch").cuda.get_device_name(0),
       **{f"measured_{k}_gib" if k != "wall_s" else k: (v / 2**30 if k != "wall_s" else v) for k, v in peak.items()}}
if peak:
    row["plan_error"] = row["planned_device_gib"] / row["measured_max_reserved_gib"] - 1
rows = json.loads(Path(out).read_text()) + [row]
Path(out).write_text(json.dumps(rows, indent=1))
print(f"[gpu_check] {json.dumps(row)}", flush=True)
EOF
    rm -rf "$run/checkpoints"
  done
done
mv "$OUT.tmp" "$OUT"
rm -rf "$SCRATCH"/llama-*
echo "[gpu_check] wrote $OUT"
