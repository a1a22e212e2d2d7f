"""Each MI loss against a direct, slow computation from its formula in ../shared/METHOD.md."""

import math

import torch

from infoprompt_ds import mi


def slow_infonce(pos: float, negs: list[float]) -> float:
    logits = [pos] + negs
    m = max(logits)
    log_z = m + math.log(sum(math.exp(x - m) for x in logits))
    return min(-(pos - log_z), 2.0)


def test_head_loss_matches_formula():
    torch.manual_seed(0)
    n, c, b, L, d = 3, 4, 5, 6, 8
    P, H, E = torch.randn(n, d), torch.randn(c, d), torch.randn(b, L, d) * 3
    mask = torch.ones(b, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    p_bar, h_bar = P.mean(0), H.mean(0)
    expected = []
    for i in range(b):
        pos = float(p_bar @ h_bar) / math.sqrt(d)
        negs = [float(E[i, j] @ h_bar) / math.sqrt(d) for j in range(L) if mask[i, j]]
        expected.append(slow_infonce(pos, negs))
    got = mi.head_loss(P, H, E, mask)
    assert torch.allclose(got, torch.tensor(sum(expected) / b), atol=1e-5)
    assert any(e == 2.0 for e in expected) and any(e < 2.0 for e in expected)  # the clamp is exercised


def test_head_loss_gradients_reach_prompt_and_head():
    P, H = torch.randn(3, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    mi.head_loss(P, H, torch.randn(2, 4, 8) * 0.1, torch.ones(2, 4)).backward()
    assert P.grad.abs().sum() > 0 and H.grad.abs().sum() > 0


def test_repr_loss_and_kl_match_formula():
    torch.manual_seed(1)
    n, b, d, k, K = 3, 4, 8, 5, 2
    bn = mi.Bottleneck(d, k)
    P, z_p, z_n = torch.randn(n, d), torch.randn(b, d), torch.randn(b, d)
    eps_p, eps_n = torch.randn(b, k), torch.randn(b, K, k)
    loss, kl = mi.repr_loss(bn, P, z_p, z_n, eps_p, eps_n)

    def q(z):
        mu = bn.mu.weight @ z + bn.mu.bias
        ls = torch.clamp(bn.log_sigma.weight @ z + bn.log_sigma.bias, -2, 10)
        return mu, ls

    def dec(u):
        return bn.decode.weight @ u + bn.decode.bias

    c = torch.stack([bn.context.weight @ P[r] for r in range(n)]).mean(0)
    neg_u = []
    for j in range(b):
        mu, ls = q(z_n[j])
        neg_u += [mu + torch.exp(ls) * eps_n[j, s] for s in range(K)]
    negs = [float(dec(u) @ c) / math.sqrt(d) for u in neg_u]
    expected, kls = [], []
    for i in range(b):
        mu, ls = q(z_p[i])
        pos = float(dec(mu + torch.exp(ls) * eps_p[i]) @ c) / math.sqrt(d)
        expected.append(slow_infonce(pos, negs))
    for z in list(z_p) + list(z_n):
        mu, ls = q(z)
        kls.append(float(torch.distributions.kl_divergence(
            torch.distributions.Normal(mu, torch.exp(ls)), torch.distributions.Normal(0.0, 1.0)).sum()))
    assert torch.allclose(loss, torch.tensor(sum(expected) / b), atol=1e-5)
    assert math.isclose(float(kl), sum(kls[:b]) / b + sum(kls[b:]) / b, rel_tol=1e-5)


def test_repr_loss_stops_gradient_into_prompt():
    bn = mi.Bottleneck(8, 4)
    P = torch.randn(3, 8, requires_grad=True)
    loss, kl = mi.repr_loss(bn, P, torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 4), torch.randn(2, 3, 4))
    (loss + kl).backward()
    assert P.grad is None  # c = W_c stopgrad(P): the prompt learns from L_repr only through z
    assert all(p.grad is not None for p in bn.parameters())


def test_log_sigma_is_clamped():
    bn = mi.Bottleneck(4, 2)
    with torch.no_grad():
        bn.log_sigma.bias.fill_(50.0)
    _, ls = bn.posterior(torch.zeros(1, 4))
    assert float(ls.max()) == 10.0


def test_capped_examples_pass_no_gradient_and_mi_clamp_0_removes_the_cap():
    """At chance, InfoNCE is log(1 + M): with M = 20 token negatives every example is above the cap of 2,
    so the capped head loss gives P no gradient at all (what the study measured); without the cap it does."""
    torch.manual_seed(0)
    d, L = 16, 20
    E = torch.randn(4, L, d)
    for clamp, expect_grad in ((2.0, False), (None, True), (0, True)):
        P, H = torch.randn(3, d).mul(0.01).requires_grad_(), torch.randn(2, d).requires_grad_()
        loss = mi.head_loss(P, H, E, torch.ones(4, L), clamp=clamp)
        loss.backward()
        assert (float(loss) == 2.0) != expect_grad  # capped: exactly the cap
        assert (P.grad.abs().sum() > 0) == expect_grad
    assert float(mi.head_loss(P, H, E, torch.ones(4, L), clamp=None)) > math.log(L + 1) - 0.5
