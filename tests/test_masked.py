"""Ambient Diffusion on masked data (seed paper 003): the further corruption, the objective's minimiser on Gaussian
data against the analytic posterior mean, and hidden pixels that never reach the network or the loss."""

from __future__ import annotations

import pytest
import torch

from ambient_ray.diffusion.masked import (
    further_mask,
    gaussian_posterior_mean,
    hidden_was_observed,
    masked_loss,
    network_input,
)


@pytest.mark.parametrize("p, delta", [(0.4, 0.1), (0.8, 0.1), (0.9, 0.3), (0.5, 0.0)])
def test_a_pixel_the_network_did_not_see_was_observed_with_the_closed_form_probability(p, delta):
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(400, 32, 32, generator=g) >= p).float()
    at = further_mask(a, delta, g)
    assert bool((at <= a).all())  # Ã ⊆ A
    hidden = at == 0
    got = a[hidden].mean().item()
    want = (1 - p) * delta / (p + delta - p * delta)
    assert hidden_was_observed(p, delta) == pytest.approx(want)
    n = int(hidden.sum())
    assert got == pytest.approx(want, abs=4 * (want * (1 - want) / n) ** 0.5 + 1e-12)


def _gaussian(n: int, g: torch.Generator):
    mu = torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64)
    root = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.5, 0.4, 0.7]], dtype=torch.float64)
    cov = root @ root.T
    x0 = mu + torch.randn(n, 3, generator=g, dtype=torch.float64) @ root.T
    return mu, cov, x0


def _fit_affine(x_t, x0, a, observed, steps=60):
    """The affine map of the observed coordinates that minimises the mean masked loss (LBFGS: a convex quadratic)."""
    w = torch.zeros(3, int(observed.sum()), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        pred = x_t[:, observed] @ w.T + b
        loss = masked_loss(pred.view(-1, 1, 1, 3), x0.view(-1, 1, 1, 3), a.view(-1, 1, 3)).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return w, b


def test_the_objective_is_minimised_by_the_posterior_mean_and_the_naive_one_leaves_hidden_pixels_free():
    """x0 ~ N(μ, Σ) in 3 dimensions, pixels missing with p = 0.4, further erased with δ = 0.3; the rows whose Ã
    observes coordinates {0, 1}: the affine minimiser of the masked loss over them is E[x0 | Ã x_t, Ã] on all three
    coordinates, the hidden one included. With δ = 0 the hidden coordinate is never graded."""
    g = torch.Generator().manual_seed(1)
    sigma, p = 0.7, 0.4
    mu, cov, x0 = _gaussian(300_000, g)
    x_t = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    a = (torch.rand(len(x0), 1, 3, generator=g) >= p).double()
    pattern = torch.tensor([True, True, False])
    probe = x_t[:2000]
    want = gaussian_posterior_mean(mu, cov, probe, pattern, sigma)

    at = further_mask(a, 0.3, g)
    rows = (at.view(-1, 3).bool() == pattern).all(dim=1)
    assert int(rows.sum()) > 20_000
    w, b = _fit_affine(x_t[rows], x0[rows], a[rows], pattern)
    got = probe[:, pattern] @ w.detach().T + b.detach()
    assert (got - want).abs().max().item() < 0.05  # sampling error of ~25k rows
    assert (got[:, 2] - mu[2]).std().item() > 0.1  # the hidden coordinate is predicted from the observed ones

    naive = a.clone()  # δ = 0: Ã = A, so a coordinate outside Ã is outside A
    rows = (naive.view(-1, 3).bool() == pattern).all(dim=1)
    w, b = _fit_affine(x_t[rows], x0[rows], naive[rows], pattern)
    w, b = w.detach(), b.detach()
    assert float(w[2].abs().max()) == 0.0 and float(b[2].abs()) == 0.0  # never moved from its start: not identified
    got = probe[:, pattern] @ w.detach().T + b.detach()
    assert (got[:, :2] - want[:, :2]).abs().max().item() < 0.05  # the observed ones are still right


def test_hidden_pixels_never_reach_the_network_or_the_loss():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 8, 8, generator=g)
    a = (torch.rand(4, 8, 8, generator=g) >= 0.5).float()
    at = further_mask(a, 0.2, g)
    planted = x.clone()
    planted[(at == 0).unsqueeze(1).expand_as(x)] = float("nan")  # what hides outside Ã must not matter
    seen, channel = network_input(planted, at)
    clean, _ = network_input(x, at)
    assert torch.equal(seen, clean) and not seen.isnan().any()
    assert channel.shape == (4, 1, 8, 8) and torch.equal(channel[:, 0], at)

    x0 = x.clone()
    x0[(a == 0).unsqueeze(1).expand_as(x)] = float("inf")  # the stored image's hidden pixels: anything
    d = torch.randn(4, 3, 8, 8, generator=g, requires_grad=True)
    loss = masked_loss(d, x0, a, weight=torch.tensor([1.0, 2.0, 0.5, 1.0]))
    assert loss.isfinite().all()
    loss.sum().backward()
    hidden = (a == 0).unsqueeze(1).expand_as(x)
    assert float(d.grad[hidden].abs().max()) == 0.0 and float(d.grad[~hidden].abs().max()) > 0
    ref = ((d.detach() - x) ** 2 * a.unsqueeze(1)).flatten(1).sum(1) * torch.tensor([1.0, 2.0, 0.5, 1.0])
    assert torch.allclose(loss.detach(), ref)  # the sum over observed entries, λ(σ) per row


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="delta"):
        further_mask(torch.ones(1, 2, 2), 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        masked_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.ones(2, 5, 5))
