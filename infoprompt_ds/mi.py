"""The mutual-information estimators of InfoPrompt (../shared/METHOD.md), as plain functions.

Both are InfoNCE lower bounds: loss = -log softmax([s+, s-_1 ... s-_M])_0, clamped at 2 per example
(the authors' clamp(min=-2) on the log-probability), with the score s(a, b) = a.b / sqrt(d).

Why the cap is configurable (`mi_clamp`): a capped example passes no gradient, and at chance the loss is
log(M + 1), which is above 2 for M >= 7 negatives. With a sentence's tokens as L_head's negatives and
K*B = 64 samples as L_repr's, both terms sit at the cap from the first step and never act (measured:
train/head = train/repr = 2.0 for whole runs; docs/benchmarks.md). mi_clamp=0 removes the cap.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

CLAMP = 2.0


def score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / math.sqrt(a.shape[-1])


def infonce(pos: torch.Tensor, neg: torch.Tensor, neg_mask: Optional[torch.Tensor] = None,
            clamp: Optional[float] = CLAMP) -> torch.Tensor:
    """pos: (B,), neg: (B, M), neg_mask: (B, M) True where a negative is real. Mean loss, each example's
    capped at `clamp` (None or 0: no cap)."""
    if neg_mask is not None:
        neg = neg.masked_fill(~neg_mask, float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1).float()
    loss = -F.log_softmax(logits, dim=1)[:, 0]
    return (loss.clamp(max=clamp) if clamp else loss).mean()


def head_loss(prompt: torch.Tensor, head: torch.Tensor, token_embeds: torch.Tensor,
              attention_mask: torch.Tensor, clamp: Optional[float] = CLAMP) -> torch.Tensor:
    """L_head, a bound on I(P; H): the prompt summary must score higher with the head summary
    than any of the input's own (unprompted) token embeddings do. Gradients reach P and H."""
    h = head.mean(0)
    pos = score(prompt.mean(0), h).expand(token_embeds.shape[0])
    neg = score(token_embeds, h)  # (B, L)
    return infonce(pos, neg, attention_mask.bool(), clamp)


class Bottleneck(nn.Module):
    """q(u|z) = N(W_mu z, sigma^2), log sigma = clamp(W_sigma z, -2, 10); W_o decodes u back to R^d;
    W_c maps the (stop-gradient) prompt to the context the samples are scored against."""

    def __init__(self, hidden_size: int, dim: int):
        super().__init__()
        self.mu = nn.Linear(hidden_size, dim)
        self.log_sigma = nn.Linear(hidden_size, dim)
        self.decode = nn.Linear(dim, hidden_size)
        self.context = nn.Linear(hidden_size, hidden_size, bias=False)

    def posterior(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(z), self.log_sigma(z).clamp(-2, 10)


def kl_to_standard_normal(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per example, summed over dimensions."""
    return 0.5 * (mu.pow(2) + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma).sum(-1)


def repr_loss(bn: Bottleneck, prompt: torch.Tensor, z_prompted: torch.Tensor, z_plain: torch.Tensor,
              eps_pos: torch.Tensor, eps_neg: torch.Tensor,
              clamp: Optional[float] = CLAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """L_repr, a bound on I(P; Z | X), and the KL regulariser.

    Positive: s(W_o u+, c) with u+ ~ q(.|z(x, P)). Negatives: K samples per example of q(.|z(x, no
    prompt)), pooled over the batch (K*B) and shared by every positive. c = mean_rows(W_c stopgrad(P)).
    eps_pos: (B, k), eps_neg: (B, K, k) standard-normal noise, passed in so the step is reproducible.
    KL is taken on both posteriors (prompted + unprompted, each averaged over the batch).
    """
    mu_p, ls_p = bn.posterior(z_prompted)
    mu_n, ls_n = bn.posterior(z_plain)
    u_pos = mu_p + torch.exp(ls_p) * eps_pos
    u_neg = (mu_n.unsqueeze(1) + torch.exp(ls_n).unsqueeze(1) * eps_neg).flatten(0, 1)  # (B*K, k)
    c = bn.context(prompt.detach()).mean(0)
    pos = score(bn.decode(u_pos), c)
    neg = score(bn.decode(u_neg), c).unsqueeze(0).expand(pos.shape[0], -1)
    kl = kl_to_standard_normal(mu_p, ls_p).mean() + kl_to_standard_normal(mu_n, ls_n).mean()
    return infonce(pos, neg, clamp=clamp), kl.float()
