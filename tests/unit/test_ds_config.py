"""The DeepSpeed json: shipped configs by name, "auto" fill, checks (infoprompt_ds/runtime/ds_config.py)."""

import json

import pytest

from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.runtime.ds_config import fill_ds_config, load_ds_config


def test_fill_ds_config_autos():
    cfg = TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=0.03, bf16=True)
    ds = fill_ds_config(load_ds_config("ds_configs/zero3.json"), cfg, world_size=2, total_steps=100, hidden_size=16)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["optimizer"]["params"]["lr"] == 0.03 and ds["scheduler"]["params"]["total_num_steps"] == 100
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 6 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 160
    assert "auto" not in json.dumps(ds)


def test_ds_config_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="deepspeed"):
        load_ds_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_ds_config(str(tmp_path / "missing.json"))
    conflicting = {"train_micro_batch_size_per_gpu": 3}
    with pytest.raises(ConfigError, match="disagrees"):
        fill_ds_config(conflicting, TrainConfig(), 1, 10, 8)
    with pytest.raises(ConfigError, match="not supported"):
        fill_ds_config({"optimizer": {"params": {"momentum": "auto"}}}, TrainConfig(), 1, 10, 8)


def test_shipped_deepspeed_configs_by_name_from_any_folder(tmp_path, monkeypatch):
    repo_copy = load_ds_config("ds_configs/zero3.json")  # the README's path (the repo's link to the package data)
    monkeypatch.chdir(tmp_path)  # outside the checkout: names resolve to the package data
    assert load_ds_config("zero3") == load_ds_config("zero3.json") == load_ds_config(None) == repo_copy
    assert load_ds_config("ds_configs/zero2.json")["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match=r"deepspeed: .*zero9.*one of: zero2, zero3, zero3_fast, zero3_nvme, zero3_offload"):
        load_ds_config("zero9")


def test_zero3_fast_is_zero3_with_every_weight_persistent():
    """zero3_fast (issue 37): the shipped zero3.json with only the persistence threshold raised, so a frozen
    backbone that fits is gathered once; the default keeps its memory behaviour (prefetch/reuse 0)."""
    fast, default = load_ds_config("zero3_fast"), load_ds_config("zero3")
    assert fast["zero_optimization"].pop("stage3_param_persistence_threshold") >= 10**9
    assert default["zero_optimization"].pop("stage3_param_persistence_threshold") == "auto"
    assert fast == default and default["zero_optimization"]["stage3_max_reuse_distance"] == 0
    filled = fill_ds_config(load_ds_config("zero3_fast"), TrainConfig(), 1, 10, 8)
    assert filled["zero_optimization"]["stage3_param_persistence_threshold"] >= 10**9
