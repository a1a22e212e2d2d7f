"""Frozen backbone + soft prompt + task head (+ VIB classifier, MI estimator networks); pooling; ZeRO-3
loading. The method as built is described in docs/method.md; its loss is assembled in method/loss.py.

Only `prompt`, `head`, `vib` and `estimator` train. The backbone is loaded with from_pretrained, partitioned
at load time when the DeepSpeed config is ZeRO-3 (HfDeepSpeedConfig must exist before from_pretrained).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from infoprompt_ds.method import loss as method
from infoprompt_ds.method import mi
from infoprompt_ds.data import readout as readouts
from infoprompt_ds.config import ConfigError, TrainConfig, one_line
from infoprompt_ds.backbone import resolve_model_path
from infoprompt_ds.internals import (checkpoint_layers_in_eval_mode, keep_alive, masked_lm_model_types,
                                    zero3_load_context)
from infoprompt_ds.method.prompt import PromptGenerator, SoftPrompt, head_init, init_values
from infoprompt_ds.method.deep import DeepHooks, DeepPrompt, find_layers, random_values, refusal
from infoprompt_ds.data.tasks import Task


def is_encoder(model_config) -> bool:
    """Encoders (BERT, RoBERTa, DeBERTa...) are the models with a masked-LM head; the rest are decoders."""
    return model_config.model_type in masked_lm_model_types() and not getattr(model_config, "is_decoder", False)


def resolve_pooling(pooling: str, model_config, model_path: str = "", cfg: Optional[TrainConfig] = None,
                    task_type: str = "classification") -> str:
    """auto: the pooling a sentence-transformers model was trained with (its 1_Pooling/config.json, e.g.
    mean for all-MiniLM-L6-v2: its [CLS] state was never trained to summarise), else cls for encoders
    and last for decoders (the only position that has seen the whole input). Relations pool the entity
    markers (relation_pooling=markers); NER pools the sentence by its mean."""
    if cfg is not None and task_type == "relation" and cfg.relation_pooling == "markers":
        return "markers"
    if task_type == "ner" and pooling == "auto":
        return "mean"
    if pooling != "auto":
        return pooling
    st_pooling = Path(model_path) / "1_Pooling" / "config.json"
    if st_pooling.is_file():
        modes = json.loads(st_pooling.read_text())
        if modes.get("pooling_mode_mean_tokens"):
            return "mean"
        if modes.get("pooling_mode_cls_token"):
            return "cls"
        if modes.get("pooling_mode_lasttoken"):
            return "last"
    return "cls" if is_encoder(model_config) else "last"


def load_model_config(cfg: TrainConfig):
    """AutoConfig only (no weights): validates the path and the prompt length in a second."""
    path = resolve_model_path(cfg.model_name_or_path)
    try:
        model_config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ConfigError("model_name_or_path", f"cannot load {cfg.model_name_or_path!r}: {one_line(e)}")
    max_pos = getattr(model_config, "max_position_embeddings", None)
    n_prompt = 0 if cfg.method == "probe" else cfg.n_virtual_tokens
    if max_pos is not None and n_prompt + cfg.max_length > max_pos:
        raise ConfigError("n_virtual_tokens", f"n_virtual_tokens + max_length = {cfg.n_virtual_tokens} + "
                          f"{cfg.max_length} exceeds the model's {max_pos} positions; lower one of them")
    return model_config


def load_tokenizer(cfg: TrainConfig):
    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model_name_or_path))
    if tok.pad_token is None:  # decoder LLMs often ship without one; pads are masked out anyway
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # pooling indexes the last real token as n + length - 1
    return tok


class InfoPromptModel(nn.Module):
    def __init__(self, backbone: nn.Module, n_labels: int, pooling: str, cfg: TrainConfig, token_level: bool = False,
                 readout: readouts.Readout = readouts.LINEAR):
        super().__init__()
        # The read-out (readout.py): with cloze/lm_label the backbone is the *ForMaskedLM/*ForCausalLM model
        # (its head stays frozen inside it); z is read at the mask / last token, logits = H z + b.
        self.readout = readout
        self.mlm_head = readouts.mlm_head_name(backbone) if readout.kind == "cloze" else None
        hidden = backbone.config.hidden_size
        self.backbone = backbone.requires_grad_(False)
        # A linear probe (method=probe) is the same model with no prompt: the baseline the paper omits.
        self.prompt = SoftPrompt(cfg.n_virtual_tokens, hidden) if cfg.method != "probe" else None
        self.generator = PromptGenerator(cfg.n_virtual_tokens, hidden) \
            if cfg.prompt_type == "instance" and self.prompt is not None else None
        self.head = nn.Linear(hidden, n_labels)  # the class rows H (+ bias)
        self.token_level = token_level  # NER: the head labels every token
        # The authors' VIB classifier: logits = (W_o u) . H^T + b, u ~ q(u|z). NER keeps plain rows.
        self.vib = mi.Posterior(hidden, cfg.bottleneck_dim) if cfg.vib_head and not self.token_level else None
        self.gamma, self.beta, self.kl_weight = cfg.gamma, cfg.beta, cfg.kl_weight
        self.uses_mi = cfg.uses_mi
        # Vanilla prompt tuning builds no estimator at all: nothing extra to train, store or compute.
        self.estimator = mi.Estimator(hidden, cfg.bottleneck_dim, own_posterior=self.vib is None,
                                      bilinear=cfg.estimator == "normalized") if cfg.uses_mi else None
        self.estimator_trainable = cfg.estimator_trainable
        if self.estimator is not None and not cfg.estimator_trainable:
            # The frozen-critic arm: outside the optimizer (setup passes only requires_grad parameters) and out
            # of checkpoints (frozen weights are excluded); a resume rebuilds the same init from the seed.
            self.estimator.requires_grad_(False)
        # The initial prompt P0, kept for the saturation diagnostic (method.Diagnostics.add_p0); set by
        # build_model once the prompt is initialised. Not persistent: a resume rebuilds the same init.
        self.register_buffer("prompt_p0", torch.zeros(cfg.n_virtual_tokens, hidden) if self.uses_mi and
                             self.prompt is not None else None, persistent=False)
        self.estimator_kind, self.tau = cfg.estimator, cfg.tau
        self.mi_clamp = cfg.mi_clamp or None
        self.pooling = pooling
        self.n_virtual_tokens = cfg.n_virtual_tokens if self.prompt is not None else 0
        # normalized: z enters the posterior standardised by the unprompted states' statistics (set from the
        # cache with set_z_stats; exported in the meta, so predict standardises the same way).
        self.standardises = cfg.estimator == "normalized" and (self.vib is not None or self.estimator is not None
                                                               or self.generator is not None)
        self.register_buffer("z_mean", torch.zeros(hidden), persistent=False)
        self.register_buffer("z_std", torch.ones(hidden), persistent=False)
        self.register_buffer("vocab_mean", torch.zeros(hidden), persistent=False)  # set by build_model
        self.checkpointed = enable_checkpointing(backbone) if cfg.gradient_checkpointing else []
        # prompt_depth=deep (method/deep.py): vectors for layers 1..L-1; layer 0's are self.prompt.
        self.deep_prompt, self.deep_hooks = None, None
        if cfg.prompt_depth == "deep" and self.prompt is not None:
            layers = find_layers(backbone, getattr(backbone.config, "num_hidden_layers", None))
            if not layers:  # pre-flight refuses such a class before loading; this is the backstop
                raise ConfigError("prompt_depth", refusal(backbone.config))
            self.deep_prompt = DeepPrompt(len(layers), cfg.n_virtual_tokens, hidden)
            self.deep_hooks = DeepHooks(layers, cfg.n_virtual_tokens)

    @property
    def needs_noise(self) -> bool:
        """Training steps need eps_pos/eps_neg: a VIB classifier samples u; L_repr samples negatives."""
        return self.vib is not None or self.estimator is not None

    @property
    def needs_unprompted(self) -> bool:
        """z(x, no prompt) is needed: by the estimators and the VIB's KL, or for the z statistics."""
        return self.estimator is not None or (self.vib is not None and self.kl_weight > 0) or self.standardises \
            or self.generator is not None

    def set_z_stats(self, z_plain: torch.Tensor) -> None:
        """Per-dimension mean and scale of the cached unprompted states: scale_d = sqrt(var_d + E[z^2]).
        The variance alone is not enough: on an anisotropic backbone (a [CLS]-pooled or random encoder) a
        dimension can barely vary across inputs while a prompt moves it by the states' whole magnitude;
        divided by that spread, z reached |z| ~ 1000 on the tiny test BERT and put the posterior's
        log-sigma at its clamp (KL ~ 1e8). Adding the mean square keeps the prompted z at O(1)."""
        z = z_plain.double()  # float64: a large common offset cancels without losing the spread
        var = z.var(0) if len(z) > 1 else torch.zeros_like(z[0])
        with torch.no_grad():
            self.z_mean.copy_(z.mean(0).to(self.z_mean.dtype))
            self.z_std.copy_((var + z.pow(2).mean()).sqrt().clamp(min=1e-12).to(self.z_std.dtype))

    def z_stats_meta(self) -> Optional[dict]:
        return {"mean": self.z_mean.float().tolist(), "std": self.z_std.float().tolist()} if self.standardises else None

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        if not self.standardises:
            return z
        return ((z.double() - self.z_mean.double()) / self.z_std.double()).to(z.dtype)

    def train(self, mode: bool = True):
        # The frozen backbone always runs in eval mode (no dropout): it is deterministic, so the cached
        # unprompted representation is exactly what a step would recompute, and resume is exact.
        super().train(mode)
        self.backbone.eval()
        for layer in self.checkpointed:  # the layer's flag only (its children stay in eval): opens the checkpoint
            layer.training = mode        # gate in training; eval passes (no grad anyway) never recompute
        return self

    def _encode(self, embeds, mask, token_type_ids):
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        # base_model: the encoder/decoder stack without an LM head (the model itself for AutoModel).
        return self.backbone.base_model(**kwargs).last_hidden_state

    def _encode_prompted(self, embeds, mask, token_type_ids, deep: Optional[torch.Tensor]):
        """_encode with the deep vectors in place at layers 1..L-1 for this pass only (deep None: input
        prompt only). The hooks read them when each layer starts; cleared after, so the unprompted pass
        (and any other) sees the plain backbone."""
        if deep is None:
            return self._encode(embeds, mask, token_type_ids)
        self.deep_hooks.values = deep
        try:
            return self._encode(embeds, mask, token_type_ids)
        finally:
            self.deep_hooks.values = None

    def propagated_prompt(self) -> torch.Tensor:
        """[L-1, n, d]: the states at the prompt positions entering layers 1..L-1 when the input prompt
        alone goes through the frozen backbone (deep_prompt_init=propagate). No gradient."""
        with torch.no_grad():
            prompt = self.prompt.weight * 1
            mask = torch.ones(1, prompt.shape[0], dtype=torch.long, device=prompt.device)
            self.deep_hooks.record = []
            try:
                self._encode(prompt.unsqueeze(0), mask, None)
                return torch.stack([s[0] for s in self.deep_hooks.record])
            finally:
                self.deep_hooks.record = None

    def _pool(self, hidden, mask, offset: int, entity_pos=None, mask_pos=None):
        """Representation z: hidden state at the first real token (cls), last real token (last), the mean
        over real tokens (mean), or the mean of the two entity start markers (markers, relations).
        `offset` = number of prompt positions in front of the input."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.pooling == "mask":  # cloze: the MLM transform of the mask token's state
            return readouts.mlm_transform(self.backbone, self.mlm_head, hidden[rows, offset + mask_pos])
        if self.pooling == "markers":
            return (hidden[rows, offset + entity_pos[:, 0]] + hidden[rows, offset + entity_pos[:, 1]]) / 2
        if self.pooling == "cls":
            return hidden[:, offset]
        if self.pooling == "last":
            return hidden[rows, offset + mask.sum(1) - 1]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden[:, offset:] * m).sum(1) / m.sum(1).clamp(min=1)

    def unprompted(self, input_ids, attention_mask, token_type_ids=None, entity_pos=None, mask_pos=None) -> torch.Tensor:
        """z(x, no prompt): needs no gradient, since nothing trainable feeds it. (The template is in the ids.)"""
        with torch.no_grad():
            embeds = self.backbone.get_input_embeddings()(input_ids)
            return self._pool(self._encode(embeds, attention_mask, token_type_ids), attention_mask, 0, entity_pos,
                              mask_pos)

    def classify(self, z: torch.Tensor, eps: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits from the representation. VIB: u = mu + sigma * eps in training (the loop passes eps),
        u = mu at evaluation (eps None); logits = (W_o u) . H^T + b."""
        if self.vib is None:
            return self.head(z)
        mu, log_sigma = self.vib(self.standardise(z))
        return self.head(self.vib.decode(mi.sample(mu, log_sigma, eps)))

    def forward(self, input_ids, attention_mask, labels=None, token_type_ids=None, entity_pos=None, mask_pos=None,
                z_unprompted=None, eps_pos=None, eps_neg=None, mi_scale: float = 1.0, unprompted_only: bool = False,
                deep_record: bool = False, at_p0: bool = False) -> dict[str, Any]:
        """at_p0: the initial prompt P0 instead of the current one (the saturation diagnostic; with an instance
        prompt P0(x) = P0, the generator's last layer starting at zero). With prompt_depth=deep only the
        input-layer prompt is set back to P0 (the deeper layers keep their current vectors): the MI terms are
        defined on the input-layer prompt."""
        if unprompted_only:  # routed through forward so that DeepSpeed's engine hooks see the pass
            return {"z": self.unprompted(input_ids, attention_mask, token_type_ids, entity_pos, mask_pos)}
        if deep_record:  # deep_prompt_init=propagate (deep.init_propagated), through the engine likewise
            return {"deep": self.propagated_prompt()}
        embeds = self.backbone.get_input_embeddings()(input_ids)
        b, n = input_ids.shape[0], self.n_virtual_tokens
        prompt = embeds.new_zeros(0, embeds.shape[-1])
        if at_p0:
            prompt = self.prompt_p0.to(embeds.dtype)
        elif self.prompt is not None:
            # "* 1" (exact) makes the prompt this forward uses a non-leaf tensor: the diagnostics take
            # gradients with respect to it, which must stop here and never run the parameter's own
            # gradient hooks (ZeRO's reduce hooks would swallow them and add them to the step's gradient).
            prompt = self.prompt.weight.to(embeds.dtype) * 1
        if self.generator is not None and not at_p0:  # instance prompt: (B, n, d), from the (cached) unprompted state
            if z_unprompted is None:
                z_unprompted = self.unprompted(input_ids, attention_mask, token_type_ids, entity_pos, mask_pos)
            z_in = self.standardise(z_unprompted.to(embeds.dtype))
            # z_in already has the generator's dtype (the engine's): reading generator.net[0].weight here would
            # gather it outside its module's forward, into other memory on an engine's first step than on every
            # later one, and a resumed step would round differently (see mi.head_loss).
            prompt = prompt.unsqueeze(0) + self.generator(z_in).to(embeds.dtype)
        full_embeds = torch.cat([prompt if prompt.dim() == 3 else prompt.unsqueeze(0).expand(b, -1, -1), embeds], dim=1)
        full_mask = torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)
        full_tt = None
        if token_type_ids is not None:
            full_tt = torch.cat([token_type_ids.new_zeros(b, n), token_type_ids], dim=1)
        # "* 1" as for the prompt: read here (ZeRO-3 fetches it for this forward), a non-leaf for the hooks.
        deep = self.deep_prompt.weight.to(embeds.dtype) * 1 if self.deep_prompt is not None else None
        hidden = self._encode_prompted(full_embeds, full_mask, full_tt, deep)
        z = self._pool(hidden, attention_mask, n, entity_pos, mask_pos)
        # NER: the head scores every input token; the MI terms use the sentence's pooled representation.
        logits = self.head(hidden[:, n:]) if self.token_level else self.classify(z, eps_pos)
        out: dict[str, Any] = {"logits": logits, "z": z}
        if labels is None:
            return out
        if z_unprompted is None and self.uses_mi and (self.beta > 0 or self.kl_weight > 0):
            z_unprompted = self.unprompted(input_ids, attention_mask, token_type_ids, entity_pos, mask_pos)
        m = method.assemble(self, logits, labels, z=z, z_plain=z_unprompted, prompt=prompt, embeds=embeds,
                            attention_mask=attention_mask, eps_pos=eps_pos, eps_neg=eps_neg, mi_scale=mi_scale)
        # Detached: DeepSpeed hooks every output tensor to start its backward bookkeeping, so a diagnostic gradient
        # through one (ZeRO-1/2) ran the engine's backward epilogue early (reduce_ipg_grads IndexError). The
        # graph tensors travel in `method` (MethodLoss.prompt, .z, .ce, .terms); only the loss is
        # left to start the engine's backward.
        # (Vanilla's loss is its CE: that one tensor stays as it was.)
        ce = m.ce.detach() if m.loss is not m.ce else m.ce
        out.update(logits=logits.detach(), loss=m.loss, ce=ce, method=m, prompt=prompt.detach(), z=z.detach(),
                   **{k: v.detach() for k, v in m.terms.items()})
        return out


