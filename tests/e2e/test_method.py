"""InfoPrompt's loss as the model assembles it (method.py), on tiny backbones: step-0 behaviour of the
normalized estimator, scale invariance, the VIB classifier, and vanilla prompt tuning as the zero-weight
case of the same system (a real one-rank DeepSpeed run)."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny_args
from infoprompt_ds.method import mi
from infoprompt_ds.config import TrainConfig
from infoprompt_ds.data.load import resolve_task
from infoprompt_ds.method.model import build_model, load_model_config, load_tokenizer


def make(path, **over):
    cfg = TrainConfig(model_name_or_path=path, n_virtual_tokens=4, max_length=16,
                      label_words={"neg": "bad", "pos": "good"}, **over)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    return cfg, tok, build_model(cfg, load_model_config(cfg), tok, resolve_task(cfg, ["neg", "pos"]), torch.float32)


def batch(tok):
    enc = tok(["good film", "the plot was very bad and sad", "a nice story", "it was awful"], padding=True,
              return_tensors="pt")
    return dict(enc)


def noise(cfg, b=4):
    g = torch.Generator().manual_seed(1)
    return {"eps_pos": torch.randn(b, cfg.bottleneck_dim, generator=g),
            "eps_neg": torch.randn(b, cfg.k_negatives, cfg.bottleneck_dim, generator=g)}


def step(model, cfg, tok, scale=1.0):
    """One training forward with z statistics from the unprompted states, the loop's order."""
    b = batch(tok)
    z0 = model(**b, unprompted_only=True)["z"]
    spread = torch.randn(12, z0.shape[1], generator=torch.Generator().manual_seed(2)) * z0.std(0)
    model.set_z_stats(torch.cat([z0, z0.mean(0) + spread]))  # a cache of 16 states
    model.train()
    return model(**b, labels=torch.tensor([1, 0, 1, 0]), z_unprompted=z0, **noise(cfg))


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
@pytest.mark.parametrize("vib_head", [True, False])
def test_step0_normalized_terms_pass_gradient_for_every_example(request, fixture, vib_head):
    cfg, tok, model = make(request.getfixturevalue(fixture), estimator="normalized", vib_head=vib_head)
    out = step(model, cfg, tok)
    m = out["method"]
    assert set(m.terms) == {"head", "repr", "kl"}
    for t in ("head", "repr"):
        assert float(m.passing[t]) == 1.0
        assert 0 <= float(m.terms[t]) <= float(m.chance[t]) + 2 / cfg.tau
        grad = torch.autograd.grad(m.weighted[t], m.prompt, retain_graph=True)[0]
        assert grad.abs().sum() > 0, t
    kl_grad = torch.autograd.grad(m.weighted["kl"], m.prompt, retain_graph=True, allow_unused=True)[0]
    # the KL reaches the prompt only through the VIB classifier
    assert (kl_grad is not None and kl_grad.abs().sum() > 0) == vib_head
    assert torch.allclose(m.loss, m.ce + sum(m.weighted.values()))


def test_authors_estimator_is_capped_at_step0(tiny_bert):
    """The authors' estimator with its cap, on a backbone whose sentences have more than 6 tokens: the
    head term starts at the cap for the long inputs (chance log(1 + M) > 2)."""
    cfg, tok, model = make(tiny_bert, estimator="authors")
    m = step(model, cfg, tok)["method"]
    assert float(m.passing["head"]) < 1.0 and float(m.terms["head"]) <= 2.0


def test_normalized_losses_ignore_the_scale_of_hidden_states(tiny_llama):
    cfg, tok, model = make(tiny_llama, estimator="normalized", vib_head=True)
    base = step(model, cfg, tok)["method"]
    model.backbone.register_forward_hook(lambda mod, args, output: output.__class__(
        last_hidden_state=output.last_hidden_state * 100))
    scaled = step(model, cfg, tok)["method"]
    for t in ("head", "repr", "kl"):
        assert abs(float(scaled.terms[t]) - float(base.terms[t])) < 1e-4, t
    assert abs(float(scaled.ce) - float(base.ce)) < 1e-4  # the VIB classifier sees standardised z too


