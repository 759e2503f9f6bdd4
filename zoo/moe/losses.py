"""Auxiliary losses of MoE routers. Every function ignores masked tokens (``valid`` False).

Shapes: G groups, S tokens per group, E experts; ``valid`` is [G, S] bool. The V-MoE losses (importance,
load) also take ``valid=None``: every token is valid, and the masking kernels are skipped.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


_MIN_MEAN = 1e-12


class _CVSquared(torch.autograd.Function):
    """``(std/mean)^2`` over the last axis with its gradient in closed form. The forward is the plain formula;
    autograd's backward of that formula (std, clamp, division and power, each taken apart) launches about
    twenty small kernels, this one nine."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1)
        denom = mean.clamp_min(_MIN_MEAN)
        cv2 = (x.std(dim=-1, correction=0) / denom) ** 2
        ctx.save_for_backward(x, mean, denom, cv2)
        return cv2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        x, mean, denom, cv2 = ctx.saved_tensors
        # cv2 = var / denom^2 (population variance, denom = max(mean, min) is constant where clamped), so
        # d cv2 / d x_e = 2 / (E denom^2) * (x_e - mean - [mean >= min] * cv2 * denom).
        scale = grad * (2.0 / x.shape[-1]) / denom.square()
        shift = mean + cv2 * (denom * (mean >= _MIN_MEAN))
        return (x - shift.unsqueeze(-1)) * scale.unsqueeze(-1)


def _cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation over the last axis with the POPULATION std (as numpy/JAX)."""
    return _CVSquared.apply(x)


def _count(n: int, like: Tensor) -> Tensor:
    """``n`` as a 0-dim tensor on ``like``'s device: dividing by a Python number would make CUDA multiply by its
    reciprocal instead, which rounds differently from dividing by the same count taken from the mask."""
    return torch.full((), n, device=like.device)


def _mean_over_groups(per_group: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Mean of per-group values [..., G] over the groups that hold at least one valid token, so that a fully
    masked group (e.g. an all-padding sequence routed alone) does not dilute the loss."""
    if valid is None:
        return per_group.sum(dim=-1) / _count(per_group.shape[-1], per_group)
    # Bool weights and an integer count are the same numbers as float ones, without the two conversions.
    has_valid = valid.any(dim=1)
    return (per_group * has_valid).sum(dim=-1) / has_valid.sum().clamp_min(1)


