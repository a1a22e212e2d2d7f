"""Deep prompts (prompt_depth=deep): trainable vectors at the prompt positions of every layer's input.

Layer 0's vectors are the input prompt (SoftPrompt, prepended to the token embeddings as with
prompt_depth=input). For layers 1..L-1 a forward pre-hook on the layer replaces the hidden states at the n
prompt positions by that layer's row of DeepPrompt.weight [L-1, n, d] (deep visual prompt tuning / P-tuning
v2 with hidden states, not key/value prefixes). Hooks only: the layer's own weights are fetched by ZeRO-3's
hooks as in any forward, and the deep weight is read in InfoPromptModel.forward like the input prompt.

With --gradient_checkpointing the hooks run outside the checkpoint (transformers checkpoints the layer's
`forward`, not `__call__`): the replaced states are the checkpointed function's input, so the recomputation
never needs the hook and the gradient reaches the vectors through that input.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from infoprompt_ds.config import ConfigError
from infoprompt_ds.internals import backbone_layers

RANDOM_STD = 0.02  # deep_prompt_init=random: small next to the hidden states (|h| per dim ~ 0.1-1 in these models)


class DeepPrompt(nn.Module):
    """The vectors of layers 1..L-1 at the prompt positions. Starts at zero; build_model / init_propagated
    set the real start values."""

    def __init__(self, n_layers: int, n_virtual_tokens: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_layers - 1, n_virtual_tokens, hidden_size))


def find_layers(backbone: nn.Module, n_layers: Optional[int]) -> list[nn.Module]:
    """The backbone's layers, or [] when they cannot be told apart: none found, or not one module per layer
    of the config (shared layers as in ALBERT run one module several times: a hook could not know the depth)."""
    layers = backbone_layers(backbone)
    return layers if layers and (n_layers is None or len(layers) == n_layers) else []


def refusal(model_config) -> str:
    return (f"{type(model_config).__name__} ({model_config.model_type}): its transformer layers cannot be found "
            f"one module per layer (transformers' GradientCheckpointingLayer), so deep prompts cannot be hooked "
            f"in; use --prompt_depth input or another backbone")


def check_prompt_depth(cfg, model_config, readout_kind: str) -> None:
    """Pre-flight (no weights): builds the model class on the meta device and looks for its layers."""
    if cfg.prompt_depth != "deep":
        return
    from infoprompt_ds.data.readout import auto_class
    from infoprompt_ds.internals import model_class_for

    cls = model_class_for(auto_class(readout_kind), model_config)
    if cls is None:  # not a class transformers maps: from_pretrained reports it
        return
    with torch.device("meta"):
        skeleton = cls._from_config(model_config)
    if not find_layers(skeleton, getattr(model_config, "num_hidden_layers", None)):
        raise ConfigError("prompt_depth", refusal(model_config))


class DeepHooks:
    """The forward pre-hooks of the layers 1..L-1. `values` ([L-1, n, d] or None) is set by
    InfoPromptModel for the prompted pass only; with None (the unprompted pass) every hook is a no-op.
    `record` (a list or None): instead of replacing, append the prompt positions' states (propagate init)."""

    def __init__(self, layers: list[nn.Module], n_virtual_tokens: int):
        self.n = n_virtual_tokens
        self.values: Optional[torch.Tensor] = None
        self.record: Optional[list] = None
        self.handles = [layer.register_forward_pre_hook(self._hook(i - 1), with_kwargs=True)
                        for i, layer in enumerate(layers) if i > 0]

    def _hook(self, index: int):
        def replace(module, args, kwargs):
            if self.values is None and self.record is None:
                return None
            positional = len(args) > 0
            h = args[0] if positional else kwargs["hidden_states"]
            if self.record is not None:
                self.record.append(h[:, :self.n].detach())
                return None
            v = self.values[index].to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
            new = torch.cat([v, h[:, self.n:]], dim=1)
            if positional:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        return replace


def random_values(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)  # +1: not the input prompt's stream (prompt.init_values)
    return torch.randn(*shape, generator=gen) * RANDOM_STD


def init_propagated(model: nn.Module, forward=None) -> None:
    """deep_prompt_init=propagate, on a fresh run after deepspeed.initialize (`forward` = the engine: a
    ZeRO-3 backbone runs only through its hooks; None = the model itself): one no-grad pass of the input
    prompt alone, and each layer's vectors = the states at the prompt positions entering it. For a decoder
    (causal attention) those are the states the input prompt has in front of any input, so step 0 equals
    prompt_depth=input (to rounding). The optimizer's fp32 master copies are written too, or its first
    step would restore the placeholder zeros. Collective under ZeRO-3."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    was = model.training
    model.eval()
    with torch.no_grad():
        states = (forward or model)(input_ids=None, attention_mask=None, deep_record=True)["deep"]
    model.train(was)
    p = model.deep_prompt.weight
    safe_set_full_fp32_param(p, states.float())  # a no-op without ZeRO's master copies
    with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
        p.data.copy_(states.to(p.dtype))
