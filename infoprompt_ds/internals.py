"""Every use of a private or internal part of DeepSpeed, transformers or MLflow, in one place.

Checked against deepspeed 0.19.8, transformers 5.24.0, mlflow 3.17.2 (torch 2.13.0). When one of them
moves, tests/unit/test_internals.py fails and names it; fix it here, nowhere else. Imports are lazy:
config validation and checkpoint audits must not pay for a DeepSpeed import they do not need.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

CHECKED_AGAINST = {"deepspeed": "0.19.8", "transformers": "5.24.0", "mlflow": "3.17.2"}


# --- DeepSpeed: ZeRO-3 parameter attributes -------------------------------------------------------------
# ZeRO-3 replaces a parameter's data by an empty tensor and hangs the partition on it: `ds_numel` (full
# element count), `ds_tensor` (this rank's shard), `ds_persist` (small params kept whole on every rank,
# below stage3_param_persistence_threshold). Set in deepspeed/runtime/zero/partition_parameters.py.

def full_numel(p) -> int:
    """Element count of a parameter, partitioned (ZeRO-3) or not."""
    return getattr(p, "ds_numel", p.numel())


def local_numel(p) -> int:
    """Elements of `p` this rank holds: its shard under ZeRO-3 (or all of it when persisted whole)."""
    if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False):
        return p.ds_tensor.numel()
    return full_numel(p)


# --- DeepSpeed: the ZeRO-3 prefetch trace ---------------------------------------------------------------

def invalidate_zero3_trace(engine) -> None:
    """ZeRO-3 records the order in which a forward fetches parameters and replays it as a prefetch
    schedule. DeepSpeed has no public call to start a new recording; the parameter coordinator's own
    invalidation (engine.optimizer.parameter_offload.get_param_coordinator()._invalidate_trace) is what
    it uses inside. A no-op below ZeRO-3 (no parameter_offload)."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    coordinator = offload.get_param_coordinator() if offload is not None else None
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()


# --- DeepSpeed: config schema and names -----------------------------------------------------------------

def deepspeed_config_class():
    """DeepSpeed's own config parser (pydantic schema + batch arithmetic); not exported at the top."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig


def deepspeed_optimizer_names() -> list[str]:
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    return list(DEEPSPEED_OPTIMIZERS)


def deepspeed_lr_schedules() -> list[str]:
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    return list(VALID_LR_SCHEDULES)


# --- DeepSpeed: classes pickled into checkpoints --------------------------------------------------------
# Classes DeepSpeed pickles into its optimizer states: plain data (an int enum, loss-scaler attributes),
# allowed by name for torch.load(weights_only=True). Anything else in a checkpoint is refused.
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")


def deepspeed_safe_globals() -> list:
    out = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return out


# --- transformers ---------------------------------------------------------------------------------------

def zero3_load_context(ds_config: Optional[dict]) -> Any:
    """An HfDeepSpeedConfig when ds_config is ZeRO-3, else None. It must exist before from_pretrained
    (it enables zero.Init) and stay alive while the model does: transformers holds only a weak reference
    to it, so keep_alive(model, it) ties it to the model."""
    if ds_config is None or ds_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def keep_alive(model, hf_ds_config) -> None:
    if hf_ds_config is not None:
        model._hf_ds_config = hf_ds_config


def masked_lm_model_types():
    """Model types transformers has a masked-LM head for (internal auto-mapping table): our test for
    "an encoder" (bidirectional attention, [CLS]/mask pooling)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return MODEL_FOR_MASKED_LM_MAPPING_NAMES


def model_class_for(auto_class, model_config):
    """The class `auto_class.from_pretrained` would build for this config (its internal auto-mapping), or
    None when the mapping has none: read without loading a weight (pre-flight)."""
    try:
        return auto_class._model_mapping[type(model_config)]
    except (KeyError, AttributeError):
        return None


def checkpointing_layer_class():
    """transformers' per-layer checkpointing base (modeling_layers.GradientCheckpointingLayer, >= 4.52):
    its `forward` runs `self._gradient_checkpointing_func(partial(forward, self, **kwargs), *args)` when the
    layer's own `gradient_checkpointing` and `training` are set and grad is enabled. None before 4.52."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return None
    return GradientCheckpointingLayer


def backbone_layers(backbone) -> list:
    """The backbone's transformer layers in call order: the modules that subclass transformers'
    GradientCheckpointingLayer (BertLayer, LlamaDecoderLayer...). Empty before transformers 4.52 or for a
    class without per-layer checkpointing. Used by --gradient_checkpointing and prompt_depth=deep."""
    base = checkpointing_layer_class()
    return [m for m in backbone.modules() if base is not None and isinstance(m, base)]


def checkpoint_layers_in_eval_mode(backbone, checkpoint_kwargs: dict) -> list:
    """Activation checkpointing of every layer of a backbone that runs in eval mode. transformers
    checkpoints a layer only while that layer's `training` flag is set, but a frozen backbone stays in eval
    mode (no dropout, deterministic). So: enable it (activation_checkpointing_enable, called
    gradient_checkpointing_enable before transformers 5.25), then give each checkpointed layer a
    `_gradient_checkpointing_func` that runs the layer's forward - the first pass and the recomputation -
    with `training` False. The caller sets the layers' `training` (the gate only) while training; returns
    those layers (empty: the class has no per-layer checkpointing)."""
    enable = getattr(backbone, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    layers = [m for m in backbone_layers(backbone) if getattr(m, "gradient_checkpointing", False)]
    for layer in layers:
        layer._gradient_checkpointing_func = _in_eval_mode(layer, layer._gradient_checkpointing_func)
    return layers


def _in_eval_mode(layer, checkpoint_fn):
    def run(function, *args, **kwargs):
        def forward_in_eval_mode(*inner):
            was = layer.training
            layer.training = False
            try:
                return function(*inner)
            finally:
                layer.training = was
        return checkpoint_fn(forward_in_eval_mode, *args, **kwargs)
    return run


# --- MLflow ---------------------------------------------------------------------------------------------
# Also internal, and left in place in tracking.py (its _SystemSampler): SystemMetricsMonitor's
# sampling_interval, samples_before_logging, collect_metrics, aggregate_metrics, monitors[].clear_metrics.
# tests/unit/test_internals.py checks those too.

def reset_mlflow_tracking_uri() -> None:
    """Forget an in-process mlflow.set_tracking_uri() (tests): MLflow keeps it in a module global."""
    from mlflow.tracking._tracking_service import utils

    utils._tracking_uri = None


def log_pyfunc_model_unserved(**log_model_kwargs):
    """mlflow.pyfunc.log_model(**kwargs), minus the serving check MLflow runs on an input example: that
    check loads the logged model - the whole backbone - a second time, inside the training process (where a
    ZeRO-3 config is still live and partitions it). `validate_serving_input` is the undocumented switch of
    Model.log that MLflow's own transformers flavor passes; Model.log hands its extra kwargs to the flavor's
    save_model, so a flavor that drops it is mlflow.pyfunc as it is."""
    import mlflow.pyfunc
    from mlflow.models import Model

    class PyfuncFlavor:
        __name__ = "mlflow.pyfunc"

        @staticmethod
        def save_model(validate_serving_input=True, **kwargs):
            return mlflow.pyfunc.save_model(**kwargs)

    return Model.log(artifact_path=None, flavor=PyfuncFlavor, flavor_name="pyfunc", validate_serving_input=False,
                     **log_model_kwargs)
