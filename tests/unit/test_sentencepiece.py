"""A backbone whose tokenizer is a SentencePiece model (Llama/T5/ALBERT-style): a tiny one is trained here
with sentencepiece, loaded through transformers' SentencePiece conversion (sentencepiece + protobuf, both
declared dependencies), and our code builds and trains a prompt on a tiny Llama with it."""

import json
import random

import pytest
import torch

from conftest import FILLER, NEG, POS
from infoprompt_ds.config import TrainConfig
from infoprompt_ds.data.load import resolve_task
from infoprompt_ds.method.model import build_model, load_model_config, load_tokenizer


@pytest.fixture(scope="module")
def sp_llama(tmp_path_factory) -> str:
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaModel

    d = tmp_path_factory.mktemp("sp_llama")
    rng = random.Random(0)
    words = POS + NEG + FILLER
    (d / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=48,
                                   model_type="unigram", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   character_coverage=1.0, minloglevel=2)
    (d / "sp.model").rename(d / "tokenizer.model")  # the file name Llama checkpoints ship it under
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    config = LlamaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(d)
    return str(d)


def test_sentencepiece_backbone_builds_and_trains(sp_llama):
    cfg = TrainConfig(model_name_or_path=sp_llama, n_virtual_tokens=4, max_length=24,
                      label_words={"neg": "bad", "pos": "good"}, prompt_init="labels")
    tok = load_tokenizer(cfg)
    pieces = tok.convert_ids_to_tokens(tok("the good film", add_special_tokens=False)["input_ids"])
    assert pieces[0].startswith("\u2581") and len(tok) == 48  # SentencePiece's word-boundary marker
    model = build_model(cfg, load_model_config(cfg), tok, resolve_task(cfg, ["neg", "pos"]), torch.float32)
    enc = tok(["good film", "the plot was very bad and sad"], padding=True, return_tensors="pt")
    out = model(enc["input_ids"], enc["attention_mask"], labels=torch.tensor([1, 0]),
                eps_pos=torch.randn(2, cfg.bottleneck_dim), eps_neg=torch.randn(2, cfg.k_negatives, cfg.bottleneck_dim))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.prompt.weight.grad.abs().sum() > 0
