"""Evidential heads and losses of the liver bundle against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import bundle_module

BUNDLE = "cdugjl_liver"


@pytest.fixture(scope="module")
def ev():
    return bundle_module(BUNDLE, "evidential")


def digamma_int(n: int) -> float:
    """psi(n) for a positive integer: -Euler-Mascheroni + sum_{k<n} 1/k."""
    return -0.5772156649015329 + sum(1.0 / k for k in range(1, n))


def test_nig_moments(ev):
    mean, aleatoric, epistemic = ev.nig_moments(*torch.tensor([1.5, 2.0, 3.0, 4.0]).unbind())
    assert mean.item() == 1.5
    assert aleatoric.item() == pytest.approx(4.0 / (3.0 - 1.0))  # beta / (alpha - 1)
    assert epistemic.item() == pytest.approx(4.0 / (2.0 * (3.0 - 1.0)))  # beta / (nu (alpha - 1))


def test_nig_nll_hand_computed(ev):
    y, gamma, nu, alpha, beta = 0.5, 0.0, 1.0, 2.0, 1.0
    omega = 2 * beta * (1 + nu)
    expected = (
        0.5 * math.log(math.pi / nu)
        - alpha * math.log(omega)
        + (alpha + 0.5) * math.log(nu * (y - gamma) ** 2 + omega)
        + math.lgamma(alpha)
        - math.lgamma(alpha + 0.5)
    )
    value = ev.nig_nll(*(torch.tensor(v, dtype=torch.float64) for v in (y, gamma, nu, alpha, beta)))
    assert value.item() == pytest.approx(expected, rel=1e-10)
    # the same value is the negative log density of the Student-t marginal St(gamma, beta(1+nu)/(nu alpha), 2 alpha)
    dof, scale2 = 2 * alpha, beta * (1 + nu) / (nu * alpha)
    log_t = (
        math.lgamma((dof + 1) / 2)
        - math.lgamma(dof / 2)
        - 0.5 * math.log(dof * math.pi * scale2)
        - (dof + 1) / 2 * math.log(1 + (y - gamma) ** 2 / (dof * scale2))
    )
    assert value.item() == pytest.approx(-log_t, rel=1e-10)


def test_nig_loss_mask_and_regulariser(ev):
    nig = torch.tensor([[[0.0, 1.0, 2.0, 1.0], [1.0, 2.0, 3.0, 0.5]]], dtype=torch.float64)  # [B=1, Q=2, 4]
    target = torch.tensor([[0.5, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0]])
    nll = ev.nig_nll(torch.tensor(0.5), *torch.tensor([0.0, 1.0, 2.0, 1.0]).unbind()).item()
    reg = abs(0.5 - 0.0) * (2 * 1.0 + 2.0)
    assert ev.NIGLoss(reg_weight=0.1)(nig, target, mask).item() == pytest.approx(nll + 0.1 * reg, rel=1e-6)
    assert ev.NIGLoss()(nig, target, torch.zeros(1, 2)).item() == 0.0


def test_nig_rescale_is_exact(ev):
    """y' = s y - o: gamma' = s gamma - o, beta' = s^2 beta, so the moments scale as they must."""
    nig = torch.tensor([[0.25, 2.0, 3.0, 0.01]])
    out = ev.nig_rescale(nig, torch.tensor([40.0]), torch.tensor([2.0]))
    assert out[0].tolist() == pytest.approx([0.25 * 40 - 2, 2.0, 3.0, 0.01 * 1600])
    _, ale, epi = ev.nig_moments(*out.unbind(-1))
    _, ale0, epi0 = ev.nig_moments(*nig.unbind(-1))
    assert ale.item() == pytest.approx(1600 * ale0.item())
    assert epi.item() == pytest.approx(1600 * epi0.item())


def test_dirichlet_kl_uniform(ev):
    # KL(Beta(2, 1) || U(0, 1)) = int 2x log(2x) dx = log 2 - 1/2
    kl = ev.dirichlet_kl_uniform(torch.tensor([[2.0, 1.0]], dtype=torch.float64))
    assert kl.item() == pytest.approx(math.log(2) - 0.5, rel=1e-10)
    assert ev.dirichlet_kl_uniform(torch.ones(1, 3)).item() == pytest.approx(0.0, abs=1e-7)
    # K = 3, alpha = (2, 2, 1), S = 5: the closed form with digamma at integers
    alpha = [2.0, 2.0, 1.0]
    expected = (
        math.lgamma(5)
        - sum(math.lgamma(a) for a in alpha)
        - math.lgamma(3)
        + sum((a - 1) * (digamma_int(int(a)) - digamma_int(5)) for a in alpha)
    )
    assert ev.dirichlet_kl_uniform(torch.tensor([alpha], dtype=torch.float64)).item() == pytest.approx(expected)


def _alpha_map(values):
    """[K] concentrations -> a [1, K, 1, 1] map."""
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1)


