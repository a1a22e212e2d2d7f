import torch
from transformers import AutoTokenizer

from infoprompt_ds.method.prompt import SoftPrompt, head_init, init_values, word_ids


def setup(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    return tok, torch.randn(len(tok), 16)


def test_random_init_matches_vocab_scale(tiny_bert):
    tok, emb = setup(tiny_bert)
    v = init_values("random", 200, emb, tok, seed=0)
    assert v.shape == (200, 16) and abs(float(v.std()) - float(emb.std())) < 0.1


def test_vocab_init_uses_seeded_ordinary_rows(tiny_bert):
    tok, emb = setup(tiny_bert)
    v = init_values("vocab", 6, emb, tok, seed=3)
    assert torch.equal(v, init_values("vocab", 6, emb, tok, seed=3))
    assert not torch.equal(v, init_values("vocab", 6, emb, tok, seed=4))
    rows = [int((emb == r).all(1).nonzero()[0]) for r in v]
    assert len(set(rows)) == 6 and not set(rows) & set(tok.all_special_ids)


def test_vocab_init_longer_than_the_vocabulary(tiny_bert):
    """More virtual tokens than ordinary tokens (a small word-level vocabulary): every row still filled."""
    tok, emb = setup(tiny_bert)
    n_ordinary = len(tok) - len(set(tok.all_special_ids))
    v = init_values("vocab", n_ordinary + 3, emb, tok, seed=0)
    assert v.shape == (n_ordinary + 3, 16)
    rows = [int((emb == r).all(1).nonzero()[0]) for r in v]
    assert len(set(rows[:n_ordinary])) == n_ordinary and not set(rows) & set(tok.all_special_ids)
    assert torch.equal(v[:6], init_values("vocab", 6, emb, tok, seed=0))  # the same start as a short prompt
    assert init_values("labels", n_ordinary + 3, emb, tok, seed=0, label_words=["bad", "good"]).shape[0] == n_ordinary + 3


def test_text_and_labels_init(tiny_bert):
    tok, emb = setup(tiny_bert)
    ids = tok("good movie", add_special_tokens=False)["input_ids"]
    v = init_values("text", 5, emb, tok, seed=0, text="good movie")
    assert torch.equal(v, emb[(ids * 3)[:5]])
    v = init_values("labels", 4, emb, tok, seed=0, label_words=["bad", "good"])
    assert torch.equal(v[0], emb[word_ids(tok, "bad")[0]]) and torch.equal(v[1], emb[word_ids(tok, "good")[0]])


def test_head_init_is_label_word_embedding(tiny_bert):
    tok, emb = setup(tiny_bert)
    h = head_init(emb, tok, ["bad", "good"])
    assert torch.equal(h[1], emb[word_ids(tok, "good")].mean(0))


def test_soft_prompt_expands_per_batch():
    p = SoftPrompt(3, 4)
    assert p(5).shape == (5, 3, 4)
