"""The estimators of InfoPrompt's two mutual-information terms, as plain functions (docs/method.md).

Both terms are InfoNCE lower bounds, computed per example: loss_i = -log softmax([s+, s-_1 ... s-_M])_0.
Two estimators share that form and differ in the critic s and in what they do to the vectors:

- `authors`: the authors' code exactly: s(a, b) = a.b / sqrt(d), each example's loss capped at `clamp`
  (their clamp(min=-2) on the log-probability). A capped example passes no gradient, and at chance the
  loss is log(1 + M), above 2 from M = 7 negatives on: this is why version 1 did nothing
  (docs/benchmarks.md).
- `normalized`: the same objectives, sound at any width and norm: s(a, b) = cos(a, b) / tau in fp32,
  token-space vectors centred by the vocabulary's mean embedding, z standardised by the statistics of the
  unprompted states (the caller does that, see model.py), no cap. Every example passes gradient, and each
  loss lies in [0, log(1 + M) + 2 / tau].
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

CLAMP = 2.0


def dot_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / math.sqrt(a.shape[-1])


def cos_score(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8) / tau


def infonce(pos: torch.Tensor, neg: torch.Tensor, neg_mask: Optional[torch.Tensor] = None,
            clamp: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """pos: (B,), neg: (B, M), neg_mask: (B, M) True where a negative is real.
    Returns (per-example loss (B,), per-example 'passes gradient' flag (B,)): with a cap, an example at
    or above it is flat (no gradient); without one (None or 0) every example passes gradient."""
    if neg_mask is not None:
        neg = neg.masked_fill(~neg_mask, float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1).float()
    loss = -F.log_softmax(logits, dim=1)[:, 0]
    if not clamp:
        return loss, torch.ones_like(loss, dtype=torch.bool)
    return loss.clamp(max=clamp), loss < clamp


class Posterior(nn.Module):
    """q(u|z) = N(W_mu z, sigma^2), log sigma = clamp(W_sigma z, -2, 10), and W_o decoding u back to R^d.
    The VIB classifier (vib_head) is this module; without it the representation estimator owns one."""

    def __init__(self, hidden_size: int, dim: int):
        super().__init__()
        self.mu = nn.Linear(hidden_size, dim)
        self.log_sigma = nn.Linear(hidden_size, dim)
        self.decode = nn.Linear(dim, hidden_size)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(z), self.log_sigma(z).clamp(-2, 10)


def sample(mu: torch.Tensor, log_sigma: torch.Tensor, eps: Optional[torch.Tensor]) -> torch.Tensor:
    """u = mu + sigma * eps (eps: standard-normal noise, passed in so a step is reproducible); mu when None."""
    return mu if eps is None else mu + torch.exp(log_sigma) * eps.to(mu.dtype)


def kl_to_standard_normal(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per example, AVERAGED over the dimensions (the authors' code; version 1
    summed it, 32x the weight)."""
    mu, log_sigma = mu.float(), log_sigma.float()
    return 0.5 * (mu.pow(2) + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma).mean(-1)


class Estimator(nn.Module):
    """The trainable parts of the two MI estimators.

    context: W_c, mapping the (stop-gradient) prompt rows to the context L_repr scores samples against.
    posterior: q(u|z) for L_repr when the classifier is not a VIB (else the classifier's is used).
    critic: the learned bilinear map of the normalized L_head when the head rows do not live in the
    prompt's (token embedding) space; identity at start, so step 0 is the plain cosine critic.
    """

    def __init__(self, hidden_size: int, dim: int, own_posterior: bool, bilinear: bool):
        super().__init__()
        self.context = nn.Linear(hidden_size, hidden_size, bias=False)
        self.posterior = Posterior(hidden_size, dim) if own_posterior else None
        self.critic = nn.Linear(hidden_size, hidden_size, bias=False) if bilinear else None
        if self.critic is not None:
            with torch.no_grad():
                self.critic.weight.copy_(torch.eye(hidden_size))