def importance_per_group(clean_probs: Tensor, valid: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Summed clean gate probability of each expert per group [G, E], and the masked probabilities
    [G, S, E] it sums (the layer's importance statistic reuses them)."""
    masked = clean_probs if valid is None else clean_probs * valid.unsqueeze(-1)
    return masked.sum(dim=1), masked


def load_per_group(logits: Tensor, noisy_logits: Tensor, noise_std: float, top_k: int,
                   valid: Optional[Tensor]) -> Tensor:
    """Mean over the valid tokens of a group of each expert's probability to be in the token's top-k if the
    noise were drawn again [G, E] (see :func:`load_loss`); needs ``noise_std > 0``."""
    threshold = torch.topk(noisy_logits, top_k, dim=-1).values[..., -1:]  # [G, S, 1]
    # ndtr = standard normal CDF. Not torch.distributions.Normal: its argument validation syncs the host.
    p = 1.0 - torch.special.ndtr((threshold - logits) / noise_std)  # [G, S, E]
    if valid is None:
        return p.sum(dim=1) / _count(p.shape[1], p)
    return (p * valid.unsqueeze(-1)).sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp_min(1)


def balance_losses(per_group: list[Tensor], valid: Optional[Tensor]) -> Tensor:
    """``(std/mean)^2`` of each per-group value [G, E] in ``per_group``, averaged over the groups: one loss
    per entry [n]. Values of one dtype go through the reductions stacked, once for all (fewer kernels)."""
    if len({t.dtype for t in per_group}) > 1:  # mixed precision (autocast): each in its own dtype, as alone
        return torch.stack([_mean_over_groups(_cv_squared(t), valid) for t in per_group])
    stacked = torch.stack(per_group) if len(per_group) > 1 else per_group[0].unsqueeze(0)
    return _mean_over_groups(_cv_squared(stacked), valid)


def importance_loss(clean_probs: Tensor, valid: Optional[Tensor]) -> Tensor:
    """V-MoE importance loss: ``(std/mean)^2`` of each expert's summed clean gate probabilities, per group,
    averaged over groups (Riquelme et al. 2021, App. A.2). [G, S, E] -> scalar."""
    return _mean_over_groups(_cv_squared(importance_per_group(clean_probs, valid)[0]), valid)


def load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: float, top_k: int,
              valid: Optional[Tensor]) -> Tensor:
    """V-MoE load loss: for each token and expert, the probability that the expert would be in the top-k
    if the noise were drawn again: ``1 - Phi((threshold - logit) / noise_std)``, threshold = the token's
    k-th largest noisy logit; averaged over valid tokens per expert, ``(std/mean)^2`` per group, averaged
    over groups. Only defined with noise (training); returns 0 otherwise."""
    if noise_std <= 0:
        return logits.new_zeros(())
    return _mean_over_groups(_cv_squared(load_per_group(logits, noisy_logits, noise_std, top_k, valid)), valid)


def switch_loss(probs: Tensor, expert_index: Tensor, valid: Tensor) -> Tensor:
    """Switch / GShard balance loss ``E * sum_e f_e * P_e`` per group (f_e: fraction of valid tokens whose
    top-1 is e; P_e: mean router probability), averaged over groups. 1.0 when perfectly balanced."""
    E = probs.shape[-1]
    w = valid.unsqueeze(-1).to(probs.dtype)
    n = w.sum(dim=1).clamp_min(1.0)  # [G, 1]
    top1 = (expert_index[..., 0:1] == torch.arange(E, device=probs.device)).to(probs.dtype)  # one-hot, no host read
    frac = (top1 * w).sum(dim=1) / n
    mean_prob = (probs * w).sum(dim=1) / n
    return _mean_over_groups(E * (frac * mean_prob).sum(dim=-1), valid)


def z_loss(logits: Tensor, valid: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over valid tokens of ``logsumexp(logits)^2``."""
    z = torch.logsumexp(logits, dim=-1) ** 2
    return (z * valid).sum() / valid.sum().clamp_min(1)


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-20))).sum(dim=-1)


def local_entropy_loss(probs: Tensor, valid: Tensor) -> Tensor:
    """LIMoE local entropy: mean over the given tokens of the entropy of each token's routing
    distribution. Minimising it makes every token confident in few experts. [N, E], [N] -> scalar."""
    # No data-dependent branch (it would sync the host every step): 0 tokens give 0 / 1 = 0.
    n = valid.sum().clamp_min(1)
    return (_entropy(probs) * valid).sum() / n


def global_entropy_loss(probs: Tensor, valid: Tensor, min_experts: float = 1.0) -> Tensor:
    """LIMoE thresholded global entropy: ``max(0, tau - H(mean_t p_t))`` with ``tau = log(min_experts)``.

    Minimising ``-H`` of the modality's average routing distribution spreads the modality over experts;
    the threshold switches the loss off once it effectively uses at least ``min_experts`` experts.
    [N, E], [N] -> scalar."""
    n = valid.sum()
    mean_p = (probs * valid.unsqueeze(-1)).sum(dim=0) / n.clamp_min(1)
    tau = math.log(min_experts)
    loss = torch.clamp(tau - _entropy(mean_p), min=0.0)
    return torch.where(n > 0, loss, torch.zeros_like(loss))  # a modality absent from the batch adds nothing


def per_modality(loss_fn, probs: Tensor, valid: Tensor, modality: Optional[Tensor], num_modalities: int,
                 **kwargs) -> list[Tensor]:
    """Apply an entropy loss separately to the valid tokens of each modality id in [0, M)."""
    flat_probs = probs.reshape(-1, probs.shape[-1])
    flat_valid = valid.reshape(-1)
    if modality is None:
        return [loss_fn(flat_probs, flat_valid, **kwargs)]
    flat_mod = modality.reshape(-1)
    return [loss_fn(flat_probs, flat_valid & (flat_mod == m), **kwargs) for m in range(num_modalities)]
