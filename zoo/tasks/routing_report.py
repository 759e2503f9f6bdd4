"""Routing by modality of an evaluation pass: per MoE layer, how many image / text tokens each expert got, the
router's per-token entropy per modality, how many experts each modality effectively uses and how differently the
two modalities route (Jensen-Shannon divergence). :class:`ModalityRoutingAccumulator` collects it during the
pass, :class:`ModalityRoutingSummary` holds the result."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from zoo.moe import MoELayer
from zoo.tasks.base import moe_layer_names

MODALITY_NAMES = ("image", "text")

def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    return -(p * p.clamp_min(1e-20).log()).sum(dim)


@dataclass
class ModalityRoutingSummary:
    """How each MoE layer routed each modality during one evaluation pass (index l of ``layer_names``).

    counts [L, M, E]: kept top-k assignments of modality m's tokens to expert e.
    mean_probs [L, M, E]: the router's mean (clean) probability per expert over modality m's valid tokens.
    token_entropy [L, M]: mean per-token router entropy (nats) over modality m's valid tokens (the LIMoE
        local entropy).
    tokens [L, M]: valid tokens seen.
    num_examples: images in the pass (0 when unknown).
    """

    layer_names: list[str]
    counts: Tensor
    mean_probs: Tensor
    token_entropy: Tensor
    tokens: Tensor
    modality_names: tuple[str, ...] = MODALITY_NAMES
    num_examples: int = 0

    def usage(self) -> Tensor:
        """[L, M, E]: each modality's distribution of kept assignments over experts."""
        return self.counts / self.counts.sum(-1, keepdim=True).clamp_min(1e-12)

    def effective_experts(self) -> Tensor:
        """[L, M]: ``exp(H(usage))``, the number of experts a modality effectively uses (1..E)."""
        return _entropy(self.usage()).exp()

    def global_entropy(self) -> Tensor:
        """[L, M]: entropy of the mean router distribution (the LIMoE global entropy), nats."""
        return _entropy(self.mean_probs)

    def js_divergence(self) -> Tensor:
        """[L]: Jensen-Shannon divergence (bits, 0..1) between the image and the text usage."""
        u = self.usage()
        p, q = u[:, 0], u[:, 1]
        m = (p + q) / 2
        kl = lambda a, b: (a * (a.clamp_min(1e-20) / b.clamp_min(1e-20)).log()).sum(-1)  # noqa: E731
        return ((kl(p, m) + kl(q, m)) / 2) / math.log(2)

    def image_share(self) -> Tensor:
        """[L, E]: of an expert's (modality-balanced) load, the image part: ``u_img / (u_img + u_txt)``; NaN
        for unused experts. 1 = image-only expert, 0 = text-only."""
        u = self.usage()
        total = u[:, 0] + u[:, 1]
        return torch.where(total > 0, u[:, 0] / total.clamp_min(1e-12), torch.full_like(total, float("nan")))

    def specialised_experts(self, threshold: float = 0.9, min_usage: float = 0.01) -> dict[str, list[int]]:
        """Per layer, how many experts are image-specific (image share >= threshold), text-specific
        (<= 1 - threshold) or shared, among experts that receive >= ``min_usage`` of either modality."""
        share, u = self.image_share(), self.usage()
        used = (u[:, 0] >= min_usage) | (u[:, 1] >= min_usage)
        img = ((share >= threshold) & used).sum(-1).tolist()
        txt = ((share <= 1 - threshold) & used).sum(-1).tolist()
        both = (used.sum(-1) - torch.tensor(img) - torch.tensor(txt)).tolist()
        return {"image_only": img, "text_only": txt, "shared": both}

    def as_dict(self) -> dict[str, Any]:
        eff, ent, glob, js = self.effective_experts(), self.token_entropy, self.global_entropy(), self.js_divergence()
        spec = self.specialised_experts()
        out: dict[str, Any] = {}
        for i, name in enumerate(self.layer_names):
            out[name] = {
                "js_divergence_bits": round(float(js[i]), 4),
                "image_only_experts": spec["image_only"][i],
                "text_only_experts": spec["text_only"][i],
                "shared_experts": spec["shared"][i],
                "image_share_per_expert": [None if math.isnan(v) else round(v, 3) for v in self.image_share()[i].tolist()],
            }
            for m, mod in enumerate(self.modality_names):
                out[name][mod] = {
                    "usage": [round(v, 4) for v in self.usage()[i, m].tolist()],
                    "effective_experts": round(float(eff[i, m]), 3),
                    "token_entropy": round(float(ent[i, m]), 4),
                    "global_entropy": round(float(glob[i, m]), 4),
                    "tokens": int(self.tokens[i, m]),
                }
        return out

    def means(self) -> dict[str, float]:
        """Layer-averaged headline numbers (for logging and reports)."""
        eff, ent = self.effective_experts().mean(0), self.token_entropy.mean(0)
        spec = self.specialised_experts()
        out = {"js_divergence_bits": float(self.js_divergence().mean()),
               "image_only_experts": float(sum(spec["image_only"])) / max(1, len(self.layer_names)),
               "text_only_experts": float(sum(spec["text_only"])) / max(1, len(self.layer_names))}
        for m, mod in enumerate(self.modality_names):
            out[f"effective_experts_{mod}"] = float(eff[m])
            out[f"token_entropy_{mod}"] = float(ent[m])
        return out


