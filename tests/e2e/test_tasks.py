"""Task families: a real training run of each (sentence pairs via a GLUE preset on local files,
relation classification, NER on 2 ranks) through the same CLI, ZeRO-3 and export/predict path."""

import json
import random

import pytest

from conftest import FILLER, ROOT, run_cli, tiny_args
from infoprompt_ds.runtime.checkpoint import EXPORT_CONFIG
from infoprompt_ds.env import free_port


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
    meta = json.loads((out / "export" / EXPORT_CONFIG).read_text())  # the task as resolved from the preset
    assert meta["text_pair_column"] == "sentence2" and meta["label_words"]["entailment"] == "yes"
    assert json.loads((out / "config.json").read_text())["text_pair_column"] is None  # the config: as given


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
                              launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())])
    assert metrics["world_size"] == 2 and metrics["test"]["entity_f1"] > 0.5
    tags = Predictor.load(str(out / "best")).predict(["the movie good film was"])[0]
    assert len(tags) == 5 and set(tags) <= {"O", "B-per", "I-per"}