def enable_checkpointing(backbone: nn.Module) -> list[nn.Module]:
    """--gradient_checkpointing: every layer of the frozen backbone keeps only its input in the forward and
    is recomputed in the backward (under ZeRO-3 the recomputation gathers the layer's weights again).
    Non-reentrant (use_reentrant=False), as torch recommends. The known trap of the reentrant form: it passes
    gradient to a checkpointed block only through positional tensor inputs that require grad, so with a frozen
    backbone it is silently zero wherever the trainable part does not enter that way (adapters inside frozen
    layers, a frozen embedding output). Here the prompt does enter every layer through hidden_states, and the
    reentrant form gave the same gradient (measured: bitwise, plain torch and 2-rank ZeRO-3); non-reentrant
    stays correct without that condition (kwargs, future trainable parts inside the layers).
    tests/unit/test_checkpointing.py checks the prompt's gradient. The layers run in eval mode in both passes
    (internals.checkpoint_layers_in_eval_mode); returns them, for train() to open the gate."""
    layers = checkpoint_layers_in_eval_mode(backbone, {"use_reentrant": False})
    if not layers:  # pre-flight refuses such a class before loading; this is the backstop
        raise ConfigError("gradient_checkpointing", f"{type(backbone).__name__} has no per-layer activation "
                          f"checkpointing in this transformers version; drop --gradient_checkpointing")
    return layers