class ModalityRoutingAccumulator:
    """Sums routing statistics per layer and modality over evaluation batches.

    Counts come from :class:`~zoo.moe.RoutingStats` (``tokens_per_expert_by_modality``); the router's
    probabilities (for the entropies) from hooks on each :class:`MoELayer` while :meth:`attach` -ed.
    """

    def __init__(self, model: nn.Module, num_modalities: int = 2) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.layer_names = moe_layer_names(model)
        L_, M = len(self.layers), num_modalities
        E = self.layers[0].config.num_experts if self.layers else 1
        self.counts = torch.zeros(L_, M, E, dtype=torch.float64)
        self.prob_sum = torch.zeros(L_, M, E, dtype=torch.float64)
        self.entropy_sum = torch.zeros(L_, M, dtype=torch.float64)
        self.tokens = torch.zeros(L_, M, dtype=torch.float64)
        self._handles: list = []
        self._modality: dict[int, Optional[Tensor]] = {}

    def attach(self) -> "ModalityRoutingAccumulator":
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self._handles.append(layer.router.register_forward_hook(self._router_hook(i)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre_hook(self, i: int):
        def hook(module, args, kwargs):  # noqa: ANN001
            mod = kwargs.get("modality", args[2] if len(args) > 2 else None)
            self._modality[i] = None if mod is None else mod.detach()
        return hook

    def _router_hook(self, i: int):
        def hook(module, args, output):  # noqa: ANN001
            probs = getattr(output, "clean_probs", None)
            if probs is None:
                return
            valid = args[1].reshape(-1)
            p = probs.detach().reshape(-1, probs.shape[-1]).double()
            mod = self._modality.get(i)
            flat_mod = torch.zeros_like(valid, dtype=torch.long)
            if mod is not None:  # grouping pads whole sequences at the end of the batch
                m = mod.reshape(-1)
                flat_mod[: m.numel()] = m
            ent = _entropy(p)
            for m_id in range(self.counts.shape[1]):
                sel = (valid & (flat_mod == m_id)).cpu()
                if sel.any():
                    self.prob_sum[i, m_id] += p.cpu()[sel].sum(0)
                    self.entropy_sum[i, m_id] += ent.cpu()[sel].sum()
                    self.tokens[i, m_id] += float(sel.sum())
        return hook

    def update(self, routing: Sequence) -> None:
        for i, stats in enumerate(routing[: len(self.layers)]):
            self.counts[i] += stats.tokens_per_expert_by_modality.detach().cpu().double()

    def summary(self) -> ModalityRoutingSummary:
        tok = self.tokens.clamp_min(1)
        return ModalityRoutingSummary(self.layer_names, self.counts.clone(), self.prob_sum / tok.unsqueeze(-1),
                                      self.entropy_sum / tok, self.tokens.clone())


