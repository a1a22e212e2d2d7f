"""Best-model selection through the real train.py (issue 35; one rank, ZeRO-3 on CPU, tiny Llama, lm_label):
step 0 is evaluated and equals a direct zero-shot computation, an imbalanced validation split selects on
macro-F1, a run that never beats step 0 returns it, and a single-class predictor is not selected."""

import json

import torch
from safetensors.torch import load_file

from conftest import make_rows, run_cli, tiny_args, write_csv


def _files(tmp_path, sentiment_files, n_neg: int, n_pos: int) -> dict:
    rows = make_rows(16, 7)
    val = [r for r in rows if r["label"] == "neg"][:n_neg] + [r for r in rows if r["label"] == "pos"][:n_pos]
    return {**sentiment_files, "validation_file": str(write_csv(tmp_path / "validation.csv", val))}


def _history(out, name: str) -> dict[int, float]:
    import mlflow

    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    return {m.step: m.value for m in client.get_metric_history(run_id, name)}


def test_step0_is_the_zero_shot_model_and_wins_when_training_never_beats_it(tiny_llama_lm, sentiment_files, tmp_path):
    """learning_rate 1e-12 leaves every fp32 weight as it was (the update rounds away): every evaluation ties
    with step 0, and the tie goes to the earlier step. Validation is 80% one class: auto selects on macro_f1."""
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = _files(tmp_path, sentiment_files, 12, 3)
    out = tmp_path / "run"
    proc = run_cli(tiny_args(tiny_llama_lm, files, out, readout="lm_label", max_steps=4, eval_steps=2,
                             learning_rate=1e-12))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "metric_for_best_model: auto -> macro_f1" in proc.stdout
    assert "training did not beat the untrained model on validation" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_step"] == 0 and metrics["best_is_untrained"] is True and "best_validation_macro_f1" in metrics
    acc, f1 = _history(out, "eval/accuracy"), _history(out, "eval/macro_f1")
    assert sorted(acc) == [0, 2, 4]

    # Direct zero-shot: the frozen LM (transformers, no project code) with best/'s prompt in front of
    # `text cue`, its next-token logits restricted to the label words' tokens (head rows = LM head rows).
    weights, meta = load_file(str(out / "best" / "infoprompt.safetensors")), \
        json.loads((out / "best" / "infoprompt_config.json").read_text())
    tok, lm = AutoTokenizer.from_pretrained(tiny_llama_lm), AutoModelForCausalLM.from_pretrained(tiny_llama_lm).eval()
    names = ["neg", "pos"]  # head order: the sorted class names
    word_ids = [tok(" " + {"neg": "bad", "pos": "good"}[n], add_special_tokens=False)["input_ids"][0] for n in names]
    preds, labels = [], []
    import csv
    with open(files["validation_file"]) as f, torch.no_grad():
        for row in csv.DictReader(f):
            ids = tok(row["text"], add_special_tokens=False)["input_ids"] + \
                tok(meta["cue"], add_special_tokens=False)["input_ids"]
            emb = torch.cat([weights["prompt.weight"], lm.get_input_embeddings()(torch.tensor(ids))])
            logits = lm(inputs_embeds=emb.unsqueeze(0)).logits[0, -1, word_ids]
            preds.append(int(logits.argmax()))
            labels.append(names.index(row["label"]))
    assert acc[0] == accuracy_score(labels, preds)
    assert abs(f1[0] - f1_score(labels, preds, average="macro", labels=[0, 1], zero_division=0)) < 1e-9


def test_single_class_predictor_is_not_selected(tiny_llama_lm, sentiment_files, tmp_path):
    """The issue's case: the untrained model predicts the majority class (pos, 70% of validation) for every
    example, and so has the highest f1 (of pos) of the run; later steps predict both classes with a lower f1.
    f1 was asked for (not accuracy): the best model is a several-class step, and the log marks step 0."""
    out = tmp_path / "run"
    proc = run_cli(tiny_args(tiny_llama_lm, _files(tmp_path, sentiment_files, 6, 14), out, readout="lm_label",
                             method="prompt", learning_rate=0.5, max_steps=40, eval_steps=5, logging_steps=5,
                             metric_for_best_model="f1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    evals = {int(line.split()[2].rstrip("]")): line for line in proc.stdout.splitlines() if line.startswith("[eval step")}
    assert sorted(evals) == list(range(0, 41, 5))
    assert "one class predicted" in evals[0], evals[0]
    several = [s for s, line in evals.items() if "one class predicted" not in line]
    assert several, proc.stdout[-3000:]  # training made the two classes distinguishable
    metrics, f1 = json.loads((out / "metrics.json").read_text()), _history(out, "eval/f1")
    best = metrics["best_step"]
    assert best in several and metrics["best_is_untrained"] is False
    assert f1[0] > f1[best] == metrics["best_validation_f1"]  # the rule decided, not the value
    assert f1[best] == max(f1[s] for s in several) and best == min(s for s in several if f1[s] == f1[best])
