"""Contrastive losses of the image-text tasks: symmetric InfoNCE / sigmoid with optional multi-positive targets
(:func:`contrastive_loss`) and SimCLR's NT-Xent between two views (:func:`nt_xent_loss`)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

def contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor,
                     logit_bias: Optional[Tensor] = None, kind: Literal["softmax", "sigmoid"] = "softmax",
                     positives: Optional[Tensor] = None) -> Tensor:
    """Contrastive loss of normalised image embeddings [N, D] and text embeddings [M, D].

    ``positives`` [N, M] bool marks matching pairs; None means M = N and text i belongs to image i. Every row
    and column needs at least one positive (several captions per image: M > N).

    ``kind="softmax"``: symmetric InfoNCE ``(CE(logits, y) + CE(logits.T, y)) / 2`` with
    ``logits = scale * img @ txt.T``, via open_clip's ``ClipLoss`` when the pairs are the only positives;
    otherwise the targets of each row / column are uniform over its positives.
    ``kind="sigmoid"``: SigLIP, ``-sum log sigmoid(z_ij * (scale * img_i . txt_j + bias)) / N`` with
    ``z = +1`` for positives, ``-1`` otherwise (open_clip's ``SigLipLoss`` for the pairs-only case).
    """
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"need image [N, D] and text [M, D] embeddings, got {tuple(image_embeds.shape)} "
                         f"and {tuple(text_embeds.shape)}")
    N, M = image_embeds.shape[0], text_embeds.shape[0]
    if positives is None and N != M:
        raise ValueError(f"{N} images and {M} texts: pass positives [N, M] saying which text belongs to which image")
    if positives is not None:
        positives = positives.to(torch.bool)
        if positives.shape != (N, M) or not positives.any(1).all() or not positives.any(0).all():
            raise ValueError(f"positives must be an [N={N}, M={M}] bool matrix with a positive in every row and column")
        if N == M and bool(positives.diagonal().all()) and int(positives.sum()) == N:
            positives = None  # only the pairs: the standard losses
    img, txt = image_embeds.float(), text_embeds.float()
    scale = logit_scale.float()
    if kind == "softmax":
        if positives is None:
            from open_clip.loss import ClipLoss

            return ClipLoss()(img, txt, scale)
        logits = scale * img @ txt.t()
        t = positives.float()
        return (F.cross_entropy(logits, t / t.sum(1, keepdim=True))
                + F.cross_entropy(logits.t(), t.t() / t.t().sum(1, keepdim=True))) / 2
    if kind == "sigmoid":
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs the model's logit_bias (config loss='sigmoid')")
        if positives is None:
            from open_clip.loss import SigLipLoss

            return SigLipLoss()(img, txt, scale, logit_bias.float())
        logits = scale * img @ txt.t() + logit_bias.float()
        z = positives.float() * 2 - 1
        return -F.logsigmoid(z * logits).sum() / N
    raise ValueError(f"unknown contrastive loss {kind!r}; expected 'softmax' or 'sigmoid'")


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR's NT-Xent loss (Chen et al. 2020; SLIP's ``SIMCLRLoss``) of two views ``z1``, ``z2`` [N, D] (row i
    of both = the same image; normalised here).

    With ``z = normalize(cat(z1, z2))`` [2N, D] and ``s_ij = z_i . z_j / temperature``, every one of the 2N rows
    is a softmax classification of its other view among the 2N - 1 other rows (the other view of itself and
    both views of every other image are the negatives; itself is excluded), averaged over the 2N rows:
    ``mean_i -log(exp(s_i,p(i)) / sum_{k != i} exp(s_ik))``. Unlike :func:`contrastive_loss`, which only contrasts
    across the two sets, the same-view pairs are negatives too.
    """
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
        raise ValueError(f"need two [N, D] views of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    N = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    logits = (z @ z.t()) / temperature
    logits = logits.masked_fill(torch.eye(2 * N, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(N, 2 * N), torch.arange(N)]).to(z.device)
    return F.cross_entropy(logits, target)


