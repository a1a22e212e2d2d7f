"""prompt_depth=deep in process (no DeepSpeed): the control (no deeper replacement = the input prompt,
bitwise), every layer's vectors get a gradient (decoder and encoder, each read-out), checkpointing gives the
same gradient, the propagate init, and the pre-flight refusal. ZeRO-3 on 2 ranks: tests/e2e/test_deep_prompt.py."""

import pytest
import torch

from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.data.load import resolve_task
from infoprompt_ds.method.deep import check_prompt_depth, init_propagated
from infoprompt_ds.method.model import build_model, load_model_config, load_tokenizer


def make(path, **over):
    cfg = TrainConfig(model_name_or_path=path, n_virtual_tokens=4, max_length=16,
                      label_words={"neg": "bad", "pos": "good"}, **over)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, load_model_config(cfg), tok, resolve_task(cfg, ["neg", "pos"]), torch.float32)
    return tok, model


def batch(tok):
    return dict(tok(["good film", "the plot was very bad and sad"], padding=True, return_tensors="pt"))


def loss_and_grads(model, tok):
    model.train()
    out = model(**batch(tok), labels=torch.tensor([1, 0]))
    out["loss"].backward()
    return out, {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                 for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert"])
def test_control_without_deeper_replacement_equals_input_prompt_bitwise(four_layers, fixture):
    """A deep model whose layer hooks are removed runs exactly the input-prompt computation."""
    path = four_layers(fixture)
    tok, plain = make(path, method="prompt")
    _, deep = make(path, method="prompt", prompt_depth="deep", deep_prompt_init="random")
    assert torch.equal(plain.prompt.weight, deep.prompt.weight)
    for handle in deep.deep_hooks.handles:
        handle.remove()
    a, ga = loss_and_grads(plain, tok)
    b, gb = loss_and_grads(deep, tok)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["loss"], b["loss"])
    assert torch.equal(ga["prompt.weight"], gb["prompt.weight"])
    assert not gb["deep_prompt.weight"].any()  # unused: no gradient at all


def test_decoder_propagate_init_starts_where_the_input_prompt_is(four_layers):
    """Causal attention: the prompt positions' states do not depend on the input, so the propagated vectors
    are the ones the input prompt already produces there: step 0 = prompt_depth=input (to rounding)."""
    tok, plain = make(four_layers("tiny_llama"), method="prompt")
    _, deep = make(four_layers("tiny_llama"), method="prompt", prompt_depth="deep")
    assert not deep.deep_prompt.weight.any()  # a placeholder until init_propagated
    init_propagated(deep)
    assert deep.deep_prompt.weight.abs().sum() > 0
    plain.eval(), deep.eval()
    with torch.no_grad():
        a, b = plain(**batch(tok))["logits"], deep(**batch(tok))["logits"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture,over", [
    ("tiny_llama", {}), ("tiny_llama", {"pooling": "mean"}), ("tiny_llama_lm", {"readout": "lm_label"}),
    ("tiny_bert", {}), ("tiny_bert", {"pooling": "mean"}), ("tiny_bert_mlm", {"readout": "cloze"}),
    ("tiny_bert", {"prompt_type": "instance"}),
])
def test_every_layer_gets_a_gradient(four_layers, fixture, over):
    path = four_layers(fixture)
    tok, model = make(path, **{"method": "prompt", **over}, prompt_depth="deep")
    init_propagated(model)
    model.set_z_stats(torch.randn(4, model.head.weight.shape[1]))
    _, grads = loss_and_grads(model, tok)
    g = grads["deep_prompt.weight"]
    assert g.shape[0] == model.backbone.config.num_hidden_layers - 1 == 3
    assert all(g[i].abs().sum() > 0 for i in range(g.shape[0])), g.abs().sum((1, 2))
    assert grads["prompt.weight"].abs().sum() > 0  # layer 0's vectors: the input prompt


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert"])
def test_checkpointing_gives_the_same_deep_gradient(four_layers, fixture):
    path = four_layers(fixture)
    tok, plain = make(path, method="prompt", prompt_depth="deep", deep_prompt_init="random")
    _, ckpt = make(path, method="prompt", prompt_depth="deep", deep_prompt_init="random", gradient_checkpointing=True)
    assert len(ckpt.checkpointed) == 4
    a, ga = loss_and_grads(plain, tok)
    b, gb = loss_and_grads(ckpt, tok)
    assert torch.equal(a["loss"], b["loss"])
    assert gb["deep_prompt.weight"].abs().sum() > 0
    torch.testing.assert_close(ga["deep_prompt.weight"], gb["deep_prompt.weight"], rtol=0, atol=0)


def test_random_init_is_small_and_seeded(tiny_bert):
    _, a = make(tiny_bert, prompt_depth="deep", deep_prompt_init="random")
    _, b = make(tiny_bert, prompt_depth="deep", deep_prompt_init="random")
    w = a.deep_prompt.weight
    assert torch.equal(w, b.deep_prompt.weight) and 0.01 < w.std() < 0.03


def test_unprompted_pass_is_not_replaced(tiny_bert):
    tok, plain = make(tiny_bert, method="prompt")
    _, deep = make(tiny_bert, method="prompt", prompt_depth="deep", deep_prompt_init="random")
    with torch.no_grad():
        za = plain(**batch(tok), unprompted_only=True)["z"]
        zb = deep(**batch(tok), unprompted_only=True)["z"]
    assert torch.equal(za, zb)


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="^prompt_depth:"):
        TrainConfig(prompt_depth="deeper")
    with pytest.raises(ConfigError, match="^deep_prompt_init:"):
        TrainConfig(deep_prompt_init="zeros")
    with pytest.raises(ConfigError, match="^prompt_depth:.*probe"):
        TrainConfig(method="probe", prompt_depth="deep")


def test_preflight_refuses_a_model_whose_layers_cannot_be_found(tmp_path, tiny_bert):
    """ALBERT runs one shared layer module for every layer: no module per layer to hook."""
    from transformers import AlbertConfig

    AlbertConfig(vocab_size=50, hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64).save_pretrained(tmp_path)
    cfg = TrainConfig(model_name_or_path=str(tmp_path), prompt_depth="deep")
    with pytest.raises(ConfigError) as e:
        check_prompt_depth(cfg, load_model_config(cfg), "linear")
    assert e.value.field == "prompt_depth" and "\n" not in str(e.value)
    ok = TrainConfig(model_name_or_path=tiny_bert, prompt_depth="deep", n_virtual_tokens=4, max_length=16)
    check_prompt_depth(ok, load_model_config(ok), "linear")  # finds BERT's layers


def test_memory_plan_counts_the_deep_vectors():
    from infoprompt_ds.runtime.plan import trainable_params

    deep, plain = TrainConfig(method="prompt", prompt_depth="deep"), TrainConfig(method="prompt")
    assert trainable_params(deep, 32, layers=4) - trainable_params(plain, 32, layers=4) == 3 * 16 * 32
