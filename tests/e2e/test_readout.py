"""Read-outs through the real train.py (one-rank ZeRO-3 on CPU): vanilla prompt tuning is the zero-weight
case of InfoPrompt under cloze and lm_label too; the export carries the read-out, so predict scores the test
split exactly as the run's final evaluation did; and a 60-step SmolLM2 run with lm_label keeps every
normalized term inside [0, log(1 + M) + 2/tau] with no non-finite step."""

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, assert_terms_pass_gradient_within_bounds, run_cli, tiny_args
from infoprompt_ds import backbone as gguf_cache


@pytest.mark.parametrize("fixture, readout", [("tiny_llama_lm", "lm_label"), ("tiny_bert_mlm", "cloze")])
def test_zero_weights_are_vanilla_and_predict_matches_evaluation(request, sentiment_files, tmp_path, fixture, readout):
    from infoprompt_ds.predict import Predictor

    model = request.getfixturevalue(fixture)
    outs = {}
    for name, over in (("zero", dict(method="infoprompt", gamma=0, beta=0, kl_weight=0)),
                       ("prompt", dict(method="prompt"))):
        out = tmp_path / name
        proc = run_cli(tiny_args(model, sentiment_files, out, max_steps=6, eval_steps=3, readout=readout, **over))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        outs[name] = load_file(str(out / "export" / "infoprompt.safetensors"))
    a, b = outs["zero"], outs["prompt"]
    assert set(a) == set(b) == {"prompt.weight", "head.weight", "head.bias"}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    out = tmp_path / "prompt"
    meta = json.loads((out / "best" / "infoprompt_config.json").read_text())
    assert meta["readout"] == readout and meta["pooling"] == ("last" if readout == "lm_label" else "mask")
    assert (meta["cue"] is not None) == (readout == "lm_label") and (meta["template"] is not None) == (readout == "cloze")
    rows = list(csv.DictReader(open(sentiment_files["test_file"])))
    preds = Predictor.load(str(out / "best"), device="cpu").predict([r["text"] for r in rows])
    acc = sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert acc == json.loads((out / "metrics.json").read_text())["test"]["accuracy"]


@pytest.mark.parametrize("fixture, readout", [("tiny_llama_lm", "lm_label"), ("tiny_bert_mlm", "cloze")])
def test_two_rank_zero3_reads_the_head_gathered(request, sentiment_files, tmp_path, fixture, readout):
    """2 ranks, ZeRO-3, InfoPrompt with the normalized estimator: the LM-head / MLM-decoder rows are read
    gathered at init (a partitioned row would be empty and the copy would fail), the MLM transform runs
    inside the engine, each rank holds about half of the backbone (the *ForMaskedLM/*ForCausalLM class is
    partitioned at load time like AutoModel), and predict on the export scores test as the run did."""
    from infoprompt_ds.env import free_port
    from infoprompt_ds.predict import Predictor

    out = tmp_path / "run"
    args = ["--deepspeed", str(ROOT / "ds_configs/zero3.json"),
            *tiny_args(request.getfixturevalue(fixture), sentiment_files, out, max_steps=6, eval_steps=3,
                       readout=readout)]
    proc = run_cli(args, launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "passes no gradient" not in proc.stdout
    reports = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = reports[0]["backbone_params_total"]
    assert all(r["backbone_params_local"] < 0.75 * total for r in reports)
    rows = list(csv.DictReader(open(sentiment_files["test_file"])))
    preds = Predictor.load(str(out / "best"), device="cpu").predict([r["text"] for r in rows])
    acc = sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert acc == json.loads((out / "metrics.json").read_text())["test"]["accuracy"]


def test_smollm2_lm_label_step0_terms_pass_gradient_for_every_example(smol_cache):
    """In process, on the real backbone: auto picks lm_label, and at step 0 both normalized terms pass
    gradient for every example and lie within their bounds."""
    from infoprompt_ds.config import TrainConfig
    from infoprompt_ds.data.load import encode, resolve_readout, resolve_task
    from infoprompt_ds.method.model import build_model, load_model_config, load_tokenizer, model_inputs

    cfg = TrainConfig(model_name_or_path=str(smol_cache), n_virtual_tokens=4, max_length=24, task_type="classification",
                      label_words={"neg": "bad", "pos": "good"}, vib_head=True)
    tok = load_tokenizer(cfg)
    task = resolve_task(cfg, ["neg", "pos"])
    ro = resolve_readout(cfg, task, tok)
    assert ro.kind == "lm_label"
    torch.manual_seed(0)
    model = build_model(cfg, load_model_config(cfg), tok, task, torch.float32, readout=ro)
    texts = ["a good film", "the plot was bad and sad", "a nice story", "it was awful"]
    b = model_inputs(tok.pad(dict(encode(tok, "classification", cfg, texts, None, ro)), return_tensors="pt"))
    z0 = model(**b, unprompted_only=True)["z"]
    model.set_z_stats(z0)
    assert_terms_pass_gradient_within_bounds(model, cfg, b, z0)


def test_smollm2_lm_label_60_steps_stay_in_bounds(smol_cache, sentiment_files, tmp_path):
    import mlflow

    out = tmp_path / "smol"
    args = tiny_args(gguf_cache.SMOLLM2, sentiment_files, out, readout="lm_label", max_length=20, k_shot=8,
                     per_device_train_batch_size=4, per_device_eval_batch_size=16, max_steps=60, eval_steps=60,
                     logging_steps=1, max_eval_samples=16, learning_rate=0.01)
    proc = run_cli(args + ["--deepspeed", str(ROOT / "ds_configs" / "zero3.json")],
                   env={"INFOPROMPT_CACHE": str(smol_cache.parents[1]), "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "passes no gradient" not in proc.stdout and "[nonfinite]" not in proc.stdout
    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")

    def history(name):
        return {m.step: m.value for m in client.get_metric_history(run_id, name)}

    tau = 0.1
    assert not history("train/nonfinite_steps")
    assert all(math.isfinite(v) for v in history("train/loss").values()) and len(history("train/loss")) == 60
    for t in ("head", "repr"):
        values, chance = history(f"train/{t}"), history(f"train/{t}_chance")
        assert len(values) == 60 and set(values) == set(chance)
        for s, v in values.items():
            assert 0 <= v <= chance[s] + 2 / tau, (t, s, v, chance[s])
        assert all(p == 1.0 for p in history(f"train/{t}_passing").values())
    meta = json.loads((out / "export" / "infoprompt_config.json").read_text())
    assert meta["readout"] == "lm_label" and meta["cue"] == "\nAnswer (good or bad):"  # local files, no preset: names the words
