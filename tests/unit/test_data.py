import json

import pytest
from transformers import AutoTokenizer

from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.data.load import prepare_data


def cfg_for(files, **over):
    return TrainConfig(**{**files, "k_shot": None, "label_words": {"pos": "good", "neg": "bad"}, **over})


def test_local_csv_and_tokenization(sentiment_files, tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    data = prepare_data(cfg_for(sentiment_files), tok)
    assert data.label_names == ["neg", "pos"]
    train = data.splits["train"]
    assert len(train) == 64 and set(train.column_names) >= {"input_ids", "attention_mask", "labels", "idx"}
    assert train["idx"] == list(range(64))


def test_k_shot_is_per_class_and_seeded(sentiment_files, tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    a = prepare_data(cfg_for(sentiment_files, k_shot=5, seed=1), tok).splits["train"]
    b = prepare_data(cfg_for(sentiment_files, k_shot=5, seed=1), tok).splits["train"]
    c = prepare_data(cfg_for(sentiment_files, k_shot=5, seed=2), tok).splits["train"]
    assert sorted(a["labels"]) == [0] * 5 + [1] * 5
    assert a["input_ids"] == b["input_ids"] and a["input_ids"] != c["input_ids"]


def test_jsonl_and_tsv_and_single_file_split(tmp_path, tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [{"sentence": f"good film {i}" if i % 2 else f"bad film {i}", "y": i % 2} for i in range(40)]
    jl = tmp_path / "all.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = TrainConfig(dataset=str(jl), text_column="sentence", label_column="y", k_shot=None)
    d1 = prepare_data(cfg, tok)
    d2 = prepare_data(TrainConfig(dataset=str(jl), text_column="sentence", label_column="y", k_shot=None), tok)
    assert {k: len(v) for k, v in d1.splits.items()} == {"train": 32, "validation": 4, "test": 4}
    assert d1.splits["test"]["input_ids"] == d2.splits["test"]["input_ids"]  # deterministic split
    tsv = tmp_path / "all.tsv"
    tsv.write_text("sentence\ty\n" + "\n".join(f"{r['sentence']}\t{r['y']}" for r in rows))
    assert len(prepare_data(TrainConfig(dataset=str(tsv), text_column="sentence", label_column="y",
                                        k_shot=None), tok).splits["train"]) == 32


def test_rotten_tomatoes_preset(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    cfg = TrainConfig(max_eval_samples=50)
    data = prepare_data(cfg, tok)
    assert data.label_names == ["fresh", "rotten"] and data.task.label_words == {"fresh": "good", "rotten": "bad"}
    assert data.task.type == "classification" and data.task.metric == "accuracy"
    # The preset fills the resolved task; the user's config stays as given (it is frozen).
    assert cfg.label_words is None and cfg.task_type == "auto" and cfg.metric_for_best_model == "auto"
    assert len(data.splits["train"]) == 128 and len(data.splits["validation"]) == 50


@pytest.mark.parametrize("over, field", [
    ({"text_column": "review"}, "text_column"),
    ({"k_shot": 1000}, "k_shot"),
    ({"label_words": {"pos": "good"}}, "label_words"),
    ({"labels": ["pos", "meh"]}, "labels"),
    ({"train_file": "/nonexistent/train.csv"}, "train_file"),
])
def test_bad_data_names_the_field(sentiment_files, tiny_bert, over, field):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    with pytest.raises(ConfigError) as e:
        prepare_data(cfg_for(sentiment_files, **over), tok)
    assert e.value.field == field


def test_unknown_label_in_validation(tmp_path, sentiment_files, tiny_bert):
    bad = tmp_path / "val.csv"
    bad.write_text("text,label\ngood film,pos\nodd film,maybe\n")
    with pytest.raises(ConfigError, match="'maybe'"):
        prepare_data(cfg_for({**sentiment_files, "validation_file": str(bad)}), AutoTokenizer.from_pretrained(tiny_bert))
