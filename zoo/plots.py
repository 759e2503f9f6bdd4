"""Matplotlib (Agg) figures for MoE runs, written as PNG files. General on purpose: every function takes plain
arrays and labels, so any family (V-MoE, LIMoE, language MoEs) can reuse them.

- :func:`plot_expert_utilisation`: per MoE layer, bars of each expert's share of the tokens, with the uniform 1/E line.
- :func:`plot_routing_matrix`: one layer's [rows, E] routing counts as a heatmap (rows = class names / modalities),
  row-normalised by default; :func:`plot_routing_matrices` writes one file per layer.
- :func:`plot_training_curves`: metrics over steps from a Lightning ``CSVLogger`` ``metrics.csv``.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import matplotlib

if TYPE_CHECKING:
    from zoo.tasks.routing_report import ModalityRoutingSummary

matplotlib.use("Agg")  # never needs a display; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PathLike = Union[str, os.PathLike]
ArrayLike = Union[np.ndarray, Sequence[float], "torch.Tensor"]  # noqa: F821 (torch optional here)


def _np(x: ArrayLike) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _save(fig: plt.Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "layer"


def plot_expert_utilisation(shares: Sequence[ArrayLike], layer_names: Sequence[str], path: PathLike,
                            title: Optional[str] = None, ylabel: str = "share of tokens") -> Path:
    """Bars of each expert's share of the tokens, one panel per MoE layer, with the uniform ``1/E`` line.

    Args:
        shares: per layer an array ``[E]`` (E may differ per layer); normalised here to sum 1.
        layer_names: panel titles, one per layer.
        path: the PNG to write.
    """
    if len(shares) != len(layer_names):
        raise ValueError(f"got {len(shares)} share arrays but {len(layer_names)} layer names")
    n = max(1, len(shares))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, share, name in zip(axes.flat, shares, layer_names):
        s = _np(share)
        s = s / s.sum() if s.sum() > 0 else s
        E = len(s)
        ax.bar(np.arange(E), s, color="tab:blue")
        if E:
            ax.axhline(1.0 / E, color="tab:red", linestyle="--", linewidth=1, label="uniform 1/E")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel(ylabel)
        ax.set_xticks(np.arange(E) if E <= 16 else np.linspace(0, E - 1, 9).round().astype(int))
        ax.set_ylim(0, max(1.0 / max(E, 1) * 1.5, float(s.max()) * 1.15 if E else 1.0))
    if len(shares):
        axes.flat[0].legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_routing_matrix(matrix: ArrayLike, row_names: Sequence[str], path: PathLike, title: Optional[str] = None,
                        normalize: Optional[str] = "row", row_label: str = "class",
                        col_label: str = "top-1 expert") -> Path:
    """Heatmap of a ``[R, E]`` routing-count matrix (rows = classes, modalities, ...; columns = experts).

    ``normalize``: ``"row"`` (default: each row's distribution over experts), ``"col"`` (each expert's mix of
    rows), or ``None`` (raw counts). Cells are annotated when the matrix is small.
    """
    m = _np(matrix)
    if m.ndim != 2:
        raise ValueError(f"matrix must be 2-D [rows, experts], got shape {m.shape}")
    if len(row_names) != m.shape[0]:
        raise ValueError(f"got {len(row_names)} row names for a matrix with {m.shape[0]} rows")
    if normalize == "row":
        m = m / np.clip(m.sum(1, keepdims=True), 1e-12, None)
        cbar = "share of the row's tokens"
    elif normalize == "col":
        m = m / np.clip(m.sum(0, keepdims=True), 1e-12, None)
        cbar = "share of the expert's tokens"
    elif normalize is None:
        cbar = "tokens"
    else:
        raise ValueError(f"normalize must be 'row', 'col' or None, got {normalize!r}")
    R, E = m.shape
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.45 * E, 16), min(1.5 + 0.32 * R, 20)))
    im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=cbar)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_xticks(np.arange(E) if E <= 32 else np.linspace(0, E - 1, 9).round().astype(int))
    if R <= 60:
        ax.set_yticks(np.arange(R), labels=[str(r) for r in row_names], fontsize=8)
    if R * E <= 400:
        vmax = m.max() if m.size else 1.0
        for r in range(R):
            for e in range(E):
                text = f"{m[r, e]:.2f}" if normalize else f"{int(m[r, e])}"
                ax.text(e, r, text, ha="center", va="center", fontsize=6,
                        color="black" if m[r, e] > 0.6 * vmax else "white")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_routing_matrices(matrices: Sequence[ArrayLike], row_names: Sequence[str], layer_names: Sequence[str],
                          out_dir: PathLike, prefix: str = "routing_matrix", **kwargs) -> list[Path]:
    """One :func:`plot_routing_matrix` PNG per layer: ``<out_dir>/<prefix>_<layer>.png``."""
    if len(matrices) != len(layer_names):
        raise ValueError(f"got {len(matrices)} matrices but {len(layer_names)} layer names")
    paths = []
    title_prefix = kwargs.pop("title", None) or "class-by-expert routing"
    for matrix, name in zip(matrices, layer_names):
        title = f"{title_prefix}, {name}"
        paths.append(plot_routing_matrix(matrix, row_names, Path(out_dir) / f"{prefix}_{_safe_name(name)}.png",
                                         title=title, **kwargs))
    return paths


def read_metrics_csv(path: PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{metric: (steps, values)}`` from a Lightning ``CSVLogger`` metrics.csv (rows missing a metric skipped)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, tuple[list, list]] = {}
    for row in rows:
        step = row.get("step")
        if step in (None, ""):
            continue
        for key, value in row.items():
            if key in ("step", "epoch") or value in (None, ""):
                continue
            try:
                v = float(value)
            except ValueError:
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(float(step))
            ys.append(v)
    return {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in series.items()}


def default_curve_groups(metric_names: Sequence[str]) -> dict[str, list[str]]:
    """Panels for :func:`plot_training_curves`: total losses, accuracies, learning rate, and the aux loss."""
    names = sorted(metric_names)
    groups = {
        "loss": [n for n in names if re.fullmatch(r"(train|val|test)/loss(_epoch|_step)?", n)],
        "accuracy": [n for n in names if re.fullmatch(r"(train|val|test)/acc(_top5)?(_epoch|_step)?", n)],
        "aux loss": [n for n in names if re.fullmatch(r"(train|val)/aux_loss(_epoch|_step)?", n)],
        "learning rate": [n for n in names if n.startswith("lr") or "lr-" in n or n.endswith("/lr")],
    }
    return {k: v for k, v in groups.items() if v}


def plot_training_curves(metrics_csv: PathLike, path: PathLike, groups: Optional[dict[str, list[str]]] = None,
                         title: Optional[str] = None) -> Path:
    """Metric curves over optimiser steps, one panel per group (default :func:`default_curve_groups`).

    Args:
        metrics_csv: a ``CSVLogger`` metrics.csv (columns ``step`` and one per metric).
        groups: ``{panel title: [metric names]}``.
    """
    series = read_metrics_csv(metrics_csv)
    groups = groups or default_curve_groups(list(series))
    groups = {k: [n for n in v if n in series] for k, v in groups.items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        raise ValueError(f"no plottable metrics in {metrics_csv}; columns: {sorted(series)}")
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2), squeeze=False)
    for ax, (panel, names) in zip(axes.flat, groups.items()):
        for name in names:
            x, y = series[name]
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, linewidth=1.2, label=name)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------- routing by modality
def plot_image_share(summary: "ModalityRoutingSummary", path: str | Path, title: str = "") -> Path:
    """Heatmap [layers, experts] of :meth:`ModalityRoutingSummary.image_share` (1 = image-only expert,
    0 = text-only, grey = unused), annotated."""
    from zoo.plots import plt  # Agg backend set there

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
    return _save(fig, path)


def write_modality_routing_plots(summary: "ModalityRoutingSummary", out_dir: str | Path, prefix: str = "routing",
                                 title: str = "") -> list[Path]:
    """PNG plots (``zoo.plots``) of one :class:`ModalityRoutingSummary`:

    - ``<prefix>_by_modality.png``: rows = (layer, modality), columns = experts, each row the modality's share
      of tokens per expert (which experts image vs text tokens use, per layer);
    - ``<prefix>_expert_mix.png``: each expert's balanced image / text mix per layer (1 = image-only);
    - ``<prefix>_utilisation_<modality>.png``: per-layer bars of each modality's expert shares.
    """
    from zoo.plots import plot_expert_utilisation, plot_routing_matrix

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