def test_dirichlet_mse_loss(ev):
    alpha = _alpha_map([3.0, 1.0])  # S = 4, p = (0.75, 0.25)
    label0 = torch.zeros(1, 1, 1, 1)
    # sum_k (y_k - p_k)^2 + p_k (1 - p_k) / (S + 1) = 2 * 0.0625 + 2 * 0.1875 / 5
    expected = 0.125 + 0.075
    loss = ev.DirichletLoss("mse", kl_weight=0.0)
    assert loss(alpha, label0).item() == pytest.approx(expected)
    # true class 0 carries all the evidence: alpha_tilde = (1, 1), the KL term vanishes
    assert ev.DirichletLoss("mse", kl_weight=1.0, annealing=0)(alpha, label0).item() == pytest.approx(expected)


def test_dirichlet_kl_annealing(ev):
    alpha = _alpha_map([3.0, 1.0])
    label1 = torch.ones(1, 1, 1, 1)
    data = (0.75**2 + 0.75**2) + 2 * 0.1875 / 5  # target (0, 1)
    kl = math.log(3) - 2.0 / 3.0  # KL(Dir(3, 1) || Dir(1, 1)) = lnG(4) - lnG(3) + 2 (psi(3) - psi(4))
    loss = ev.DirichletLoss("mse", kl_weight=1.0, annealing=0.4)
    assert loss(alpha, label1, progress=0.0).item() == pytest.approx(data)  # start of the run: no KL
    assert loss(alpha, label1, progress=0.1).item() == pytest.approx(data + 0.25 * kl)
    assert loss(alpha, label1, progress=0.9).item() == pytest.approx(data + kl)
    assert loss(alpha, label1).item() == pytest.approx(data + kl)  # default: the end of the run


def test_dirichlet_digamma_and_log_losses(ev):
    alpha = _alpha_map([3.0, 1.0])
    label0 = torch.zeros(1, 1, 1, 1)
    assert ev.DirichletLoss("digamma", kl_weight=0)(alpha, label0).item() == pytest.approx(
        digamma_int(4) - digamma_int(3)
    )
    assert ev.DirichletLoss("log", kl_weight=0)(alpha, label0).item() == pytest.approx(math.log(4 / 3))


def test_dirichlet_loss_dice_term_and_onehot(ev):
    alpha = torch.ones(2, 2, 4, 4) + torch.rand(2, 2, 4, 4)
    label = (torch.rand(2, 1, 4, 4) > 0.5).float()
    onehot = torch.cat([1 - label, label], dim=1)
    plain = ev.DirichletLoss("digamma", kl_weight=0)
    assert plain(alpha, label).item() == pytest.approx(plain(alpha, onehot).item())
    with_dice = ev.DirichletLoss("digamma", kl_weight=0, dice_weight=1.0)
    assert with_dice(alpha, label).item() > plain(alpha, label).item()


def test_heads(ev):
    logits = torch.tensor([[-50.0, 0.0, 2.0, 50.0]])
    alpha = ev.DirichletHead("softplus")(logits)
    assert alpha.tolist()[0] == pytest.approx([1.0, 1.0 + math.log(2), 1.0 + math.log1p(math.exp(2.0)), 51.0], abs=1e-5)
    alpha = ev.DirichletHead()(logits)  # exponential evidence, logits clamped to [-10, 10]
    assert alpha.tolist()[0] == pytest.approx([1.0 + math.exp(-10), 2.0, 1.0 + math.exp(2.0), 1.0 + math.exp(10)],
                                              rel=1e-6)
    with pytest.raises(ValueError):
        ev.DirichletHead("relu")
    nig = ev.NIGHead(3)(torch.zeros(2, 12))
    assert nig.shape == (2, 3, 4)
    assert torch.allclose(nig[..., 0], torch.zeros(2, 3))
    assert (nig[..., 1] > 0).all() and (nig[..., 2] > 1).all() and (nig[..., 3] > 0).all()
    # a bounded mean cannot leave its range, however extreme the raw outputs
    raw = torch.tensor([[-1e4, 0.0, 0.0, 0.0, 1e4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    bounded = ev.NIGHead(3, mean_range=(0.0, 1.0))(raw)[..., 0]
    assert bounded.tolist()[0] == pytest.approx([0.0, 1.0, 0.5])
    assert ev.NIGHead(3)(raw)[0, 0, 0] == -1e4  # unbounded: a negative area was possible


def test_network_quantification_within_the_field_of_view():
    """Whatever the weights, the liver network's centres and area are fractions of the field of view in [0, 1]."""
    from conftest import bundle_module

    nets = bundle_module("cdugjl_liver", "networks")
    torch.manual_seed(0)
    net = nets.MEAMTNet(in_channels=2, channels=(4, 8, 16, 32, 64)).eval()
    with torch.no_grad():
        for p in net.quant_decoder.parameters():
            p.mul_(1e3)  # outputs far outside any plausible range before the head
        gamma = net.forward_all(torch.randn(2, 2, 64, 64) * 10)["quant"][..., 0]
    assert gamma.min() >= 0 and gamma.max() <= 1


def test_dirichlet_outputsd(ev):
    alpha = torch.tensor([3.0, 1.0]).view(2, 1, 1, 1).repeat(1, 2, 2, 2)
    out = ev.DirichletOutputsd("pred", "uncertainty")({"pred": alpha})
    assert torch.allclose(out["pred"][:, 0, 0, 0], torch.tensor([0.75, 0.25]))
    assert out["uncertainty"].shape == (1, 2, 2, 2)
    assert torch.allclose(out["uncertainty"], torch.full((1, 2, 2, 2), 0.5))  # K / S = 2 / 4
