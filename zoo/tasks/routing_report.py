"""Routing reports of an evaluation pass, for any task: :class:`RoutingReport` collects, per MoE layer, what the
layer records about its own routing (``MoELayer.record_routing`` -> ``layer.last_routing``, a
:class:`~zoo.moe.RoutingRecord`, plus ``layer.aux.stats``, a :class:`~zoo.moe.RoutingStats`) after every forward of
the layer, and gives two views of it:

- :class:`RoutingSummary` (:meth:`RoutingReport.summary`): tokens per expert, dropped fraction, capacity and, when
  the task gives labels, the class-by-expert matrix of top-1 experts (classification, language modelling);
- :class:`ModalityRoutingSummary` (:meth:`RoutingReport.modality_summary`): per modality, tokens per expert, the
  router's per-token and global entropy, effective experts, image/text divergence (LIMoE's analysis).

The layers record (which costs a copy of the routing per forward) only between :meth:`RoutingReport.start` and
:meth:`RoutingReport.stop`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from zoo.moe import moe_layers
from zoo import plots
from zoo.plots import plot_expert_utilisation, plot_routing_matrix, plt  # plt: Agg backend set there
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

    def _image_text(self) -> tuple[Tensor, Tensor]:
        """``(image usage [L, E], text usage [L, E])``, found by modality name (LIMoE numbers image 0 / text 1, the
        multimodal LMs text 0 / image 1)."""
        names = list(self.modality_names)
        if "image" not in names or "text" not in names:
            raise ValueError(f"image-vs-text routing measures need 'image' and 'text' modalities, have {names}")
        u = self.usage()
        return u[:, names.index("image")], u[:, names.index("text")]

    def js_divergence(self) -> Tensor:
        """[L]: Jensen-Shannon divergence (bits, 0..1) between the image and the text usage."""
        p, q = self._image_text()
        m = (p + q) / 2
        kl = lambda a, b: (a * (a.clamp_min(1e-20) / b.clamp_min(1e-20)).log()).sum(-1)  # noqa: E731
        return ((kl(p, m) + kl(q, m)) / 2) / math.log(2)

    def image_share(self) -> Tensor:
        """[L, E]: of an expert's (modality-balanced) load, the image part: ``u_img / (u_img + u_txt)``; NaN
        for unused experts. 1 = image-only expert, 0 = text-only."""
        img, txt = self._image_text()
        total = img + txt
        return torch.where(total > 0, img / total.clamp_min(1e-12), torch.full_like(total, float("nan")))

    def specialised_experts(self, threshold: float = 0.9, min_usage: float = 0.01) -> dict[str, list[int]]:
        """Per layer, how many experts are image-specific (image share >= threshold), text-specific
        (<= 1 - threshold) or shared, among experts that receive >= ``min_usage`` of either modality."""
        share, (img, txt) = self.image_share(), self._image_text()
        used = (img >= min_usage) | (txt >= min_usage)
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


@dataclass
class RoutingSummary:
    """Routing of one evaluation pass, per MoE layer (index l in ``layer_names``).

    class_by_expert [L][num_classes, E]: tokens of examples of class c whose top-1 (clean) expert is e (empty
        when the pass had no labels).
    tokens_per_expert [L][E]: kept (token, expert) assignments per expert (all k choices, after capacity).
    dropped_fraction [L]: fraction of token slots dropped by capacity, weighted by tokens.
    capacity [L]: the largest per-group capacity seen (None when dropless).
    """

    layer_names: list[str]
    class_by_expert: list[Tensor] = field(default_factory=list)
    tokens_per_expert: list[Tensor] = field(default_factory=list)
    dropped_fraction: list[float] = field(default_factory=list)
    capacity: list[Optional[int]] = field(default_factory=list)
    num_examples: int = 0

    def shares(self) -> list[list[float]]:
        """Each layer's tokens-per-expert normalised to sum 1."""
        return [(t / t.sum().clamp_min(1e-12)).tolist() for t in self.tokens_per_expert]

    def as_dict(self) -> dict[str, Any]:
        return {
            name: {
                "dropped_fraction": self.dropped_fraction[i],
                "tokens_per_expert_share": self.shares()[i],
                "tokens_per_expert": self.tokens_per_expert[i].tolist(),
                "capacity": self.capacity[i],
            }
            for i, name in enumerate(self.layer_names)
        }


Reduce = Callable[[Tensor], Tensor]