def head_loss(prompt: torch.Tensor, head: torch.Tensor, token_embeds: torch.Tensor, attention_mask: torch.Tensor,
              estimator: str, clamp: Optional[float] = CLAMP, tau: float = 0.1,
              center: Optional[torch.Tensor] = None, critic: Optional[nn.Module] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_head, a bound on I(P; H), per example. The positive pairs the prompt summary mean_rows P(x_i) with
    the head summary mean_rows H; the negatives pair each of the input's own token embeddings e_ij with it.
    prompt: (n, d) static or (B, n, d) per input; head: (C, d); token_embeds: (B, L, d).
    Returns (loss (B,), passes-gradient (B,))."""
    p = prompt.mean(-2)
    h = head.mean(0)
    if estimator == "authors":
        pos = dot_score(p, h).expand(token_embeds.shape[0])
        neg = dot_score(token_embeds, h)
        return infonce(pos, neg, attention_mask.bool(), clamp)
    # normalized: token-space vectors centred by the vocabulary mean (an anisotropic embedding space puts
    # every raw cosine near 1), the head summary mapped by the bilinear critic where it lives elsewhere.
    p, e = p.float() - center.float(), token_embeds.float() - center.float()
    # The critic's input dtype comes from the token embeddings (the engine's dtype, which the critic has too),
    # never from critic.weight: under ZeRO-3 a parameter read outside its module's forward is gathered by
    # that read into a fresh (64-byte-aligned) buffer while the fetch trace is being recorded, i.e. on an
    # engine's first step, and on every later step it is a view into the flat partition at the parameter's
    # offset (here not 16-byte aligned, on 1 rank). MKL's matrix-vector product rounds the two differently,
    # so the first step after every resume was 1 ulp off the uninterrupted run. Tests:
    # tests/unit/test_model.py::test_training_forward_reads_parameters_only_inside_their_modules and
    # tests/reliability/test_save_kill.py.
    h = critic(h.to(token_embeds.dtype)).float() if critic is not None else h.float() - center.float()
    pos = cos_score(p, h, tau).expand(token_embeds.shape[0])
    neg = cos_score(e, h, tau)
    return infonce(pos, neg, attention_mask.bool(), None)


def repr_loss(posterior: Posterior, context: nn.Linear, prompt: torch.Tensor, z_prompted: torch.Tensor,
              z_plain: torch.Tensor, eps_pos: torch.Tensor, eps_neg: torch.Tensor, estimator: str,
              clamp: Optional[float] = CLAMP, tau: float = 0.1
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """L_repr, a bound on I(P; Z | X), per example.

    Context c_i = mean_rows(W_c stopgrad P(x_i)). Positive: W_o u+ with u+ ~ q(.|z(x_i, P)). Negatives:
    K samples of q(.|z(x_i, no prompt)) of the SAME input (version 1 pooled them over the batch, so the
    term learned 'prompted or not' from input content). z_* arrive already standardised for `normalized`.
    eps_pos: (B, k), eps_neg: (B, K, k). Returns (loss (B,), passes-gradient (B,), the prompted posterior,
    the unprompted posterior) so the caller can take the KL on the same posteriors.
    """
    mu_p, ls_p = posterior(z_prompted)
    mu_n, ls_n = posterior(z_plain)
    u_pos = sample(mu_p, ls_p, eps_pos)
    u_neg = sample(mu_n.unsqueeze(1), ls_n.unsqueeze(1), eps_neg)  # (B, K, k)
    c = context(prompt.detach()).mean(-2)  # (d,) static or (B, d) per input
    c_neg = c.unsqueeze(-2)  # broadcasts over the K samples
    if estimator == "authors":
        pos, neg = dot_score(posterior.decode(u_pos), c), dot_score(posterior.decode(u_neg), c_neg)
        loss, passing = infonce(pos, neg, None, clamp)
    else:
        pos, neg = cos_score(posterior.decode(u_pos), c, tau), cos_score(posterior.decode(u_neg), c_neg, tau)
        loss, passing = infonce(pos, neg, None, None)
    return loss, passing, (mu_p, ls_p), (mu_n, ls_n)
