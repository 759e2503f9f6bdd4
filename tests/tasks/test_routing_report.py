"""RoutingReport: the one routing report of every task, built on the MoE layer's public record."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo.moe import MoEConfig, MoELayer
from zoo.tasks.routing_report import RoutingReport


class _TwoPass(nn.Module):
    """One MoE layer run twice per call, as LIMoE runs its encoder once per modality."""

    def __init__(self) -> None:
        super().__init__()
        cfg = MoEConfig(num_experts=4, top_k=2, group_size=2, capacity_factor=1.0, num_modalities=2)
        self.moe = MoELayer(8, 12, cfg).eval()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, modalities: list[torch.Tensor]) -> list:
        records = []
        for modality in modalities:
            self.moe(x, mask, modality)
            records.append((self.moe.last_routing, self.moe.aux.stats))
        return records


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    return x, mask


def test_report_records_only_while_collecting():
    model = _TwoPass()
    x, mask = _inputs()
    report = RoutingReport(model)
    assert model.moe.record_routing is False
    report.start()
    assert model.moe.record_routing is True
    model(x, mask, [torch.zeros(3, 5, dtype=torch.long)])
    report.stop()
    assert model.moe.record_routing is False and model.moe.last_routing is None
    seen = report.tokens_by_modality.clone()
    model(x, mask, [torch.zeros(3, 5, dtype=torch.long)])  # after stop: not counted
    assert torch.equal(report.tokens_by_modality, seen) and model.moe.last_routing is None
    with pytest.raises(RuntimeError, match="twice"):
        report.start().start()


def test_report_counts_every_run_of_a_layer_by_modality_and_class():
    model = _TwoPass()
    x, mask = _inputs()
    image, text = torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)
    labels = torch.tensor([2, 0, 2])
    report = RoutingReport(model, num_classes=3).start()
    report.set_labels(labels)
    (rec_img, st_img), (rec_txt, st_txt) = model(x, mask, [image, text])
    report.stop()
    n_valid = float(mask.sum())
    # both passes counted, each as its modality
    torch.testing.assert_close(report.tokens_by_modality[0], torch.tensor([n_valid, n_valid], dtype=torch.float64))
    want_counts = (st_img.tokens_per_expert_by_modality + st_txt.tokens_per_expert_by_modality).double()
    torch.testing.assert_close(report.counts_by_modality[0], want_counts)
    summary = report.modality_summary(num_examples=3)
    want_mean = rec_txt.probs[mask].double().mean(0)
    torch.testing.assert_close(summary.mean_probs[0, 1], want_mean)
    p = rec_img.probs[mask].double()
    torch.testing.assert_close(summary.token_entropy[0, 0], -(p * p.log()).sum(-1).mean())
    # class-by-expert: top-1 clean expert of each valid token, per label, over both passes
    cbe = torch.zeros(3, 4, dtype=torch.float64)
    for rec in (rec_img, rec_txt):
        top1 = rec.probs.argmax(-1)
        for b in range(3):
            for s in range(5):
                if mask[b, s]:
                    cbe[labels[b], top1[b, s]] += 1
    routing = report.summary()
    torch.testing.assert_close(routing.class_by_expert[0], cbe)
    torch.testing.assert_close(routing.tokens_per_expert[0],
                               (st_img.tokens_per_expert + st_txt.tokens_per_expert).double())
    want_dropped = (float(st_img.dropped_fraction) + float(st_txt.dropped_fraction)) / 2
    assert routing.dropped_fraction[0] == pytest.approx(want_dropped)
    assert routing.num_examples == 3 and routing.layer_names == ["moe"]


def test_report_needs_the_labels_of_each_batch():
    model = _TwoPass()
    x, mask = _inputs()
    report = RoutingReport(model, num_classes=3).start()
    with pytest.raises(ValueError, match="call set_labels"):
        model(x, mask, [torch.zeros(3, 5, dtype=torch.long)])
    report.stop()
    with pytest.raises(ValueError, match="without num_classes"):
        RoutingReport(model).set_labels(torch.zeros(3, dtype=torch.long))