class RoutingReport:
    """Sums the routing of every MoE layer of ``model`` over the forwards between :meth:`start` and :meth:`stop`.

    A forward hook on each layer reads the layer's public record right after it ran (so a model that runs a layer
    twice in one call, as LIMoE's image and text passes, is counted twice): ``layer.aux.stats`` for kept tokens per
    expert (overall and per modality), drops and capacity; ``layer.last_routing`` for the clean router
    probabilities (entropies, top-1 expert per class). ``num_classes``: set to count top-1 experts per class; the
    task then passes each batch's labels to :meth:`set_labels` before its forward.
    """

    def __init__(self, model: nn.Module, num_classes: Optional[int] = None) -> None:
        self.layers = moe_layers(model)
        self.layer_names = moe_layer_names(model)
        self.num_classes = num_classes
        L_ = len(self.layers)
        E = self.layers[0].config.num_experts if self.layers else 1
        M = max((layer.config.num_modalities for layer in self.layers), default=1)
        f64 = dict(dtype=torch.float64)
        self.tokens_per_expert = torch.zeros(L_, E, **f64)
        self.dropped = torch.zeros(L_, **f64)  # dropped fraction x valid tokens, summed
        self.valid_tokens = torch.zeros(L_, **f64)
        self.capacity: list[Optional[int]] = [None] * L_
        self.class_by_expert = torch.zeros(L_, num_classes or 0, E, **f64)
        self.counts_by_modality = torch.zeros(L_, M, E, **f64)
        self.prob_sum = torch.zeros(L_, M, E, **f64)
        self.entropy_sum = torch.zeros(L_, M, **f64)
        self.tokens_by_modality = torch.zeros(L_, M, **f64)
        self.num_examples = 0
        self._labels: Optional[Tensor] = None
        self._handles: list = []

    # ------------------------------------------------------------------------------------------ collecting
    def start(self) -> "RoutingReport":
        """Turn the layers' routing record on and collect after each of their forwards."""
        if self._handles:
            raise RuntimeError("RoutingReport.start() called twice without stop()")
        for i, layer in enumerate(self.layers):
            layer.record_routing = True
            self._handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def stop(self) -> None:
        """Remove the hooks and turn the record off (it copies the routing on every forward)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self.layers:
            layer.record_routing = False
            layer.last_routing = None

    def count_examples(self, n: int) -> None:
        """Add ``n`` examples to the pass's count (``RoutingSummary.num_examples``)."""
        self.num_examples += int(n)

    def set_labels(self, labels: Tensor) -> None:
        """Class ids ``[B]`` of the examples of the next forwards (and counts them: :meth:`count_examples`)."""
        if self.num_classes is None:
            raise ValueError("RoutingReport was made without num_classes; it counts no classes")
        self._labels = labels.detach().cpu().long()
        self.count_examples(labels.shape[0])

    def _hook(self, i: int):
        def hook(layer, args, output) -> None:  # noqa: ANN001
            record, aux = layer.last_routing, layer.aux
            if record is None or aux is None or aux.stats is None:  # empty batch: nothing routed
                return
            self._add(i, record, aux.stats)
        return hook

    def _add(self, i: int, record, stats) -> None:  # noqa: ANN001
        valid = record.valid.cpu()
        probs = record.probs.cpu().double()
        n_valid = float(valid.sum())
        self.tokens_per_expert[i] += stats.tokens_per_expert.detach().cpu().double()
        self.dropped[i] += float(stats.dropped_fraction) * n_valid
        self.valid_tokens[i] += n_valid
        if stats.capacity is not None:
            self.capacity[i] = max(self.capacity[i] or 0, int(stats.capacity))
        by_mod = stats.tokens_per_expert_by_modality.detach().cpu().double()
        self.counts_by_modality[i, : by_mod.shape[0]] += by_mod
        modality = torch.zeros_like(valid, dtype=torch.long) if record.modality is None else record.modality.cpu()
        entropy = _entropy(probs)
        for m in range(self.tokens_by_modality.shape[1]):
            sel = valid & (modality == m)
            self.prob_sum[i, m] += probs[sel].sum(0)
            self.entropy_sum[i, m] += entropy[sel].sum()
            self.tokens_by_modality[i, m] += float(sel.sum())
        if self.num_classes is not None:
            labels = self._labels
            if labels is None or labels.shape[0] != valid.shape[0]:
                raise ValueError(f"RoutingReport counts classes: call set_labels() with the {valid.shape[0]} labels "
                                 "of the batch before its forward")
            E = probs.shape[-1]
            top1 = probs.argmax(-1)
            cls = labels.unsqueeze(1).expand_as(top1)[valid]
            counts = torch.bincount(cls * E + top1[valid], minlength=self.num_classes * E)
            self.class_by_expert[i] += counts.reshape(self.num_classes, E).double()

    # --------------------------------------------------------------------------------------------- results
    def summary(self, reduce: Optional[Reduce] = None) -> RoutingSummary:
        """Tokens per expert, drops, capacity and (with labels) class-by-expert counts. ``reduce`` (tensor ->
        tensor summed across processes) is applied to every count."""
        red = reduce or (lambda t: t)
        L_ = len(self.layer_names)
        tokens = red(self.tokens_per_expert.clone())
        dropped, valid = red(self.dropped.clone()), red(self.valid_tokens.clone())
        n = int(red(torch.tensor(float(self.num_examples), dtype=torch.float64)))
        cbe = red(self.class_by_expert.clone()) if self.num_classes is not None else None
        return RoutingSummary(self.layer_names, [] if cbe is None else list(cbe.unbind()),
                              list(tokens.unbind()) if L_ else [], (dropped / valid.clamp_min(1)).tolist(),
                              list(self.capacity), n)

    def modality_summary(self, num_examples: int = 0) -> ModalityRoutingSummary:
        """Per modality: kept tokens per expert, mean router probabilities, per-token entropy, tokens seen."""
        tok = self.tokens_by_modality.clamp_min(1)
        return ModalityRoutingSummary(self.layer_names, self.counts_by_modality.clone(),
                                      self.prob_sum / tok.unsqueeze(-1), self.entropy_sum / tok,
                                      self.tokens_by_modality.clone(), num_examples=num_examples)


