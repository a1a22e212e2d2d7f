"""Every private/internal DeepSpeed, transformers and MLflow part that infoprompt_ds/internals.py (and the
save-kill fault injection) relies on still exists in the installed versions. When one of these fails after
an upgrade, fix infoprompt_ds/internals.py, then update its CHECKED_AGAINST."""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import version

import pytest

from infoprompt_ds import internals


def test_versions_checked_are_recorded():
    for pkg, checked in internals.CHECKED_AGAINST.items():
        # Not an error: a newer version that passes the tests below is fine; the record says what was read.
        assert checked and version(pkg), pkg


def test_zero3_trace_invalidation_is_where_we_call_it():
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert callable(DeepSpeedZeRoOffload.get_param_coordinator)
    assert callable(PartitionedParameterCoordinator._invalidate_trace)
    assert callable(PartitionedParameterCoordinator.is_invalid_trace)
    # the optimizer holds its offload object as `parameter_offload` (set in __init__, so read the source)
    assert "self.parameter_offload" in inspect.getsource(DeepSpeedZeroOptimizer_Stage3)


def test_zero3_parameter_attributes_are_set_by_partitioning():
    from deepspeed.runtime.zero import partition_parameters

    src = inspect.getsource(partition_parameters)
    for attr in ("ds_numel", "ds_tensor", "ds_persist"):
        assert f"param.{attr} =" in src or f".{attr} = " in src, attr


def test_deepspeed_config_names_and_schema():
    assert "adamw" in [n.lower() for n in internals.deepspeed_optimizer_names()]
    assert "WarmupDecayLR" in internals.deepspeed_lr_schedules()
    cfg = internals.deepspeed_config_class()({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                                              "train_batch_size": 2})
    assert cfg.train_micro_batch_size_per_gpu == 2


def test_pickled_deepspeed_classes_resolve():
    found = internals.deepspeed_safe_globals()  # silently skips a missing one: this test does not
    assert [f"{c.__module__}.{c.__qualname__}" for c in found] == list(internals.DEEPSPEED_SAFE_GLOBALS)


def test_fault_injection_target_exists():
    """tests/reliability/save_kill_driver.py patches DeepSpeed's checkpoint writer."""
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce

    assert callable(tce.TorchCheckpointEngine.save)


def test_transformers_internals():
    assert "bert" in internals.masked_lm_model_types()
    assert internals.zero3_load_context(None) is None
    assert internals.zero3_load_context({"zero_optimization": {"stage": 2}}) is None
    ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    hf_ds = internals.zero3_load_context(ds)
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert is_deepspeed_zero3_enabled()  # transformers found it through its weak reference

    class Holder:
        pass

    holder = Holder()
    internals.keep_alive(holder, hf_ds)
    assert holder._hf_ds_config is hf_ds
    del hf_ds, holder  # the weak reference dies with the holder: later tests load without zero.Init
    import gc

    gc.collect()
    assert not is_deepspeed_zero3_enabled()


def test_mlflow_tracking_uri_global():
    mlflow = pytest.importorskip("mlflow")
    utils = importlib.import_module("mlflow.tracking._tracking_service.utils")
    assert hasattr(utils, "_tracking_uri")
    before = utils._tracking_uri
    try:
        mlflow.set_tracking_uri("file:///tmp/internals-test-store")
        assert utils._tracking_uri is not None
        internals.reset_mlflow_tracking_uri()
        assert utils._tracking_uri is None
    finally:
        utils._tracking_uri = before


def test_mlflow_system_metrics_monitor_parts_tracking_samples_with(tmp_path):
    """tracking._SystemSampler drives MLflow's (internal) SystemMetricsMonitor by hand, so that system/*
    metrics are buffered like every other metric while the server is away."""
    pytest.importorskip("psutil")
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id="unused", tracking_uri=f"sqlite:///{tmp_path / 'unused.db'}")
    assert float(monitor.sampling_interval) > 0 and int(monitor.samples_before_logging) >= 1
    monitor.collect_metrics()
    assert isinstance(monitor.aggregate_metrics(), dict)
    for m in monitor.monitors:
        m.clear_metrics()


def test_transformers_checkpointing_internals(tiny_llama):
    """--gradient_checkpointing: the auto-mapping lookup pre-flight uses, the per-layer checkpointing base, and
    the `_gradient_checkpointing_func` attribute internals.checkpoint_layers_in_eval_mode wraps."""
    from transformers import AutoConfig, AutoModel, LlamaModel, MPNetConfig

    assert internals.model_class_for(AutoModel, AutoConfig.from_pretrained(tiny_llama)) is LlamaModel
    assert internals.model_class_for(AutoModel, MPNetConfig()).supports_gradient_checkpointing is False
    base = internals.checkpointing_layer_class()
    assert base is not None and "_gradient_checkpointing_func" in inspect.getsource(base)
    model = LlamaModel.from_pretrained(tiny_llama)
    layers = internals.checkpoint_layers_in_eval_mode(model, {"use_reentrant": False})
    assert layers == list(model.layers) and all(layer.gradient_checkpointing for layer in layers)


def test_mlflow_model_log_skips_the_serving_check_when_asked():
    """log_pyfunc_model_unserved relies on Model.log handing its extra kwargs to the flavor's save_model and
    reading `validate_serving_input` from them (as MLflow's transformers flavor uses it)."""
    pytest.importorskip("mlflow")
    from mlflow.models import Model

    source = inspect.getsource(Model.log)
    assert 'kwargs.get("validate_serving_input", True)' in source
    assert "flavor.save_model(path=local_path, mlflow_model=mlflow_model, **kwargs)" in source
    assert 'kwargs.pop("flavor_name"' in source