def test_vib_kl_is_the_classifier_posteriors_mean_kl(tiny_bert):
    cfg, tok, model = make(tiny_bert, estimator="normalized", vib_head=True)
    b = batch(tok)
    out = step(model, cfg, tok)
    z0 = model(**b, unprompted_only=True)["z"]
    expected = 0.0
    for z in (out["z"], z0):
        mu, ls = model.vib(model.standardise(z))
        d = torch.distributions.Normal(mu.double(), ls.double().exp())
        std = torch.distributions.Normal(torch.zeros_like(mu.double()), torch.ones_like(mu.double()))
        expected += float(torch.distributions.kl_divergence(d, std).mean(-1).mean())
    assert abs(float(out["method"].terms["kl"]) - expected) < 1e-5 * max(1.0, expected)
    assert expected < 50  # standardised z keeps the posterior away from its log-sigma clamp


def test_vib_samples_in_training_and_uses_the_mean_at_eval(tiny_bert):
    cfg, tok, model = make(tiny_bert, vib_head=True)
    b = batch(tok)
    model.eval()
    with torch.no_grad():
        a, c = model(**b)["logits"], model(**b)["logits"]
        sampled = model(**b, eps_pos=noise(cfg)["eps_pos"])["logits"]
        mu, _ = model.vib(model.standardise(model(**b)["z"]))
        direct = model.head(model.vib.decode(mu))
    assert torch.equal(a, c) and not torch.allclose(a, sampled) and torch.allclose(a, direct, atol=1e-6)


@pytest.mark.parametrize("vib_head", ["true", "false"])
def test_zero_weights_are_bit_identical_to_vanilla_prompt_tuning(tiny_bert, sentiment_files, tmp_path, vib_head):
    """gamma = beta = kl_weight = 0 under method=infoprompt is vanilla prompt tuning: a real one-rank
    ZeRO-3 run of each gives bitwise-equal trained weights."""
    outs = {}
    for name, over in (("zero", dict(method="infoprompt", gamma=0, beta=0, kl_weight=0)),
                       ("prompt", dict(method="prompt"))):
        out = tmp_path / name
        proc = run_cli(tiny_args(tiny_bert, sentiment_files, out, max_steps=6, eval_steps=3, vib_head=vib_head,
                                 **over))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        outs[name] = load_file(str(out / "export" / "infoprompt.safetensors"))
    a, b = outs["zero"], outs["prompt"]
    assert set(a) == set(b) and any(k.startswith("vib.") for k in a) == (vib_head == "true")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_instance_prompt_starts_as_the_static_prompt_and_then_depends_on_the_input(tiny_llama):
    _, tok, static = make(tiny_llama, method="prompt", vib_head=False)
    cfg, _, inst = make(tiny_llama, method="prompt", vib_head=False, prompt_type="instance")
    b = batch(tok)
    z0 = inst(**b, unprompted_only=True)["z"]
    assert torch.equal(static(**b)["logits"], inst(**b)["logits"])  # the generator's last layer starts at 0
    cfg, _, inst = make(tiny_llama, prompt_type="instance", vib_head=True)  # infoprompt: every term reaches the generator
    out = step(inst, cfg, tok)
    out["loss"].backward()
    assert out["prompt"].shape == (4, 4, 32) and inst.generator.net[2].weight.grad.abs().sum() > 0
    with torch.no_grad():
        inst.generator.net[2].weight.sub_(inst.generator.net[2].weight.grad)  # one SGD step
    p = inst(**b, labels=torch.tensor([1, 0, 1, 0]), z_unprompted=z0, **noise(cfg))["prompt"]
    assert not torch.allclose(p[0], p[1])  # each input now gets its own prompt


@pytest.mark.parametrize("terms,zero", [("head,repr,kl", "zero3"), ("repr", "zero3"), ("kl", "zero3"),
                                        ("head,repr,kl", "zero2")])
