"""InfoPrompt's loss, assembled in one place, and the method's own diagnostics (docs/method.md).

loss = CE + mi_scale * (gamma * L_head + beta * L_repr + kl_weight * KL)

Vanilla prompt tuning is the same function with gamma = beta = kl_weight = 0: it returns CE alone and
computes nothing else. The training loop calls `Diagnostics` to log, per window, each term, its chance
value, the share of examples that pass gradient, and each weighted term's gradient on the prompt relative
to CE's; and to warn once when a term is dead (passes no gradient) or dominates (ratio > 10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from infoprompt_ds.method import mi

TERMS = ("head", "repr", "kl")
DOMINANT_RATIO = 10.0
# Everything Diagnostics.flush can log (docs/tracking.md lists each; its doc test reads this).
METRIC_NAMES = tuple(f"train/{t}_{k}" for t in ("head", "repr") for k in ("chance", "passing", "at_p0")) + \
    tuple(f"train/{t}_grad_{k}" for t in TERMS for k in ("ratio", "cos"))
SATURATION = ("head", "repr")  # the two bounds whose value at the initial prompt is logged


@dataclass
class MethodLoss:
    loss: torch.Tensor
    ce: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)    # unweighted L_head, L_repr, KL (means)
    weighted: dict[str, torch.Tensor] = field(default_factory=dict)  # what each adds to `loss`
    passing: dict[str, torch.Tensor] = field(default_factory=dict)  # share of examples passing gradient
    chance: dict[str, torch.Tensor] = field(default_factory=dict)   # log(1 + M): the InfoNCE loss at chance
    # The prompt tensor the forward used, for the gradient diagnostics. Carried here, not in the output
    # dict: DeepSpeed's ZeRO-3 hooks replace the output dict's tensors with copies outside the graph.
    prompt: Optional[torch.Tensor] = None
    z: Optional[torch.Tensor] = None


def assemble(model, logits: torch.Tensor, labels: torch.Tensor, *, z: torch.Tensor, z_plain: Optional[torch.Tensor],
             prompt: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor,
             eps_pos: Optional[torch.Tensor], eps_neg: Optional[torch.Tensor], mi_scale: float = 1.0) -> MethodLoss:
    """The training loss of `model` (an InfoPromptModel) for one batch. z_plain = z(x, no prompt)."""
    weight = getattr(model, "class_weight", None)  # --class_weights auto: inverse training frequency
    ce = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100,
                         weight=weight.to(logits.device) if weight is not None else None)
    out = MethodLoss(loss=ce, ce=ce, prompt=prompt, z=z)
    if not model.uses_mi:
        return out  # vanilla: nothing else is computed, so the step is exactly prompt tuning's
    est, clamp, tau = model.estimator_kind, model.mi_clamp, model.tau
    if model.gamma > 0:
        # The frozen-critic arm (estimator_trainable=false): L_head's gradient reaches the prompt only, not the
        # class rows (they still train by CE), so that only the prompt can raise the bound.
        head_rows = model.head.weight if model.estimator_trainable else model.head.weight.detach()
        loss_i, pass_i = mi.head_loss(prompt, head_rows, embeds, attention_mask, est, clamp, tau,
                                      model.vocab_mean, model.estimator.critic)
        out.terms["head"], out.passing["head"] = loss_i.mean(), pass_i.float().mean()
        out.chance["head"] = torch.log1p(attention_mask.sum(1).float()).mean()
        out.weighted["head"] = mi_scale * model.gamma * out.terms["head"]
    if model.beta > 0 or model.kl_weight > 0:
        posterior = model.vib if model.vib is not None else model.estimator.posterior
        zp, zn = model.standardise(z), model.standardise(z_plain.to(z.dtype))
        if model.beta > 0:
            loss_i, pass_i, _, _ = mi.repr_loss(posterior, model.estimator.context, prompt, zp, zn, eps_pos, eps_neg,
                                                est, clamp, tau)
            out.terms["repr"], out.passing["repr"] = loss_i.mean(), pass_i.float().mean()
            out.chance["repr"] = torch.tensor(math.log1p(eps_neg.shape[1]), device=ce.device)
            out.weighted["repr"] = mi_scale * model.beta * out.terms["repr"]
        if model.kl_weight > 0:
            # The rate term of the classifier when it is a VIB; otherwise it regularises the estimator's own
            # posterior only (z detached): it must not drag the prompt through a path that feeds nothing.
            mu_p, ls_p = posterior(zp if model.vib is not None else zp.detach())
            mu_n, ls_n = posterior(zn)
            out.terms["kl"] = (mi.kl_to_standard_normal(mu_p, ls_p).mean()
                               + mi.kl_to_standard_normal(mu_n, ls_n).mean())
            out.weighted["kl"] = mi_scale * model.kl_weight * out.terms["kl"]
    out.loss = ce + sum(out.weighted.values())
    return out


def inverse_frequency(labels: list, n_classes: int) -> Optional[torch.Tensor]:
    """Class weights n / (C * n_c) over the training labels (scikit-learn's "balanced"; NER: over the tagged
    tokens), so that every class adds the same total weight to CE. None when the split is balanced: CE is
    then left exactly as unweighted."""
    flat = torch.tensor([t for row in labels for t in (row if isinstance(row, list) else [row]) if t != -100])
    counts = torch.bincount(flat, minlength=n_classes).double()
    weights = counts.sum() / (n_classes * counts.clamp(min=1))  # a class absent from training: never weighed
    return None if bool((weights == weights[0]).all()) else weights.float()


class Diagnostics:
    """Per logging window: train/<term>_chance, train/<term>_passing, train/<term>_grad_ratio (see
    docs/tracking.md), and one-line warnings. One per rank; `flush` is collective (all ranks call it)."""

    def __init__(self, cfg, model, zero_stage: int = 3, rank: int = 0):
        self.cfg = cfg
        self.weights = {"head": cfg.gamma, "repr": cfg.beta, "kl": cfg.kl_weight}
        self.active = [t for t in TERMS if self.weights[t] > 0 and model.uses_mi]
        self.sums = torch.zeros(2 * len(TERMS) + 1, dtype=torch.float64)  # passing, chance per term; count
        self.ratios: dict[str, float] = {}
        self.warned: set[str] = set()
        # Cosines of each term's prompt gradient with CE's need a backward through the backbone per term:
        # possible below ZeRO-3 only (ZeRO-3 releases the gathered backbone weights after one backward).
        self.cosines_on = zero_stage < 3
        self.cos: dict[str, float] = {}
        self._p_terms: dict[str, torch.Tensor] = {}
        if self.active and not self.cosines_on and rank == 0:
            print("diagnostics: train/<term>_grad_cos not logged under ZeRO-3 (a second backward through the "
                  "partitioned backbone is not possible); use ZeRO-0/1/2 to log them", flush=True)
        self.saturation = [t for t in SATURATION if t in self.active and getattr(model, "prompt_p0", None) is not None]
        self.p0_sums = torch.zeros(len(SATURATION) + 1, dtype=torch.float64)  # each term at P0; count

    def add(self, result: dict) -> None:
        """After engine.backward: accumulate the window; finish the head ratio if grad_ratios ran."""
        m: MethodLoss = result["method"]
        if getattr(self, "_head_grad", None) is not None and getattr(self, "_total_grad", None) is not None:
            rest = float((self._total_grad - self._head_grad).norm())
            self.ratios["head"] = _ratio(float(self._head_grad.norm()), rest)
        if getattr(self, "_z_terms", None) and getattr(self, "_z_total", None) is not None:
            ce_norm = float((self._z_total - sum(self._z_terms.values())).norm())  # CE's gradient at z
            for t, g in self._z_terms.items():
                self.ratios[t] = _ratio(float(g.norm()), ce_norm)
        self._head_grad = self._total_grad = self._z_total = None
        self._z_terms = {}
        if self._p_terms:
            self.cos = {t: _cosine(g, self._p_terms["ce"]) for t, g in self._p_terms.items() if t != "ce"}
            self._p_terms = {}
        for i, t in enumerate(TERMS):
            if t in m.passing:
                self.sums[2 * i] += float(m.passing[t])
            if t in m.chance:
                self.sums[2 * i + 1] += float(m.chance[t])
        self.sums[-1] += 1

    def grad_ratios(self, result: dict) -> None:
        """How strongly each weighted term pulls on the prompt compared with the rest (Adam follows the larger
        gradient). Called before engine.backward on logging steps, it never back-propagates through the
        backbone a second time (ZeRO-3 releases the backbone's gathered weights after one backward):
        - L_head acts on P directly: ||grad_P gamma*L_head|| over the rest of the step's gradient on P,
          read from the real backward by a hook on the prompt tensor (finished in `add`);
        - L_repr and KL reach P only through z, by the same backbone Jacobian as CE: their ratio is taken
          at z, ||grad_z term|| / ||grad_z CE||, CE's part read from the real backward by a hook on z (the
          total minus the terms'). Never by a gradient of CE taken here: that runs the classifier's backward
          before the real one, and under ZeRO-3 the real backward then fails on the classifier's weight
          (size 0 vs d) whenever L_head, which reads that weight outside its module, is off (gamma=0).
          Test: tests/e2e/test_method.py::test_diagnostics_do_not_change_training."""
        m: MethodLoss = result["method"]
        if not self.active or m.prompt is None or not m.prompt.requires_grad:
            return
        self._head_grad, self._z_terms = None, {}
        if "head" in self.active:
            self._head_grad = torch.autograd.grad(m.weighted["head"], m.prompt, retain_graph=True)[0].detach()
            m.prompt.register_hook(lambda g: setattr(self, "_total_grad", g.detach()))
        for t in ("repr", "kl"):
            if t in self.active:
                # (A term with no graph at all: the KL of a frozen estimator's own posterior on a detached z.)
                g = torch.autograd.grad(m.weighted[t], m.z, retain_graph=True, allow_unused=True)[0] \
                    if m.weighted[t].requires_grad else None
                self._z_terms[t] = g.detach() if g is not None else torch.zeros_like(m.z)
        if self._z_terms:
            m.z.register_hook(lambda g: setattr(self, "_z_total", g.detach()))
        if self.cosines_on:
            self._prompt_grads(m)

    def _prompt_grads(self, m: MethodLoss) -> None:
        """Below ZeRO-3: each weighted term's and CE's own gradient on the prompt (one backbone backward each for
        CE, L_repr and a VIB's KL; L_head's needs none), for train/<term>_grad_cos. Taken directly, not as the
        real backward's total minus the terms: that total is scaled by gradient accumulation and fp16's loss
        scale. A term that does not reach the prompt (the KL without vib_head) gets no cosine."""
        self._p_terms = {"ce": torch.autograd.grad(m.ce, m.prompt, retain_graph=True)[0].detach()}
        for t in self.active:
            if t == "head" and self._head_grad is not None:
                self._p_terms[t] = self._head_grad
                continue
            g = torch.autograd.grad(m.weighted[t], m.prompt, retain_graph=True, allow_unused=True)[0] \
                if m.weighted[t].requires_grad else None
            if g is not None:
                self._p_terms[t] = g.detach()

    def add_p0(self, result: dict) -> None:
        """The saturation diagnostic: the terms of a no-grad forward with the initial prompt P0 (forward(at_p0=
        True)) and the current estimators, on the logging micro-batch. term ~ term_at_p0 says the estimators,
        not the prompt, carry the bound (docs/method.md)."""
        m: MethodLoss = result["method"]
        for i, t in enumerate(SATURATION):
            if t in self.saturation:
                self.p0_sums[i] += float(m.terms[t])
        self.p0_sums[-1] += 1

    def flush(self) -> dict[str, float]:
        import torch.distributed as dist

        sums, p0 = self.sums.clone(), self.p0_sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            if self.saturation:  # every rank runs the P0 pass on the same steps: the same collective on all
                dist.all_reduce(p0)
        logs: dict[str, float] = {}
        n = max(sums[-1].item(), 1.0)
        for i, t in enumerate(TERMS):
            if t in self.active and t != "kl":
                logs[f"train/{t}_passing"] = sums[2 * i].item() / n
                logs[f"train/{t}_chance"] = sums[2 * i + 1].item() / n
            if t in self.ratios:
                logs[f"train/{t}_grad_ratio"] = self.ratios[t]  # rank 0's logging micro-batch
            if t in self.cos:
                logs[f"train/{t}_grad_cos"] = self.cos[t]
            if t in self.saturation and p0[-1] > 0:
                logs[f"train/{t}_at_p0"] = p0[SATURATION.index(t)].item() / p0[-1].item()  # mean over ranks
        self.sums.zero_()
        self.p0_sums.zero_()
        self.ratios, self.cos = {}, {}
        return logs

    def warn(self, logs: dict[str, float], rank: int) -> None:
        """Once per term and kind: dead (no example of the window passed gradient) or dominant."""
        if rank != 0:
            return
        for t in self.active:
            if logs.get(f"train/{t}_passing", 1.0) == 0.0 and f"dead/{t}" not in self.warned:
                self.warned.add(f"dead/{t}")
                print(f"warning: train/{t} passes no gradient: every example of this window sat at mi_clamp "
                      f"({self.cfg.mi_clamp:g}); --estimator normalized or --mi_clamp 0 (docs/method.md)", flush=True)
            ratio = logs.get(f"train/{t}_grad_ratio", 0.0)
            if ratio > DOMINANT_RATIO and f"dominant/{t}" not in self.warned:
                self.warned.add(f"dominant/{t}")
                print(f"warning: train/{t} dominates the prompt's gradient ({ratio:.1f}x CE's); lower its weight "
                      f"(docs/method.md)", flush=True)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0, eps=1e-30))


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("inf") if num > 0 else 0.0
