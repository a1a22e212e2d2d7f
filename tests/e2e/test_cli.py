"""Bad input through the real command: one line on stderr naming the field, exit code 2, and nothing
left behind that looks like a finished run (no metrics.json, no MLflow run)."""

import json


from conftest import run_cli, tiny_args


def bad_cases(tmp_path, tiny_bert):
    broken_ds = tmp_path / "broken.json"
    broken_ds.write_text('{"zero_optimization": {"stage": 3,')
    no_label = tmp_path / "val.csv"
    no_label.write_text("text,label\ngood film,pos\n")
    return [
        ({"model_name_or_path": str(tmp_path / "no_model")}, "model_name_or_path"),
        ({"text_column": "review"}, "text_column"),
        ({"label_words": "pos=good"}, "label_words"),
        ({"k_shot": 500}, "k_shot"),
        ({"n_virtual_tokens": 50, "max_length": 20}, "n_virtual_tokens"),
        ({"deepspeed": str(broken_ds)}, "deepspeed"),
        ({"learning_rat": 0.1}, "learning_rat"),
        ({"train_file": str(tmp_path / "missing.csv")}, "train_file"),
    ]


def test_bad_input_is_one_line_exit_2(tmp_path, tiny_bert, sentiment_files):
    for i, (over, field) in enumerate(bad_cases(tmp_path, tiny_bert)):
        out = tmp_path / f"run{i}"
        proc = run_cli(tiny_args(tiny_bert, sentiment_files, out, **over))
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "Setting accelerator" not in line]
        assert proc.returncode == 2, (over, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(f"error: {field}:"), (over, lines)
        assert not (out / "metrics.json").exists() and not (tmp_path / "mlflow.db").exists()


def test_finished_output_dir_is_not_overwritten(tmp_path, tiny_bert, sentiment_files):
    out = tmp_path / "done"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"test": {}}))
    proc = run_cli(tiny_args(tiny_bert, sentiment_files, out))
    assert proc.returncode == 2 and "error: output_dir:" in proc.stderr


def test_help_lists_every_field():
    proc = run_cli(["--help"])
    assert proc.returncode == 0 and "--resume_from_checkpoint" in proc.stdout and "--gamma" in proc.stdout
