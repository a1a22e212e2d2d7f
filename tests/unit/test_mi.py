"""Each MI loss against a direct, slow computation of its formula in docs/method.md, for both estimators."""

import math

import pytest
import torch

from infoprompt_ds.method import mi


def slow_infonce(pos: float, negs: list[float], clamp=None) -> float:
    logits = [pos] + negs
    m = max(logits)
    log_z = m + math.log(sum(math.exp(x - m) for x in logits))
    loss = -(pos - log_z)
    return min(loss, clamp) if clamp else loss


def slow_cos(a, b, tau):
    a, b = a.detach().double(), b.detach().double()
    return float(a @ b / (a.norm() * b.norm())) / tau


def slow_dot(a, b):
    return float(a.detach().double() @ b.detach().double()) / math.sqrt(a.shape[-1])


def slow_q(post, z):
    mu = post.mu.weight @ z + post.mu.bias
    ls = torch.clamp(post.log_sigma.weight @ z + post.log_sigma.bias, -2, 10)
    return mu, ls


def slow_kl_mean(mu, ls):
    mu, ls = mu.detach().double(), ls.detach().double()
    zero = torch.zeros_like(mu)
    return float(torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.exp(ls)), torch.distributions.Normal(zero, zero + 1)).mean())


def head_case(seed=0):
    torch.manual_seed(seed)
    n, c, b, L, d = 3, 4, 5, 6, 8
    P, H, E = torch.randn(n, d), torch.randn(c, d), torch.randn(b, L, d) * 3
    mask = torch.ones(b, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return P, H, E, mask


def test_authors_head_loss_matches_formula():
    P, H, E, mask = head_case()
    b, L, d = E.shape
    p_bar, h_bar = P.mean(0), H.mean(0)
    expected = []
    for i in range(b):
        negs = [slow_dot(E[i, j], h_bar) for j in range(L) if mask[i, j]]
        expected.append(slow_infonce(slow_dot(p_bar, h_bar), negs, 2.0))
    got, passing = mi.head_loss(P, H, E, mask, "authors", clamp=2.0)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert passing.tolist() == [e < 2.0 for e in expected]
    assert any(e == 2.0 for e in expected) and any(e < 2.0 for e in expected)  # the clamp is exercised


@pytest.mark.parametrize("bilinear", [False, True])
def test_normalized_head_loss_matches_formula(bilinear):
    P, H, E, mask = head_case(1)
    b, L, d = E.shape
    tau, center = 0.1, torch.randn(d)
    critic = None
    if bilinear:
        critic = torch.nn.Linear(d, d, bias=False)
    p = P.mean(0) - center
    h = critic.weight @ H.mean(0) if bilinear else H.mean(0) - center
    expected = [slow_infonce(slow_cos(p, h, tau), [slow_cos(E[i, j] - center, h, tau) for j in range(L) if mask[i, j]])
                for i in range(b)]
    got, passing = mi.head_loss(P, H, E, mask, "normalized", clamp=2.0, tau=tau, center=center, critic=critic)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32), atol=1e-4)
    assert passing.all()  # no cap: the clamp is ignored by this estimator
    # every example lies in [0, log(1 + M) + 2 / tau]
    bound = torch.log1p(mask.sum(1).float()) + 2 / tau
    assert (got >= 0).all() and (got <= bound).all()


def repr_case(seed, per_input_prompt=False):
    torch.manual_seed(seed)
    n, b, d, k, K = 3, 4, 8, 5, 3
    post, ctx = mi.Posterior(d, k), torch.nn.Linear(d, d, bias=False)
    P = torch.randn(b, n, d) if per_input_prompt else torch.randn(n, d)
    return post, ctx, P, torch.randn(b, d), torch.randn(b, d), torch.randn(b, k), torch.randn(b, K, k)


