"""The export's PEFT adapter (peft_export.py) round-trips through PEFT itself: PeftModel.from_pretrained
loads it onto the backbone, its prompt equals ours bit for bit, and PEFT's model computes what ours does."""

import json

import torch
from peft import PeftModel

from infoprompt_ds.runtime.checkpoint import load_export, save_export
from infoprompt_ds.config import TrainConfig
from infoprompt_ds.data.load import resolve_task
from infoprompt_ds.method.model import build_model, load_model_config, load_tokenizer, trainable_parameters
from infoprompt_ds.runtime.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS

LABELS, WORDS = ["neg", "pos"], {"neg": "bad", "pos": "good"}
TEXTS = ["good film", "the plot was very bad and sad"]


def ours(path, **over):
    cfg = TrainConfig(model_name_or_path=path, n_virtual_tokens=4, max_length=16, method="prompt",
                      label_words=WORDS, prompt_init="random", **over)
    tok = load_tokenizer(cfg)
    return tok, build_model(cfg, load_model_config(cfg), tok, resolve_task(cfg, LABELS), torch.float32).eval()


def export(model, path, **meta):
    """What the training loop exports (prompt + head), written by the same save_export."""
    tensors = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
    save_export(path, tensors, {"backbone": "tiny", "labels": LABELS, "n_virtual_tokens": 4, **meta})
    return tensors


def test_decoder_adapter_gives_our_label_word_logits(tiny_llama_lm, tmp_path):
    from transformers import LlamaForCausalLM

    tok, model = ours(tiny_llama_lm)
    # The label-word read-out with untrained class rows: the LM head's rows of the label words, no bias.
    lm = LlamaForCausalLM.from_pretrained(tiny_llama_lm).eval()
    word_ids = [tok(" " + WORDS[n], add_special_tokens=False)["input_ids"][0] for n in LABELS]
    with torch.no_grad():
        model.head.weight.copy_(lm.lm_head.weight[word_ids])
        model.head.bias.zero_()
    tensors = export(model, tmp_path / "export", readout="lm_label")

    cfg = json.loads((tmp_path / "export" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM" and cfg["num_virtual_tokens"] == 4
    peft_model = PeftModel.from_pretrained(lm, str(tmp_path / "export")).eval()
    loaded = peft_model.prompt_encoder["default"].embedding.weight
    assert loaded.dtype == torch.float32 and torch.equal(loaded, tensors["prompt.weight"])
    assert torch.equal(loaded, load_export(tmp_path / "export")[0]["prompt.weight"])

    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        our_logits = model(enc["input_ids"], enc["attention_mask"])["logits"]
        # PEFT prepends the prompt to the input embeddings with positions 0..n+L-1, as our forward does;
        # its logits cover the virtual tokens too, so the last real token sits at n + length - 1.
        full = peft_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    last = 4 + enc["attention_mask"].sum(1) - 1
    peft_logits = full[torch.arange(len(TEXTS)), last][:, word_ids]
    torch.testing.assert_close(peft_logits, our_logits, rtol=1e-5, atol=1e-5)
    # and the prompt matters: without it the logits differ (the comparison can fail)
    with torch.no_grad():
        plain = lm(**enc).logits[torch.arange(len(TEXTS)), enc["attention_mask"].sum(1) - 1][:, word_ids]
    assert not torch.allclose(plain, our_logits, atol=1e-3)


def test_encoder_adapter_gives_our_hidden_states(tiny_bert, tmp_path):
    """Linear read-out: FEATURE_EXTRACTION on the plain encoder; PEFT's hidden states are the ones our head
    reads (our head, pooling and labels stay in infoprompt.safetensors beside the adapter)."""
    from transformers import AutoModel

    tok, model = ours(tiny_bert)
    tensors = export(model, tmp_path / "export")  # no readout in meta: the linear head
    cfg = json.loads((tmp_path / "export" / ADAPTER_CONFIG).read_text())
    assert cfg["task_type"] == "FEATURE_EXTRACTION"
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert).eval(), str(tmp_path / "export")).eval()
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, tensors["prompt.weight"])
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        z = model(enc["input_ids"], enc["attention_mask"])["z"]
        hidden = peft_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(model._pool(hidden, enc["attention_mask"], 4), z, rtol=1e-5, atol=1e-5)


def test_cloze_readout_is_feature_extraction(tiny_bert, tmp_path):
    _, model = ours(tiny_bert)
    export(model, tmp_path / "export", readout="cloze")
    assert json.loads((tmp_path / "export" / ADAPTER_CONFIG).read_text())["task_type"] == "FEATURE_EXTRACTION"


def test_instance_prompts_and_probes_get_no_adapter(tiny_bert, tmp_path, capfd):
    _, model = ours(tiny_bert)
    export(model, tmp_path / "instance", prompt_type="instance")
    assert "prompt_type=instance" in capfd.readouterr().err
    tensors = {k: v for k, v in trainable_parameters(model).items() if k.startswith("head.")}
    save_export(tmp_path / "probe", tensors, {"backbone": "tiny", "labels": LABELS})
    assert "method=probe" in capfd.readouterr().err
    for d in ("instance", "probe"):
        assert (tmp_path / d / "infoprompt.safetensors").is_file()  # our export is written regardless
        assert not (tmp_path / d / ADAPTER_CONFIG).exists() and not (tmp_path / d / ADAPTER_WEIGHTS).exists()
