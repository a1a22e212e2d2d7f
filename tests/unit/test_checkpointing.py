"""--gradient_checkpointing in process (no DeepSpeed): the prompt's gradient with checkpointing is nonzero and
equal to the plain run's, the layers really recompute in training, and eval / the unprompted pass never do.
The distributed equality (ZeRO-3, 2 ranks, real processes) is tests/e2e/test_scale.py."""

import pytest
import torch

from infoprompt_ds.config import TrainConfig
from infoprompt_ds.data.load import resolve_task
from infoprompt_ds.method.model import build_model, load_model_config, load_tokenizer


def make(path, **over):
    cfg = TrainConfig(model_name_or_path=path, n_virtual_tokens=4, max_length=16,
                      label_words={"neg": "bad", "pos": "good"}, **over)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    return tok, build_model(cfg, load_model_config(cfg), tok, resolve_task(cfg, ["neg", "pos"]), torch.float32)


def count_recomputes(model) -> list:
    """Counts the calls of each checkpointed layer's checkpoint function (one per layer per forward)."""
    calls = []
    for layer in model.checkpointed:
        inner = layer._gradient_checkpointing_func

        def counted(*a, _inner=inner, **k):
            calls.append(1)
            return _inner(*a, **k)
        layer._gradient_checkpointing_func = counted
    return calls


def step_grads(model, tok, method):
    enc = tok(["good film", "the plot was very bad and sad"], padding=True, return_tensors="pt")
    b = dict(enc)
    model.train()
    z0 = model(**b, unprompted_only=True)["z"]
    model.set_z_stats(torch.cat([z0, z0 + 1]))
    g = torch.Generator().manual_seed(1)
    extra = {"z_unprompted": z0, "eps_pos": torch.randn(2, 32, generator=g),
             "eps_neg": torch.randn(2, 4, 32, generator=g)} if method == "infoprompt" else {}
    out = model(**b, labels=torch.tensor([1, 0]), **extra)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert", "tiny_llama_lm", "tiny_bert_mlm"])
@pytest.mark.parametrize("method", ["prompt", "infoprompt"])
def test_prompt_gradient_is_nonzero_and_equal_with_checkpointing(request, fixture, method):
    path = request.getfixturevalue(fixture)
    tok, plain = make(path, method=method)
    _, ckpt = make(path, method=method, gradient_checkpointing=True)
    assert not plain.checkpointed and len(ckpt.checkpointed) == 2  # both 2-layer fixtures: every layer
    calls = count_recomputes(ckpt)
    loss0, g0 = step_grads(plain, tok, method)
    loss1, g1 = step_grads(ckpt, tok, method)
    assert len(calls) == 2, "the checkpointed forward did not run through the checkpoint function"
    assert torch.equal(loss0, loss1)
    assert g1["prompt.weight"].abs().sum() > 0
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-6, msg=name)


def test_eval_and_unprompted_pass_never_recompute_and_dropout_stays_off(tiny_bert):
    """The tiny BERT has dropout 0.1: any layer left in training mode would change the output."""
    tok, model = make(tiny_bert, gradient_checkpointing=True)
    calls = count_recomputes(model)
    b = dict(tok(["good film", "a bad plot"], padding=True, return_tensors="pt"))
    model.train()
    with torch.no_grad():  # the in-step unprompted pass (cache_unprompted false) and the cached pass
        z_train = model(**b, unprompted_only=True)["z"]
    model.eval()  # evaluation / predict: engine.eval() + no_grad
    with torch.no_grad():
        logits_eval = model(**b)["logits"]
        z_eval = model(**b, unprompted_only=True)["z"]
    assert not calls
    assert torch.equal(z_train, z_eval)
    model.train()
    logits_train = model(**b)["logits"]  # grad enabled, training: checkpointed, yet the same numbers
    assert len(calls) == 2 and torch.equal(logits_train.detach(), logits_eval)
    assert all(not m.training for m in model.backbone.modules() if m not in model.checkpointed)
