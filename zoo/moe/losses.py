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


def target_expert_loss(probs: Tensor, valid: Tensor, modality: Optional[Tensor], targets: Tensor) -> Tensor:
    """Uni-MoE v2's per-modality target-expert loss: pull each token's routing distribution towards a fixed
    multi-hot target of its modality's designated experts, with an L1 distance.

    For group g with ``N_g`` valid tokens, token t of modality ``m_t`` and clean router probabilities ``p_t`` [E]::

        L_g = sum over valid t whose modality has targets of  sum_e |p_t[e] - targets[m_t, e]|  /  (E * N_g)

    i.e. for each modality the mean absolute error over its tokens and the E experts, weighted by the modality's
    share of the group's valid tokens, summed over modalities; modalities with an all-zero target row (text in
    Uni-MoE v2) contribute nothing. The loss is the mean of ``L_g`` over the groups that hold a valid token.

    Args:
        probs: [G, S, E] clean router probabilities (the gradient reaches the router through them).
        valid: [G, S] bool.
        modality: [G, S] ids in [0, M), or None (every token is modality 0).
        targets: [M, E] float, 1 at each modality's target experts, 0 elsewhere (an all-zero row: no target).
    Returns: scalar.

    Where the zoo differs on purpose from the official training code: the modality share is over the group's
    valid tokens (the official divides by the padded sequence length, so padding shrinks the loss); the per-group
    values are averaged (the official sums one value per sample, so the loss grows with the batch size). In a causal
    layer a group is one sequence, the official's sample.
    """
    E = probs.shape[-1]
    mods = torch.zeros_like(valid, dtype=torch.long) if modality is None else modality
    target = targets.to(probs.dtype)[mods]  # [G, S, E]
    has_target = (targets > 0).any(dim=-1)[mods] & valid  # [G, S]
    per_token = (probs - target).abs().sum(dim=-1) * has_target  # [G, S]
    n = valid.sum(dim=1).clamp_min(1)  # [G]
    return _mean_over_groups(per_token.sum(dim=1) / (n * E), valid)


def modality_mean_probs(probs: Tensor, valid: Tensor, modality: Tensor, num_modalities: int) -> tuple[Tensor, Tensor]:
    """Mean routing distribution of each modality in each group [G, M, E] (0 where absent) and whether the modality
    has a valid token there [G, M] bool. Products summed, not a GEMM (bookkeeping)."""
    sel = valid.unsqueeze(-1) & (modality.unsqueeze(-1) == torch.arange(num_modalities, device=modality.device))
    sel = sel.to(probs.dtype)  # [G, S, M]
    sums = (sel.unsqueeze(-1) * probs.unsqueeze(2)).sum(dim=1)  # [G, M, E]
    counts = sel.sum(dim=1)  # [G, M]
    return sums / counts.clamp_min(1).unsqueeze(-1), counts > 0


def cross_modality_kl_loss(probs: Tensor, valid: Tensor, modality: Tensor, pairs: Tensor,
                           num_modalities: int) -> Tensor:
    """Uni-MoE v2's cross-modality KL loss: drive the mean routing distributions of different modalities apart.

    Per group g and modality m with valid tokens: ``q_gm`` = mean of the clean router probabilities over those
    tokens [E]. For each listed pair (a, b) with both modalities present in the group::

        term = 1 - KL(softmax(q_gb) || softmax(q_ga)) / E

    (as the official code computes it: a softmax taken over the mean PROBABILITIES, which flattens them, and the KL
    divided by E, its "batchmean" over the single E-vector). Minimising ``1 - KL`` maximises the divergence, so the
    modalities come to prefer different experts; the constant 1 only shifts the reported value. Per group the terms
    of the present pairs are averaged; the loss is the mean over the groups with at least one present pair, 0 when
    no group has one (e.g. a text-only batch).

    Args:
        probs: [G, S, E] clean router probabilities; valid: [G, S] bool; modality: [G, S] ids in [0, M).
        pairs: [P, 2] long, (a, b) modality ids.
    Returns: scalar.

    Where the zoo differs on purpose: the pairs are configurable (the official fixes image-audio, image-text,
    audio-text, audio-video, video-text; ``MoEConfig.cross_modality_kl_pairs`` None = every pair a < b); padding is
    no modality (the official counts text spans only, as here); groups are averaged, not summed over samples.
    """
    E = probs.shape[-1]
    q, present = modality_mean_probs(probs, valid, modality, num_modalities)  # [G, M, E], [G, M]
    log_s = torch.log_softmax(q, dim=-1)
    a, b = pairs[:, 0], pairs[:, 1]
    kl = (log_s[:, b].exp() * (log_s[:, b] - log_s[:, a])).sum(dim=-1)  # [G, P]
    both = present[:, a] & present[:, b]  # [G, P]
    per_group = ((1.0 - kl / E) * both).sum(dim=-1) / both.sum(dim=-1).clamp_min(1)  # [G]
    has_pair = both.any(dim=-1)
    return (per_group * has_pair).sum() / has_pair.sum().clamp_min(1)