def test_diagnostics_do_not_change_training(tiny_bert, sentiment_files, tmp_path, terms, zero):
    """The gradient diagnostics take extra gradients on logging steps, and the saturation diagnostic one
    no-grad forward at P0: a real one-rank ZeRO-3 (and ZeRO-2) run that logs (and takes them) every step ends
    with bitwise the same weights as one that logs only at the end, and the ratios it logs are non-zero. Each
    term alone too: with gamma=0 the diagnostics once broke the step after the first logged one (a gradient of
    CE taken before the real backward). ZeRO-2 once crashed in them (DeepSpeed's backward epilogue run by a
    diagnostic gradient through a hooked output tensor); there the cosines to CE's gradient are logged too."""
    import mlflow

    terms = terms.split(",")
    weights = {"gamma": 0.1 if "head" in terms else 0, "beta": 0.2 if "repr" in terms else 0,
               "kl_weight": 0.1 if "kl" in terms else 0}
    outs = {}
    for every in (1, 100):
        out = tmp_path / f"log{every}"
        proc = run_cli(tiny_args(tiny_bert, sentiment_files, out, max_steps=4, eval_steps=4, logging_steps=every,
                                 vib_head="true", deepspeed=f"ds_configs/{zero}.json", **weights))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "passes no gradient" not in proc.stdout
        outs[every] = load_file(str(out / "export" / "infoprompt.safetensors"))
    for k in outs[1]:
        assert torch.equal(outs[1][k], outs[100][k]), k
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'log1' / 'mlflow.db'}")  # the run's own store
    run_id = json.loads((tmp_path / "log1" / "metrics.json").read_text())["mlflow_run_id"]
    for t in terms:
        ratios = [m.value for m in client.get_metric_history(run_id, f"train/{t}_grad_ratio")]
        assert len(ratios) == 4 and all(r > 0 for r in ratios), (t, ratios)
        cosines = [m.value for m in client.get_metric_history(run_id, f"train/{t}_grad_cos")]
        assert len(cosines) == (4 if zero == "zero2" else 0) and all(-1 <= c <= 1 for c in cosines), (t, cosines)
        if t != "kl":
            assert len(client.get_metric_history(run_id, f"train/{t}_at_p0")) == 4, t


def test_frozen_critic_run_logs_its_field_and_resumes_exactly(tiny_bert, sentiment_files, tmp_path):
    """estimator_trainable=false on a real one-rank ZeRO-3 run: an MLflow param like every config field, the
    estimator neither trained nor exported, the saturation diagnostic logged, and a resume from the middle
    (the frozen estimator is rebuilt from the seed, checkpoints exclude frozen weights) ends bitwise equal."""
    import mlflow

    args = tiny_args(tiny_bert, sentiment_files, tmp_path / "full", max_steps=4, eval_steps=4, save_steps=2,
                     estimator_trainable="false")
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "grad_cos not logged under ZeRO-3" in proc.stdout
    resumed = tmp_path / "resumed"
    proc = run_cli([a if a != str(tmp_path / "full") else str(resumed) for a in args]
                   + ["--resume_from_checkpoint", str(tmp_path / "full" / "checkpoints" / "step2")])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a = load_file(str(tmp_path / "full" / "export" / "infoprompt.safetensors"))
    b = load_file(str(resumed / "export" / "infoprompt.safetensors"))
    assert set(a) == set(b) and not any(k.startswith("estimator.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'full' / 'mlflow.db'}")
    run_id = json.loads((tmp_path / "full" / "metrics.json").read_text())["mlflow_run_id"]
    assert client.get_run(run_id).data.params["estimator_trainable"] == "False"
    for t in ("head", "repr"):
        assert len(client.get_metric_history(run_id, f"train/{t}_at_p0")) == 4, t


@pytest.mark.parametrize("prompt_type", ["static", "instance"])
def test_export_with_vib_predicts_as_evaluation_did(tiny_bert, sentiment_files, tmp_path, prompt_type):
    """The export carries the classifier (VIB weights, z statistics) and the prompt type: predict on the
    best export scores the test split exactly as the run's own final evaluation did."""
    from infoprompt_ds.predict import Predictor

    out = tmp_path / "run"
    proc = run_cli(tiny_args(tiny_bert, sentiment_files, out, max_steps=6, eval_steps=3, prompt_type=prompt_type,
                                 vib_head="true"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    meta = json.loads((out / "best" / "infoprompt_config.json").read_text())
    assert meta["vib_head"] and meta["estimator"] == "normalized" and len(meta["z_stats"]["mean"]) == 32
    assert meta["prompt_type"] == prompt_type
    rows = list(csv.DictReader(open(sentiment_files["test_file"])))
    preds = Predictor.load(str(out / "best"), device="cpu").predict([r["text"] for r in rows])
    acc = sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert acc == json.loads((out / "metrics.json").read_text())["test"]["accuracy"]
