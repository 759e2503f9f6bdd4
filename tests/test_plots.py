"""zoo.plots: what the figures say (axis labels, titles, colour-bar labels), read from the matplotlib objects."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import zoo.plots as plots
from zoo.tasks import routing_report
from zoo.tasks.routing_report import ModalityRoutingSummary


@pytest.fixture
def figures(monkeypatch):
    """The figures zoo.plots saves, kept open for inspection (the PNGs are still written)."""
    saved = []

    def keep(fig, path):
        saved.append(fig)
        fig.savefig(path)
        return Path(path)

    monkeypatch.setattr(plots, "save_figure", keep)
    yield saved
    for fig in saved:
        plots.plt.close(fig)


def test_training_curves_label_their_y_axes(tmp_path, figures):
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "train/loss", "val/loss", "train/acc", "val/acc"])
        for step in range(4):
            w.writerow([step, 2.0 - step * 0.1, 2.1 - step * 0.1, 0.1 * step, 0.1 * step])
    plots.plot_training_curves(path, tmp_path / "curves.png", title="vmoe_tiny_digits, run x: training")
    (fig,) = figures
    assert [(ax.get_title(), ax.get_ylabel(), ax.get_xlabel()) for ax in fig.axes] == [
        ("loss", "loss", "step"), ("accuracy", "accuracy", "step")]
    assert fig._suptitle.get_text() == "vmoe_tiny_digits, run x: training"


def test_modality_routing_titles_name_the_plot_and_colour_bars_the_quantity(tmp_path, figures):
    counts = torch.tensor([[[3.0, 1.0], [1.0, 3.0]]])  # [layers, modalities, experts]
    summary = ModalityRoutingSummary(layer_names=["block1"], counts=counts, mean_probs=counts / 4,
                                     token_entropy=torch.ones(1, 2), tokens=torch.full((1, 2), 4.0),
                                     modality_names=("image", "text"))
    routing_report.write_modality_routing_plots(summary, tmp_path, "routing_val", title="limoe_tiny_mnist (val)")
    titles = [fig._suptitle.get_text() if fig._suptitle else fig.axes[0].get_title() for fig in figures]
    assert titles == ["limoe_tiny_mnist (val): routing by modality", "limoe_tiny_mnist (val): expert mix",
                      "limoe_tiny_mnist (val): image tokens per expert",
                      "limoe_tiny_mnist (val): text tokens per expert"]
    assert figures[0].axes[0].get_xlabel() == "expert"  # top-k counts, not top-1
    colour_bars = {fig.axes[-1].get_ylabel() for fig in figures[:2]}
    assert colour_bars == {"share of the row's tokens",
                           "image share of the expert's tokens (1 = image only; modality-balanced)"}
    for title in titles:  # a colour bar's quantity is not repeated in the title
        assert not any(label in title for label in colour_bars)
