"""Evidential heads and losses: a voxel-wise Dirichlet for segmentation, a Normal-Inverse-Gamma for regression.

Segmentation (Sensoy et al., NeurIPS 2018; Zou et al., TBraTS, MICCAI 2022): the network emits non-negative
evidence ``e = exp(logits)`` (or ``softplus(logits)``) per class and voxel, the Dirichlet concentration is
``alpha = e + 1`` with strength ``S = sum_k alpha_k``; the expected probability is ``alpha / S`` and the
uncertainty (vacuity) ``K / S``.

Quantification (Amini et al., NeurIPS 2020): every regressed value ``y`` gets a Normal-Inverse-Gamma prior
``NIG(gamma, nu, alpha, beta)`` over the mean and variance of its likelihood; the prediction is ``gamma``, the
aleatoric variance ``E[sigma^2] = beta / (alpha - 1)`` and the epistemic variance ``Var[mu] = beta / (nu (alpha - 1))``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.losses import DiceLoss
from monai.transforms import MapTransform

__all__ = [
    "DirichletHead",
    "DirichletLoss",
    "DirichletOutputsd",
    "NIGHead",
    "NIGLoss",
    "dirichlet_kl_uniform",
    "nig_moments",
    "nig_nll",
    "nig_rescale",
]


def nig_moments(
    gamma: torch.Tensor, nu: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prediction and uncertainties of a Normal-Inverse-Gamma distribution (Amini et al. 2020, eq. 5).

    Args:
        gamma: location (the prediction), any shape.
        nu: virtual observations of the mean, > 0.
        alpha: shape of the inverse-gamma, > 1.
        beta: scale of the inverse-gamma, > 0 (in squared units of ``gamma``).

    Returns:
        ``(mean, aleatoric_var, epistemic_var)`` = ``(gamma, beta / (alpha - 1), beta / (nu (alpha - 1)))``,
        the variances in squared units of ``gamma``.
    """
    aleatoric = beta / (alpha - 1)
    return gamma, aleatoric, aleatoric / nu


def nig_rescale(nig: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Change the unit of NIG parameters: the distribution of ``y' = scale * y - offset``.

    If ``y ~ N(mu, sigma^2)`` with ``(mu, sigma^2) ~ NIG(gamma, nu, alpha, beta)``, then ``scale * y - offset`` has
    ``NIG(scale * gamma - offset, nu, alpha, scale^2 * beta)``: exact, so normalised network outputs become mm / mm^2.

    Args:
        nig: ``[..., Q, 4]`` parameters (gamma, nu, alpha, beta) for ``Q`` quantities.
        scale: ``[..., Q]`` (or broadcastable) positive factors.
        offset: optional ``[..., Q]`` shifts subtracted from ``gamma`` after scaling.

    Returns:
        the rescaled ``[..., Q, 4]`` parameters.
    """
    gamma, nu, alpha, beta = nig.unbind(-1)
    gamma = gamma * scale - (offset if offset is not None else 0)
    return torch.stack([gamma, nu, alpha, beta * scale**2], dim=-1)


def dirichlet_kl_uniform(alpha: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``KL(Dir(alpha) || Dir(1, ..., 1))`` along ``dim`` (Sensoy et al. 2018, eq. 4 regulariser).

    ``lnG(S) - sum_k lnG(alpha_k) - lnG(K) + sum_k (alpha_k - 1)(psi(alpha_k) - psi(S))``.

    Args:
        alpha: Dirichlet concentrations (> 0) with the classes along ``dim``.
        dim: the class dimension.

    Returns:
        the divergence with ``dim`` kept as a singleton.
    """
    num_classes = alpha.shape[dim]
    strength = alpha.sum(dim, keepdim=True)
    return (
        torch.lgamma(strength)
        - torch.lgamma(alpha).sum(dim, keepdim=True)
        - math.lgamma(num_classes)
        + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(strength))).sum(dim, keepdim=True)
    )