# --------------------------------------------------------------------------------- routing by modality
def plot_image_share(summary: ModalityRoutingSummary, path: str | Path, title: str = "") -> Path:
    """Heatmap [layers, experts] of :meth:`ModalityRoutingSummary.image_share` (1 = image-only expert,
    0 = text-only, grey = unused), annotated."""
    share = summary.image_share().numpy()
    L_, E = share.shape
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.5 * E, 16), 1.4 + 0.4 * L_))
    cmap = plt.get_cmap("coolwarm").copy()
    cmap.set_bad("lightgrey")
    im = ax.imshow(share, vmin=0, vmax=1, cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="image share of the expert's tokens (1 = image only; modality-balanced)")
    for i in range(L_):
        for e in range(E):
            if share[i, e] == share[i, e]:  # not NaN
                ax.text(e, i, f"{share[i, e]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(E))
    ax.set_yticks(range(L_), labels=summary.layer_names)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return plots.save_figure(fig, path)  # module attribute: tests keep the figures


def write_modality_routing_plots(summary: ModalityRoutingSummary, out_dir: str | Path, prefix: str = "routing",
                                 title: str = "") -> list[Path]:
    """PNG plots (drawn with ``zoo.plots``) of one :class:`ModalityRoutingSummary`:

    - ``<prefix>_by_modality.png``: rows = (layer, modality), columns = experts, each row the modality's share
      of tokens per expert (which experts image vs text tokens use, per layer);
    - ``<prefix>_expert_mix.png``: each expert's balanced image / text mix per layer (1 = image-only);
    - ``<prefix>_utilisation_<modality>.png``: per-layer bars of each modality's expert shares.
    """
    out_dir = Path(out_dir)
    if not summary.layer_names:
        return []
    L_, M, E = summary.counts.shape
    rows = [f"{name}/{mod}" for name in summary.layer_names for mod in summary.modality_names[:M]]
    paths = [plot_routing_matrix(summary.counts.reshape(L_ * M, E), rows, out_dir / f"{prefix}_by_modality.png",
                                 title=(title + ": " if title else "") + "routing by modality",
                                 normalize="row", row_label="layer / modality", col_label="expert")]  # top-k counts
    if M >= 2:
        paths.append(plot_image_share(summary, out_dir / f"{prefix}_expert_mix.png",
                                      (title + ": " if title else "") + "expert mix"))
    for m, mod in enumerate(summary.modality_names[:M]):
        paths.append(plot_expert_utilisation([summary.counts[i, m] for i in range(L_)], summary.layer_names,
                                             out_dir / f"{prefix}_utilisation_{mod}.png",
                                             title=(title + ": " if title else "") + f"{mod} tokens per expert"))
    return paths
