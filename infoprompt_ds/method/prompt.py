"""The soft prompt P (n x d) and its initialisations.

Initial values are computed from the backbone's (possibly ZeRO-3-partitioned) embedding matrix; the
caller gathers it (see model.build_model), this module only does the arithmetic.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from infoprompt_ds.data.tasks import word_ids


class SoftPrompt(nn.Module):
    """n trainable virtual-token embeddings, prepended to every input's token embeddings."""

    def __init__(self, n_virtual_tokens: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_virtual_tokens, hidden_size))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class PromptGenerator(nn.Module):
    """The authors' per-input prompt: an MLP d -> 32 -> n*d (GELU) on stopgrad z(x, no prompt), added to
    the static prompt. Its last layer starts at zero, so at step 0 every input gets the static prompt
    (the same initialisation as prompt_type=static: the two are compared from the same start)."""

    def __init__(self, n_virtual_tokens: int, hidden_size: int, width: int = 32):
        super().__init__()
        self.n = n_virtual_tokens
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, n_virtual_tokens * hidden_size))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, z_plain: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, n, d) offsets to the static prompt."""
        return self.net(z_plain.detach()).view(z_plain.shape[0], self.n, -1)


def _ordinary_ids(tokenizer, vocab_rows: int) -> torch.Tensor:
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(min(len(tokenizer), vocab_rows)) if i not in special])


def init_values(how: str, n: int, embeddings: torch.Tensor, tokenizer, seed: int,
                text: Optional[str] = None, label_words: Optional[list[str]] = None) -> torch.Tensor:
    """The n x d starting values of the prompt, in float32.

    random: N(0, std of the vocab embeddings); vocab: rows of seeded random ordinary tokens;
    text: the embeddings of `text`, repeated/truncated to n; labels: the label words' token
    embeddings first, then vocab rows.
    """
    emb = embeddings.float()
    gen = torch.Generator().manual_seed(seed)
    if how == "random":
        return torch.randn(n, emb.shape[1], generator=gen) * emb.std()
    pool = _ordinary_ids(tokenizer, emb.shape[0])
    # Distinct rows; a vocabulary with fewer ordinary tokens than n (a small word-level one) repeats them
    # in fresh permutations rather than leaving the prompt short. The first permutation is unchanged.
    perms = [torch.randperm(len(pool), generator=gen) for _ in range(math.ceil(n / len(pool)))]
    vocab_ids = pool[torch.cat(perms)[:n]]
    if how == "vocab":
        ids = vocab_ids
    elif how == "text":
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor((t * (n // max(len(t), 1) + 1))[:n])
    elif how == "labels":
        t = [i for w in label_words for i in word_ids(tokenizer, w)][:n]
        ids = torch.cat([torch.tensor(t, dtype=torch.long), vocab_ids[: n - len(t)]])
    else:
        raise ValueError(how)
    return emb[ids].clone()


def head_init(embeddings: torch.Tensor, tokenizer, label_words: list[str]) -> torch.Tensor:
    """One head row per class: the mean embedding of its label word's tokens (the verbalizer)."""
    emb = embeddings.float()
    return torch.stack([emb[word_ids(tokenizer, w)].mean(0) for w in label_words])
