"""prompt_depth=deep through the real command: 2-rank ZeRO-3 with activation checkpointing (every layer's
vectors move, from the propagated start), and on one rank resume (bitwise), export, predict and MLflow; the pre-flight refusal."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, build_in_process, run_cli, tiny_args
from infoprompt_ds.env import free_port
from infoprompt_ds.method.deep import init_propagated

pytestmark = pytest.mark.e2e


def assert_ok(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_two_rank_zero3_deep_prompts_reach_every_layer(tmp_path, four_layers, sentiment_files):
    """A tiny learning rate: after 4 steps every layer's vectors have moved (a gradient reached them: Adam
    moves any element with one by ~lr), and by no more than the steps allow from the propagated start computed
    here without DeepSpeed: the init ran under ZeRO-3 and reached the optimizer's master copies. With
--gradient_checkpointing (the hooks stay outside the recomputed forward)."""
    model = four_layers("tiny_llama")
    out = tmp_path / "deep2"
    over = dict(prompt_depth="deep", method="prompt", max_steps=4, learning_rate=1e-4,
                eval_steps=4, eval_on_start="false", gradient_checkpointing="true")
    args = ["--deepspeed", str(ROOT / "ds_configs/zero3.json"), *tiny_args(model, sentiment_files, out, **over)]
    assert_ok(run_cli(args, launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]))
    _, _, ref = build_in_process(model, sentiment_files, tmp_path / "ref", **over)
    init_propagated(ref)
    start = ref.deep_prompt.weight.detach()
    got = load_file(str(out / "export" / "infoprompt.safetensors"))["deep_prompt.weight"]
    assert got.shape == start.shape == (3, 4, 32)
    moved = (got - start).abs()
    assert start.abs().max() > 10 * 4e-4  # the propagated start is far from zero at this tolerance
    for layer in range(3):
        assert moved[layer].max() > 1e-6, f"layer {layer + 1}'s vectors did not move"
    assert moved.max() < 4e-4, moved.max()  # 4 Adam steps of lr <= 1e-4 (warmup, decay; + rounding)


def test_one_rank_deep_resume_export_predict_mlflow(tmp_path, four_layers, sentiment_files):
    model = four_layers("tiny_bert")
    base = dict(prompt_depth="deep", max_steps=6, save_steps=3, eval_steps=3)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    ds = ["--deepspeed", str(ROOT / "ds_configs/zero3.json")]
    assert_ok(run_cli(ds + tiny_args(model, sentiment_files, full, **base)))
    assert_ok(run_cli(ds + tiny_args(model, sentiment_files, resumed, **base,
                                     resume_from_checkpoint=str(full / "checkpoints" / "step3"))))
    a = load_file(str(full / "export" / "infoprompt.safetensors"))
    b = load_file(str(resumed / "export" / "infoprompt.safetensors"))
    assert set(a) == set(b) and a["deep_prompt.weight"].shape == (3, 4, 32)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: the resumed run loaded the vectors, did not re-init them
    meta = json.loads((full / "export" / "infoprompt_config.json").read_text())
    assert meta["prompt_depth"] == "deep"
    adapter = load_file(str(full / "export" / "adapter_model.safetensors"))  # the input-layer part, for PEFT
    assert torch.equal(adapter["prompt_embeddings"], a["prompt.weight"])

    from infoprompt_ds.predict import Predictor

    predictor = Predictor.load(str(full / "export"))
    assert torch.equal(predictor.model.deep_prompt.weight.detach(), a["deep_prompt.weight"])
    assert set(predictor.predict(["the movie was good", "the plot was awful"])) <= {"neg", "pos"}
    proc = subprocess.run([sys.executable, "-m", "infoprompt_ds.predict", "--export", str(full / "best"),
                           "--text", "a good film"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    import mlflow

    run_id = json.loads((full / "metrics.json").read_text())["mlflow_run_id"]
    params = mlflow.MlflowClient(tracking_uri=f"sqlite:///{full / 'mlflow.db'}").get_run(run_id).data.params
    assert params["prompt_depth"] == "deep" and params["deep_prompt_init"] == "propagate"


def test_deep_on_a_model_without_per_layer_modules_is_one_line(tmp_path, sentiment_files, tiny_bert):
    """ALBERT shares one layer module across its layers: refused in pre-flight, naming prompt_depth."""
    from transformers import AlbertConfig, AlbertModel, BertTokenizer

    d = tmp_path / "albert"
    tok = BertTokenizer.from_pretrained(tiny_bert)
    AlbertModel(AlbertConfig(vocab_size=len(tok), hidden_size=32, embedding_size=16, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "run"
    proc = run_cli(tiny_args(str(d), sentiment_files, out, prompt_depth="deep"))
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Setting accelerator" not in line]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: prompt_depth:"), lines
    assert not (out / "metrics.json").exists()
