"""Issue 35 item 5: the lm_label step-0 (zero-shot) score with and without a cue that names the label words.

    python benchmarks/cue_zero_shot.py [--max_eval_samples 300] [--out benchmarks/results/cue_zero_shot_smollm2_rt.json]

The packaged rotten_tomatoes reviews given as a local file (so no preset cue applies), SmolLM2-135M-Instruct,
readout lm_label, label words fresh=good, rotten=bad; each cue through benchmarks/zero_shot.py (the real
setup(): same split, prompt init and ZeRO-3 engine as a training run's step 0), validation and test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, write_results

CUES = {"label words (default without a preset)": None, "plain": "\\nAnswer:", "preset's": "\\nSentiment:"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max_eval_samples", type=int, default=300)
    p.add_argument("--out", default=str(RESULTS / "cue_zero_shot_smollm2_rt.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from infoprompt_ds.backbone import SMOLLM2
    from infoprompt_ds.data.tasks import _rotten_tomatoes_csv

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cue in CUES.items():
            out = Path(tmp) / name.split()[0]
            cmd = [sys.executable, str(ROOT / "benchmarks" / "zero_shot.py"), "--model_name_or_path", SMOLLM2,
                   "--train_file", _rotten_tomatoes_csv(), "--label_words", "fresh=good,rotten=bad",
                   "--readout", "lm_label", "--k_shot", "16", "--max_eval_samples", str(args.max_eval_samples),
                   "--per_device_eval_batch_size", "32", "--output_dir", str(out), "--mlflow_experiment", "cue"]
            cmd += ["--cue", cue] if cue is not None else []
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
            if proc.returncode != 0:
                raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
            m = json.loads((out / "metrics.json").read_text())
            rows.append({"cue": name, "cue_text": cue, "validation": m["validation"], "test": m["test"],
                         "command": cmd})
            print(f"{name:40s} val acc {m['validation']['accuracy']:.3f} macro_f1 {m['validation']['macro_f1']:.3f}"
                  f" | test acc {m['test']['accuracy']:.3f} macro_f1 {m['test']['macro_f1']:.3f}", flush=True)
    write_results(Path(args.out), {"backbone": SMOLLM2, "dataset": "rotten_tomatoes (local file, no preset)",
                                   "max_eval_samples": args.max_eval_samples, "runs": rows})


if __name__ == "__main__":
    main()
