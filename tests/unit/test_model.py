"""The model without DeepSpeed engines (single process): freezing, pooling, losses present per method."""

import pytest
import torch
from transformers import AutoConfig

from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.data.load import resolve_task
from infoprompt_ds.method.model import (build_model, is_encoder, load_model_config, load_tokenizer, trainable_parameters)


def make(path, **over):
    cfg = TrainConfig(model_name_or_path=path, n_virtual_tokens=4, max_length=16,
                      label_words={"neg": "bad", "pos": "good"}, **over)
    tok = load_tokenizer(cfg)
    return cfg, tok, build_model(cfg, load_model_config(cfg), tok, resolve_task(cfg, ["neg", "pos"]), torch.float32)


def batch(tok):
    enc = tok(["good film", "the plot was very bad and sad"], padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items()}


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_only_prompt_head_and_estimator_train(request, fixture):
    cfg, tok, model = make(request.getfixturevalue(fixture), vib_head=True)
    names = set(trainable_parameters(model))
    assert names and all(n.startswith(("prompt.", "head.", "vib.", "estimator.")) for n in names)
    assert any(n.startswith("estimator.") for n in names) and any(n.startswith("vib.") for n in names)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    out = model(**batch(tok), labels=torch.tensor([1, 0]), eps_pos=torch.randn(2, 32), eps_neg=torch.randn(2, 4, 32))
    assert out["logits"].shape == (2, 2) and {"ce", "head", "repr", "kl", "loss"} <= set(out)
    out["loss"].backward()
    assert model.prompt.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_vanilla_mode_builds_and_trains_no_estimator(tiny_bert):
    cfg, tok, model = make(tiny_bert, method="prompt", vib_head=False)
    assert model.estimator is None and model.vib is None
    assert set(trainable_parameters(model)) == {"prompt.weight", "head.weight", "head.bias"}
    out = model(**batch(tok), labels=torch.tensor([1, 0]))
    assert torch.equal(out["loss"], out["ce"]) and "repr" not in out


def test_pooling_positions(tiny_llama, tiny_bert):
    _, tok, model = make(tiny_llama)
    assert model.pooling == "last"
    b = batch(tok)
    z = model(**b)["z"]
    # the last real token of the shorter input sits at n + len - 1, not at the padded end
    lengths = b["attention_mask"].sum(1)
    full = torch.cat([model.prompt.weight.unsqueeze(0).expand(2, -1, -1),
                      model.backbone.get_input_embeddings()(b["input_ids"])], 1)
    mask = torch.cat([torch.ones(2, 4, dtype=torch.long), b["attention_mask"]], 1)
    hidden = model.backbone(inputs_embeds=full, attention_mask=mask).last_hidden_state
    assert torch.allclose(z[0], hidden[0, 4 + lengths[0] - 1], atol=1e-5)
    assert torch.allclose(z[1], hidden[1, 4 + lengths[1] - 1], atol=1e-5)
    _, tok, bert = make(tiny_bert)
    assert bert.pooling == "cls"


def test_unprompted_representation_is_the_plain_backbone(tiny_bert):
    _, tok, model = make(tiny_bert)
    b = batch(tok)
    z0 = model(**b, unprompted_only=True)["z"]
    plain = model.backbone(**b).last_hidden_state[:, 0]
    assert torch.allclose(z0, plain, atol=1e-5)


def test_backbone_stays_in_eval_mode(tiny_bert):
    _, _, model = make(tiny_bert)
    model.train()
    assert model.training and not model.backbone.training


def test_encoder_decoder_detection_and_prompt_length(tiny_bert, tiny_llama):
    assert is_encoder(AutoConfig.from_pretrained(tiny_bert)) and not is_encoder(AutoConfig.from_pretrained(tiny_llama))
    with pytest.raises(ConfigError, match="n_virtual_tokens"):
        load_model_config(TrainConfig(model_name_or_path=tiny_bert, n_virtual_tokens=60, max_length=16))
    with pytest.raises(ConfigError, match="model_name_or_path"):
        load_model_config(TrainConfig(model_name_or_path="/nonexistent/model"))


def test_probe_trains_only_the_head(tiny_bert):
    cfg, tok, model = make(tiny_bert, method="probe", vib_head=False)
    assert model.prompt is None and set(trainable_parameters(model)) == {"head.weight", "head.bias"}
    out = model(**batch(tok), labels=torch.tensor([1, 0]))
    plain = model.backbone(**batch(tok)).last_hidden_state[:, 0]
    assert torch.allclose(out["z"], plain, atol=1e-5)  # no prompt in front: the plain representation


@pytest.mark.parametrize("model_type, tok_fixture", [
    ("roberta", "tiny_bert"), ("deberta-v2", "tiny_bert"), ("gpt2", "tiny_llama"), ("qwen2", None)])
def test_other_backbone_families(request, tmp_path, model_type, tok_fixture):
    """Any transformers encoder/decoder whose input embeddings we can reach: a tiny random one of each
    family loads with from_pretrained, pools from the right position, and trains the prompt."""
    from transformers import AutoModel, AutoTokenizer, Qwen2Tokenizer

    if tok_fixture is None:  # AutoTokenizer maps a qwen2 folder to Qwen2Tokenizer: give it a real one
        chars = sorted(set("abcdefghijklmnopqrstuvwxyz")) + ["Ġ"]
        tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(["<|endoftext|>"] + chars)}, merges=[])
    else:
        tok = AutoTokenizer.from_pretrained(request.getfixturevalue(tok_fixture))
    sizes = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                 num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model(model_type, **sizes)
    AutoModel.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg, tok, model = make(str(tmp_path))
    assert model.pooling == ("cls" if model_type in ("roberta", "deberta-v2") else "last")
    out = model(**batch(tok), labels=torch.tensor([1, 0]), eps_pos=torch.randn(2, 32), eps_neg=torch.randn(2, 4, 32))
    out["loss"].backward()
    assert model.prompt.weight.grad.abs().sum() > 0


