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
from typing import Optional, Union

import matplotlib


matplotlib.use("Agg")  # never needs a display; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PathLike = Union[str, os.PathLike]
ArrayLike = Union[np.ndarray, Sequence[float], "torch.Tensor"]  # noqa: F821 (torch optional here)


def _np(x: ArrayLike) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def save_figure(fig: plt.Figure, path: PathLike) -> Path:
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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)