def _gathered(params):
    """Full values of ZeRO-3-partitioned params (read-only); a no-op for ordinary tensors."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def backbone_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the frozen backbone is held and multiplied in (the trainables keep fp32 masters)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]


def pick_attention_kernel(dtype: torch.dtype, device: torch.device) -> None:
    """bf16 on a CPU: attention by torch's math path instead of its CPU flash-attention kernel. Why: that
    kernel's bf16 backward is the slowest op of a bf16 step (MiniLM, batch 16, 1 thread: 238 ms of a 647 ms
    step, against 44 ms in fp32; benchmarks/results/profile_step_prompt_bf16_flash.json), and prompt tuning
    always runs it (the prompt's gradient goes back through every layer's attention); with the math path the
    bf16 step took 0.86x the time (docs/benchmarks.md §11). The switch is process-wide (torch's only one;
    named for CUDA, the CPU dispatcher reads it too), so it also covers the recomputation under gradient
    checkpointing, evaluation and the unprompted cache. fp32 keeps the flash kernel: faster there."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        torch.backends.cuda.enable_flash_sdp(False)


def load_backbone(name: str, model_config, readout: readouts.Readout, dtype: Optional[torch.dtype] = None):
    """from_pretrained with the class the read-out needs (AutoModel / ...ForMaskedLM / ...ForCausalLM). Under
    ZeRO-3 the caller holds zero3_load_context, so every class is partitioned at load time alike."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        return readouts.auto_class(readout.kind).from_pretrained(resolve_model_path(name), config=model_config,
                                                                 **kwargs)
    except Exception as e:
        raise ConfigError("model_name_or_path", f"cannot load weights of {name!r}: {one_line(e)}")


def build_model(cfg: TrainConfig, model_config, tokenizer, task: Task, dtype: torch.dtype,
                ds_config: Optional[dict] = None, readout: readouts.Readout = readouts.LINEAR) -> InfoPromptModel:
    """from_pretrained (ZeRO-3-partitioned when ds_config says stage 3), then new trainable parts in the
    engine's dtype, initialised from the gathered embedding matrix (and, for cloze/lm_label, the class rows
    from the gathered LM-head/MLM-decoder rows of the label words)."""
    hf_ds = zero3_load_context(ds_config)  # must be alive during from_pretrained: enables zero.Init
    backbone = load_backbone(cfg.model_name_or_path, model_config, readout, dtype)
    pooling = readout.pooling or resolve_pooling(cfg.pooling, model_config, resolve_model_path(cfg.model_name_or_path),
                                                 cfg, task.type)
    model = InfoPromptModel(backbone, len(task.labels), pooling, cfg, token_level=task.type == "ner", readout=readout)
    words = task.words()
    emb = backbone.get_input_embeddings().weight
    with _gathered([emb]), torch.no_grad():
        if model.prompt is not None:
            model.prompt.weight.copy_(init_values(cfg.prompt_init, cfg.n_virtual_tokens, emb, tokenizer, cfg.seed,
                                                  cfg.prompt_init_text, words))
        if model.deep_prompt is not None and cfg.deep_prompt_init == "random":  # propagate: deep.init_propagated
            model.deep_prompt.weight.copy_(random_values(model.deep_prompt.weight.shape, cfg.seed))
        if words and not readout.templated:
            model.head.weight.copy_(head_init(emb, tokenizer, words))
            model.head.bias.zero_()
        if model.estimator_kind == "normalized":
            model.vocab_mean.copy_(emb.float().mean(0))
    if readout.templated:  # only the C label rows are copied out of the (gathered) head
        params, read = readouts.class_rows(backbone, readout.kind, [readouts.first_token(tokenizer, w) for w in words])
        with _gathered(params), torch.no_grad():
            rows, bias = read()
            model.head.weight.copy_(rows)
            model.head.bias.copy_(bias)
    keep_alive(model, hf_ds)  # as long as the model lives (transformers holds a weakref)
    # The new parts were made outside zero.Init: give them the engine's dtype, or bf16 runs fail.
    for part in (model.prompt, model.deep_prompt, model.generator, model.head, model.vib, model.estimator):
        if part is not None:
            part.to(dtype)
    if model.prompt_p0 is not None:
        model.prompt_p0 = model.prompt.weight.detach().clone()  # P0 exactly as the first step reads it
    return model


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "entity_pos", "mask_pos")


def model_inputs(batch: dict) -> dict:
    """The keys of a tokenized batch that InfoPromptModel.forward takes (labels and idx stay behind)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