# Read outside their own module's forward by design, only through operations that round the same at any
# address (a copy "* 1", row means): the prompt in InfoPromptModel.forward, the head rows in L_head.
READ_OUTSIDE_BY_DESIGN = {"prompt.weight", "head.weight"}


@pytest.mark.parametrize("over", [{}, {"prompt_type": "instance"}, {"vib_head": True}, {"estimator": "authors"}],
                         ids=["normalized", "instance", "vib", "authors"])
def test_training_forward_reads_parameters_only_inside_their_modules(tiny_bert, over):
    """Exact resume (tests/reliability/test_save_kill.py) depends on it: ZeRO-3 serves a parameter read
    outside its module's forward with a fresh aligned copy on an engine's first step and with a view into
    the flat partition on every later one; a matrix-vector product on the two rounds differently, so the
    first step after a resume drifted 1 ulp from the uninterrupted run (the critic's weight was read for
    its dtype). Records, as DeepSpeed's ZeROOrderedDict sees them, the reads of each trainable module's
    own parameters while that module is not inside its forward."""

    class Recording(dict):
        def __init__(self, items, owner):
            super().__init__(items)
            self.owner = owner

        def __getitem__(self, key):
            if not active.get(self.owner):
                outside.add(f"{names[self.owner]}.{key}" if names[self.owner] else key)
            return super().__getitem__(key)

    _, tok, model = make(tiny_bert, **over)
    names = {id(m): n for n, m in model.named_modules()}
    active, outside = {}, set()
    for m in model.modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            m._parameters = Recording(m._parameters, id(m))
            m.register_forward_pre_hook(lambda mod, args: active.__setitem__(id(mod), active.get(id(mod), 0) + 1))
            m.register_forward_hook(lambda mod, args, out: active.__setitem__(id(mod), active[id(mod)] - 1))
    model.set_z_stats(torch.randn(6, 32))
    model.train()
    b = batch(tok)
    out = model(**b, labels=torch.tensor([1, 0]), z_unprompted=model(**b, unprompted_only=True)["z"],
                eps_pos=torch.randn(2, 32), eps_neg=torch.randn(2, 4, 32))
    out["loss"].backward()
    assert model.estimator.critic is not None or over.get("estimator") == "authors"
    assert outside and outside <= READ_OUTSIDE_BY_DESIGN, outside - READ_OUTSIDE_BY_DESIGN


@pytest.mark.parametrize("method", ["prompt", "infoprompt"])
def test_a_training_step_with_the_cache_runs_the_backbone_once(tiny_bert, method):
    """With cache_unprompted (train_loop.fit builds the cache), z(x, no prompt) reaches every model that
    reads it: the instance prompt's generator too, in vanilla prompt tuning. mi_inputs used to give vanilla
    runs nothing (they need no noise), so each of their steps ran a second backbone pass."""
    from types import SimpleNamespace

    from infoprompt_ds.method.model import model_inputs
    from infoprompt_ds.runtime.train_loop import mi_inputs

    cfg, tok, model = make(tiny_bert, method=method, prompt_type="instance")
    b = {**batch(tok), "idx": torch.tensor([1, 0])}
    inputs = model_inputs(b)
    z_cache = model(**{k: v.flip(0) for k, v in inputs.items()}, unprompted_only=True)["z"]  # rows in idx order
    model.set_z_stats(z_cache)
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    run = SimpleNamespace(cfg=cfg, engine=SimpleNamespace(module=model), z_cache=z_cache, device=torch.device("cpu"),
                          world=1, rank=0, total_steps=10, micro_per_epoch=1)  # what a step reads of a Run
    kwargs = mi_inputs(run, b, 0)
    assert torch.equal(kwargs["z_unprompted"], z_cache[b["idx"]])
    model.train()
    model(**inputs, labels=torch.tensor([1, 0]), **kwargs)["loss"].backward()
    assert len(calls) == 1
    model(**inputs, labels=torch.tensor([1, 0]), **{k: v for k, v in kwargs.items() if k != "z_unprompted"})
    assert len(calls) == 3  # the hook sees the pass the cache saves


def test_bf16_on_cpu_takes_the_math_attention_path():
    """pick_attention_kernel: bf16 on a CPU turns torch's CPU flash-attention kernel off (its bf16 backward was
    the slowest op of a bf16 step); fp32 keeps it. Checked on the op autograd records, then restored."""
    import torch
    import torch.nn.functional as F

    from infoprompt_ds.method.model import pick_attention_kernel

    def backward_op(dtype):
        q = torch.randn(2, 2, 8, 4, dtype=dtype, requires_grad=True)
        return F.scaled_dot_product_attention(q, q, q).grad_fn.name()

    was = torch.backends.cuda.flash_sdp_enabled()
    try:
        torch.backends.cuda.enable_flash_sdp(True)
        pick_attention_kernel(torch.float32, torch.device("cpu"))
        assert "Flash" in backward_op(torch.bfloat16)  # fp32 runs leave the kernel choice alone
        pick_attention_kernel(torch.bfloat16, torch.device("cpu"))
        assert "Flash" not in backward_op(torch.bfloat16)
    finally:
        torch.backends.cuda.enable_flash_sdp(was)