def nig_nll(y: torch.Tensor, gamma: torch.Tensor, nu: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
    """Negative log of the Student-t marginal likelihood of ``y`` under ``NIG(gamma, nu, alpha, beta)``.

    ``0.5 log(pi / nu) - alpha log(Omega) + (alpha + 0.5) log(nu (y - gamma)^2 + Omega)
    + lnG(alpha) - lnG(alpha + 0.5)`` with ``Omega = 2 beta (1 + nu)`` (Amini et al. 2020, eq. 8), elementwise.
    """
    omega = 2 * beta * (1 + nu)
    return (
        0.5 * torch.log(math.pi / nu)
        - alpha * torch.log(omega)
        + (alpha + 0.5) * torch.log(nu * (y - gamma) ** 2 + omega)
        + torch.lgamma(alpha)
        - torch.lgamma(alpha + 0.5)
    )


class DirichletHead(nn.Module):
    """Turns class logits into Dirichlet concentrations ``alpha = evidence(logits) + 1`` (evidence >= 0).

    Args:
        evidence: ``"exp"``: ``exp(clamp(logits, -clamp, clamp))`` (Sensoy et al.'s exponential evidence);
            ``"softplus"``: ``softplus(logits)`` (TBraTS, the authors' head). Softplus evidence grows only
            linearly with the logit, so the Dirichlet strength of a trained network stays small and its largest
            probability ``1 - (K - 1) / S`` far below its accuracy; exponential evidence reaches the strengths
            that calibrated probabilities near 1 need.
        clamp: bound of the logits before ``exp`` (``exp(10)`` evidence at most).
    """

    def __init__(self, evidence: str = "exp", clamp: float = 10.0) -> None:
        super().__init__()
        if evidence not in ("exp", "softplus"):
            raise ValueError(f"evidence must be 'exp' or 'softplus', got {evidence!r}.")
        self.evidence = evidence
        self.clamp = clamp

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, K, *spatial]`` logits -> ``[B, K, *spatial]`` concentrations."""
        if self.evidence == "exp":
            return torch.exp(logits.clamp(-self.clamp, self.clamp)) + 1
        return F.softplus(logits) + 1


class NIGHead(nn.Module):
    """Turns ``4 Q`` raw outputs into NIG parameters for ``Q`` quantities.

    ``gamma`` is linear, or ``lo + (hi - lo) sigmoid`` inside ``mean_range = (lo, hi)`` for quantities that cannot
    leave a range (a negative area, a centre outside the field of view), ``nu = softplus + eps``,
    ``alpha = softplus + 1 + eps``, ``beta = softplus + eps`` (Amini et al.).

    Args:
        num_quantities: ``Q``, the number of regressed values.
        eps: lower bound keeping ``nu``, ``beta`` and ``alpha - 1`` positive.
        mean_range: ``(lo, hi)`` bounds of ``gamma``, or ``None`` for an unbounded mean.
    """

    def __init__(self, num_quantities: int, eps: float = 1e-6, mean_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.num_quantities = num_quantities
        self.eps = eps
        self.mean_range = mean_range

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """``[B, 4 Q]`` raw outputs -> ``[B, Q, 4]`` (gamma, nu, alpha, beta)."""
        raw = raw.view(raw.shape[0], self.num_quantities, 4)
        gamma, nu, alpha, beta = raw.unbind(-1)
        if self.mean_range is not None:
            lo, hi = self.mean_range
            gamma = lo + (hi - lo) * torch.sigmoid(gamma)
        return torch.stack(
            [gamma, F.softplus(nu) + self.eps, F.softplus(alpha) + 1 + self.eps, F.softplus(beta) + self.eps], dim=-1
        )


class DirichletLoss(nn.Module):
    """Evidential segmentation loss on Dirichlet concentrations (Sensoy et al. 2018) with an annealed KL term.

    Per voxel, with one-hot target ``y`` and ``p = alpha / S``:

    - ``"mse"``: ``sum_k (y_k - p_k)^2 + p_k (1 - p_k) / (S + 1)`` (Sensoy eq. 5);
    - ``"digamma"``: ``sum_k y_k (psi(S) - psi(alpha_k))`` (eq. 4); ``"log"``: the same with ``log``;

    plus ``kl_weight * min(1, t / annealing) * KL(Dir(alpha_tilde) || Dir(1))`` (``t``: the fraction of the run's
    iterations done, the ``progress`` argument) with the true-class
    evidence removed, ``alpha_tilde = y + (1 - y) alpha``; optionally plus ``dice_weight`` times MONAI's soft Dice
    loss on the expected probability ``p`` (foreground channels only).

    Args:
        loss_type: ``"mse"``, ``"digamma"`` or ``"log"``.
        kl_weight: weight of the KL regulariser at the end of the annealing.
        annealing: fraction of the run over which the KL weight ramps linearly from 0 (``<= 0``: no ramp).
        dice_weight: weight of the Dice term (0 disables it).
    """

    def __init__(
        self, loss_type: str = "mse", kl_weight: float = 1.0, annealing: float = 0.1, dice_weight: float = 0.0
    ) -> None:
        super().__init__()
        if loss_type not in ("mse", "digamma", "log"):
            raise ValueError(f"loss_type must be 'mse', 'digamma' or 'log', got {loss_type!r}.")
        self.loss_type = loss_type
        self.kl_weight = kl_weight
        self.annealing = annealing
        self.dice_weight = dice_weight
        self.dice = DiceLoss(include_background=False, to_onehot_y=False, softmax=False)

    def kl_ramp(self, progress: float) -> float:
        """The KL ramp ``min(1, progress / annealing)`` (1 without annealing)."""
        if self.annealing <= 0:
            return 1.0
        return min(1.0, progress / self.annealing)

    def forward(self, alpha: torch.Tensor, target: torch.Tensor, progress: float = 1.0) -> torch.Tensor:
        """
        Args:
            alpha: ``[B, K, *spatial]`` Dirichlet concentrations.
            target: ``[B, 1, *spatial]`` class indices (or ``[B, K, *spatial]`` one-hot).
            progress: the fraction of the run's iterations done, in [0, 1] (the KL annealing; 1: full weight).

        Returns:
            the scalar loss (mean over voxels and batch).
        """
        num_classes = alpha.shape[1]
        if target.shape[1] == num_classes and num_classes > 1:
            onehot = target.to(alpha.dtype)
        else:
            onehot = F.one_hot(target[:, 0].long(), num_classes).movedim(-1, 1).to(alpha.dtype)
        strength = alpha.sum(1, keepdim=True)
        prob = alpha / strength
        if self.loss_type == "mse":
            data = ((onehot - prob) ** 2 + prob * (1 - prob) / (strength + 1)).sum(1)
        else:
            f = torch.digamma if self.loss_type == "digamma" else torch.log
            data = (onehot * (f(strength) - f(alpha))).sum(1)
        loss = data.mean()
        if self.kl_weight > 0:
            alpha_tilde = onehot + (1 - onehot) * alpha
            loss = loss + self.kl_weight * self.kl_ramp(progress) * dirichlet_kl_uniform(alpha_tilde).mean()
        if self.dice_weight > 0:
            loss = loss + self.dice_weight * self.dice(prob, onehot)
        return loss


class NIGLoss(nn.Module):
    """Evidential regression loss (Amini et al. 2020): NIG negative log-likelihood + evidence regulariser.

    ``L = mean_masked( NLL(y | gamma, nu, alpha, beta) + reg_weight * |y - gamma| * (2 nu + alpha) )``; the mask
    drops undefined targets (e.g. the centre of a slice without tumour).

    Args:
        reg_weight: ``lambda``, the weight of the regulariser (Amini et al. use 0.01).
    """

    def __init__(self, reg_weight: float = 0.01) -> None:
        super().__init__()
        self.reg_weight = reg_weight

    def forward(self, nig: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            nig: ``[B, Q, 4]`` parameters (gamma, nu, alpha, beta).
            target: ``[B, Q]`` values, in the same units as ``gamma``.
            mask: ``[B, Q]`` weights (1 = supervised, 0 = ignored); all ones if omitted.

        Returns:
            the scalar loss (0 when the mask is empty).
        """
        gamma, nu, alpha, beta = nig.unbind(-1)
        target = target.to(gamma.dtype)
        loss = nig_nll(target, gamma, nu, alpha, beta) + self.reg_weight * (target - gamma).abs() * (2 * nu + alpha)
        if mask is None:
            return loss.mean()
        mask = mask.to(loss.dtype)
        return (loss * mask).sum() / mask.sum().clamp_min(1)


class DirichletOutputsd(MapTransform):
    """Replace Dirichlet concentrations by the expected probability and add the uncertainty map ``K / S``.

    Args:
        keys: keys holding ``[K, *spatial]`` concentrations (channel-first, no batch).
        uncertainty_keys: output key(s) for the ``[1, *spatial]`` uncertainty, one per key.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        uncertainty_keys: KeysCollection = "uncertainty",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.uncertainty_keys = (uncertainty_keys,) if isinstance(uncertainty_keys, str) else tuple(uncertainty_keys)
        if len(self.uncertainty_keys) != len(self.keys):
            raise ValueError("uncertainty_keys must give one output key per key.")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, unc_key in self.key_iterator(d, self.uncertainty_keys):
            alpha = d[key]
            strength = alpha.sum(0, keepdim=True)
            d[unc_key] = alpha.shape[0] / strength
            d[key] = alpha / strength
        return d
