"""Issue 33: the saturation diagnostic (each MI term at the initial prompt P0 with the current estimators) and
the frozen-critic arm (estimator_trainable=false), in process on tiny backbones."""

import pytest
import torch

from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.data.load import resolve_task
from infoprompt_ds.method.loss import METRIC_NAMES, Diagnostics
from infoprompt_ds.method.model import build_model, load_model_config, load_tokenizer, trainable_parameters

LABELS = torch.tensor([1, 0, 1, 0])


def make(path, **over):
    cfg = TrainConfig(model_name_or_path=path, n_virtual_tokens=4, max_length=16,
                      label_words={"neg": "bad", "pos": "good"}, **over)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)  # as setup does before build_model: the same seed gives the same initialisation
    return cfg, tok, build_model(cfg, load_model_config(cfg), tok, resolve_task(cfg, ["neg", "pos"]), torch.float32)


def inputs(model, cfg, tok) -> dict:
    b = dict(tok(["good film", "the plot was very bad and sad", "a nice story", "it was awful"], padding=True,
                 return_tensors="pt"))
    z0 = model(**b, unprompted_only=True)["z"]
    g = torch.Generator().manual_seed(1)
    return {**b, "labels": LABELS, "z_unprompted": z0, "eps_pos": torch.randn(4, cfg.bottleneck_dim, generator=g),
            "eps_neg": torch.randn(4, cfg.k_negatives, cfg.bottleneck_dim, generator=g)}


def perturb(model) -> None:
    """Stand-in for training: every trainable tensor moves (prompt, generator, head, estimators)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))


@pytest.mark.parametrize("fixture,prompt_type", [("tiny_bert", "static"), ("tiny_llama", "static"),
                                                 ("tiny_bert", "instance")])
def test_p0_diagnostic_equals_a_direct_evaluation(request, fixture, prompt_type):
    """The logged train/<term>_at_p0 equals the terms of a second model built from scratch (so its prompt and
    generator are P0 by construction, not read from the buffer) holding the trained model's estimators and head."""
    path = request.getfixturevalue(fixture)
    cfg, tok, trained = make(path, prompt_type=prompt_type)
    x = inputs(trained, cfg, tok)
    trained.set_z_stats(torch.cat([x["z_unprompted"], x["z_unprompted"] * 1.5]))
    perturb(trained)
    trained.train()
    diag = Diagnostics(cfg, trained, zero_stage=0)
    assert diag.saturation == ["head", "repr"]
    with torch.no_grad():
        current = trained(**x)["method"].terms
        diag.add_p0(trained(**x, at_p0=True))
    logs = diag.flush()

    _, _, direct = make(path, prompt_type=prompt_type)
    kept = {k: v for k, v in trained.state_dict().items() if not k.startswith(("prompt.", "generator."))}
    direct.load_state_dict(kept, strict=False)
    direct.z_mean.copy_(trained.z_mean)
    direct.z_std.copy_(trained.z_std)
    direct.train()
    with torch.no_grad():
        slow = direct(**x)["method"].terms
    for t in ("head", "repr"):
        assert f"train/{t}_at_p0" in METRIC_NAMES
        assert logs[f"train/{t}_at_p0"] == float(slow[t]), t
        assert abs(float(current[t]) - float(slow[t])) > 1e-4, t  # the prompt did move: a real comparison
    assert not any(k.endswith("_at_p0") for k in diag.flush())  # the window's P0 sums were reset


def test_vanilla_has_no_p0_and_logs_no_saturation(tiny_bert):
    cfg, _, model = make(tiny_bert, method="prompt")
    assert model.prompt_p0 is None and Diagnostics(cfg, model).saturation == []


def test_frozen_estimator_stays_at_its_init_and_only_the_prompt_gets_the_terms_gradient(tiny_bert):
    """estimator_trainable=false: the estimator is outside the trainable set setup hands to DeepSpeed; after real
    optimizer steps on that set it equals the initialisation bitwise; L_head's gradient reaches the prompt, not
    the class rows."""
    cfg, tok, model = make(tiny_bert, estimator_trainable=False)
    _, _, init = make(tiny_bert, estimator_trainable=False)
    names = set(trainable_parameters(model))
    assert not any(n.startswith("estimator.") for n in names) and "prompt.weight" in names
    x = inputs(model, cfg, tok)
    model.set_z_stats(torch.cat([x["z_unprompted"], x["z_unprompted"] * 1.5]))
    model.train()
    m = model(**x)["method"]
    assert torch.autograd.grad(m.weighted["head"], model.head.weight, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(m.weighted["head"], m.prompt, retain_graph=True)[0].abs().sum() > 0
    opt = torch.optim.AdamW(list(trainable_parameters(model).values()), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(**x)["loss"].backward()
        opt.step()
    for k, v in init.estimator.state_dict().items():
        assert torch.equal(model.estimator.state_dict()[k], v), k
    assert not torch.equal(model.prompt.weight, init.prompt.weight)


def test_frozen_estimator_with_vib_head_is_one_line_naming_the_field():
    with pytest.raises(ConfigError) as e:
        TrainConfig(estimator_trainable=False, vib_head=True)
    assert "estimator_trainable" in str(e.value) and "\n" not in str(e.value)
