import json

import pytest

from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.config_load import parse_config


def test_defaults_are_valid_and_documented():
    from infoprompt_ds.config_load import build_parser

    cfg = parse_config([])
    assert cfg.method == "infoprompt" and cfg.k_shot == 64 and cfg.gamma == 0.1 and cfg.beta == 0.2
    help_text = build_parser().format_help()
    assert "--n_virtual_tokens" in help_text and "Soft prompt length" in help_text


def test_cli_types():
    cfg = parse_config(["--k_shot", "none", "--gamma", "0.5", "--bf16", "true", "--labels", "a,b",
                        "--label_words", "a=good,b=bad", "--max_steps", "7"])
    assert cfg.k_shot is None and cfg.gamma == 0.5 and cfg.bf16 is True and cfg.labels == ["a", "b"]
    assert cfg.label_words == {"a": "good", "b": "bad"} and cfg.max_steps == 7
    assert parse_config(["--label_words", '{"a": "good", "b": "bad"}']).label_words == {"a": "good", "b": "bad"}


def test_file_then_cli_override(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("seed: 3\nlearning_rate: 0.02\nlabel_words: {fresh: good, rotten: bad}\n")
    cfg = parse_config(["--config", str(f), "--seed", "5"])
    assert cfg.seed == 5 and cfg.learning_rate == 0.02 and cfg.label_words == {"fresh": "good", "rotten": "bad"}
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"method": "prompt"}))
    assert parse_config(["--config", str(j)]).method == "prompt"


def test_config_file_nested_by_section_equals_flat(tmp_path):
    from infoprompt_ds.config import SECTIONS, section_fields
    from infoprompt_ds.config_load import build_parser

    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("k_shot: 16\nmethod: prompt\nlearning_rate: 0.02\neval_steps: 7\nmlflow_experiment: x\n")
    nested.write_text("data: {k_shot: 16}\nmethod: {method: prompt}\noptimization: {learning_rate: 0.02}\n"
                      "evaluation: {eval_steps: 7}\ntracking: {mlflow_experiment: x}\n")
    assert parse_config(["--config", str(nested)]) == parse_config(["--config", str(flat)])
    # `method: prompt` (a value) is the field; a section block may not hold another section's field.
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("method: {learning_rate: 0.02}\n")
    with pytest.raises(ConfigError, match=r"method.learning_rate: .*belongs under 'optimization'"):
        parse_config(["--config", str(wrong)])
    # Every field is in exactly one section, and --help shows the sections as groups.
    names = [n for fs in section_fields().values() for n in fs]
    assert sorted(names) == sorted(f for f in TrainConfig.__dataclass_fields__) and len(set(names)) == len(names)
    assert list(section_fields()) == list(SECTIONS)
    help_text = build_parser().format_help()
    assert all(f"\n{s}:\n" in help_text for s in SECTIONS)


def test_config_is_frozen():
    import dataclasses

    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1


@pytest.mark.parametrize("argv, field", [
    (["--no_such_key", "1"], "no_such_key"),
    (["--k_shot", "many"], "k_shot"),
    (["--method", "lora"], "method"),
    (["--n_virtual_tokens", "0"], "n_virtual_tokens"),
    (["--learning_rate", "-1"], "learning_rate"),
    (["--prompt_init", "text"], "prompt_init_text"),
    (["--bf16", "maybe"], "bf16"),
])
def test_bad_values_name_the_field(argv, field):
    with pytest.raises(ConfigError) as e:
        parse_config(argv)
    assert e.value.field == field and "\n" not in str(e.value)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        parse_config(["--config", str(f)])


def test_vanilla_method_zeroes_mi_weights():
    cfg = TrainConfig(method="prompt")
    assert (cfg.gamma, cfg.beta, cfg.kl_weight) == (0, 0, 0) and not cfg.uses_mi
    assert TrainConfig(method="probe", gamma=0.0).gamma == 0  # an explicit zero is what the method means


@pytest.mark.parametrize("method", ["prompt", "probe"])
@pytest.mark.parametrize("name", ["gamma", "beta", "kl_weight"])
def test_a_weight_given_to_a_method_without_it_is_an_error(method, name):
    with pytest.raises(ConfigError, match=f"^{name}: .*method={method}"):
        parse_config(["--method", method, f"--{name}", "0.1"])  # 0.1 is infoprompt's default: still refused


@pytest.mark.parametrize("argv, field", [(["--estimator", "dot"], "estimator"), (["--tau", "0"], "tau"),
                                         (["--vib_head", "maybe"], "vib_head")])
def test_method_choices(argv, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        parse_config(argv)