@pytest.mark.parametrize("estimator", ["authors", "normalized"])
@pytest.mark.parametrize("per_input_prompt", [False, True])
def test_repr_loss_matches_formula_with_same_input_negatives(estimator, per_input_prompt):
    post, ctx, P, z_p, z_n, eps_p, eps_n = repr_case(2, per_input_prompt)
    b, K = eps_n.shape[:2]
    tau, clamp = 0.1, 2.0
    got, passing, _, _ = mi.repr_loss(post, ctx, P, z_p, z_n, eps_p, eps_n, estimator, clamp, tau)

    def dec(u):
        return post.decode.weight @ u + post.decode.bias

    def s(a, c):
        return slow_dot(a, c) if estimator == "authors" else slow_cos(a, c, tau)

    expected = []
    for i in range(b):
        rows = P[i] if per_input_prompt else P
        c = torch.stack([ctx.weight @ r for r in rows]).mean(0)
        mu, ls = slow_q(post, z_p[i])
        pos = s(dec(mu + torch.exp(ls) * eps_p[i]), c)
        mu, ls = slow_q(post, z_n[i])  # negatives: samples of the SAME input's unprompted posterior
        negs = [s(dec(mu + torch.exp(ls) * eps_n[i, j]), c) for j in range(K)]
        expected.append(slow_infonce(pos, negs, clamp if estimator == "authors" else None))
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32), atol=1e-4)
    assert passing.tolist() == [e < clamp or estimator == "normalized" for e in expected]


def test_kl_is_averaged_over_dims():
    post, _, _, z_p, _, _, _ = repr_case(3)
    mu, ls = post(z_p)
    got = mi.kl_to_standard_normal(mu, ls)
    expected = [slow_kl_mean(*slow_q(post, z)) for z in z_p]
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)


def test_repr_loss_stops_gradient_into_prompt():
    post, ctx, P, z_p, z_n, eps_p, eps_n = repr_case(4)
    P.requires_grad_()
    loss, _, _, _ = mi.repr_loss(post, ctx, P, z_p, z_n, eps_p, eps_n, "normalized")
    loss.mean().backward()
    assert P.grad is None  # c = W_c stopgrad(P): the prompt learns from L_repr only through z
    assert all(p.grad is not None for p in list(post.parameters()) + list(ctx.parameters()))


def test_log_sigma_is_clamped():
    post = mi.Posterior(4, 2)
    with torch.no_grad():
        post.log_sigma.bias.fill_(50.0)
    _, ls = post(torch.zeros(1, 4))
    assert float(ls.max()) == 10.0


def test_authors_cap_passes_no_gradient_at_chance_and_normalized_always_does():
    """At chance InfoNCE is log(1 + M): with M = 20 token negatives every example is above the authors'
    cap of 2, so the capped head loss gives P no gradient at all (what the study measured); mi_clamp=0
    and the normalized estimator both pass gradient for every example."""
    torch.manual_seed(0)
    d, L = 16, 20
    E = torch.randn(4, L, d)
    for est, clamp, expect_grad in (("authors", 2.0, False), ("authors", 0, True), ("normalized", 2.0, True)):
        P, H = torch.randn(3, d).mul(0.01).requires_grad_(), torch.randn(2, d).requires_grad_()
        loss, passing = mi.head_loss(P, H, E, torch.ones(4, L), est, clamp=clamp, center=torch.zeros(d))
        loss.mean().backward()
        assert bool(passing.all()) == expect_grad and bool(passing.any()) == expect_grad
        assert (P.grad.abs().sum(-1) > 0).all() == expect_grad


def test_normalized_repr_is_invariant_to_the_scale_of_hidden_states():
    """The model standardises z with the unprompted states' statistics before the posterior: scaling every
    hidden state by 100 (cache included) leaves L_repr unchanged."""
    post, ctx, P, z_p, z_n, eps_p, eps_n = repr_case(5)
    cache = torch.cat([z_n, torch.randn(16, z_n.shape[1])])

    def loss(scale):
        c = cache * scale
        m, s = c.mean(0), c.std(0)
        return mi.repr_loss(post, ctx, P, (z_p * scale - m) / s, (z_n * scale - m) / s, eps_p, eps_n, "normalized")[0]

    assert (loss(100.0) - loss(1.0)).abs().max() < 1e-4
