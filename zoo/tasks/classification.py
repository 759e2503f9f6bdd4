"""Image classification with any zoo model: the V-MoE training recipe as a LightningModule.

    images [B, C, H, W] -> model (a preset from ``zoo.create_model``) -> ModelOutput(logits [B, K], aux_loss, routing)
    loss = cross_entropy(logits, labels, label_smoothing) + aux_loss

Logged (``/``-separated names, one CSV column each):

- ``{train,val,test}/loss`` (total), ``/ce``, ``/aux_loss``, ``/aux/<name>`` (each auxiliary loss summed over
  layers), ``val|test/acc`` and ``/acc_top5`` (when there are more than 5 classes), ``train/acc`` (batch top-1);
- per MoE layer ``<split>/moe/<layer>/dropped`` (fraction of token slots over capacity), ``/max_share`` and
  ``/min_share`` (largest / smallest expert's share of the kept assignments; uniform = 1/E) and ``/capacity``.

``test`` also fills :attr:`ImageClassificationTask.test_routing` (a :class:`~zoo.tasks.routing_report.RoutingSummary`
from a :class:`~zoo.tasks.routing_report.RoutingReport`): per MoE layer the [num_classes, E] count of tokens whose
top-1 expert is e among images of class c, the tokens each expert kept, and the dropped fraction, for :mod:`zoo.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union, Any, Optional

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from zoo.models.output import ModelOutput
from zoo.factory import create_model
from zoo.tasks.base import ZooTask, fill_from_datamodule, moe_layer_names
from zoo.tasks.routing_report import RoutingReport, RoutingSummary  # noqa: F401 (RoutingSummary re-exported)

# Model config keys the datamodule decides (so one recipe works on any dataset).
DATA_DIMS = ("num_classes", "in_chans", "image_size")


def tokens_by_image(top1: Tensor, batch: int, seq_len: Optional[int] = None) -> Tensor:
    """``RoutingStats.top1_expert`` as ``[B, S]``. The MoE layer routes groups of images (padding the batch to a
    multiple of the group size with invalid sequences), so the stats come as ``[G, group * S]``; they are cut
    back to images here (``seq_len`` = S, needed unless ``top1`` is already ``[B, S]``)."""
    if seq_len is None:
        if top1.ndim == 2 and top1.shape[0] == batch:
            return top1
        raise ValueError(f"need seq_len to split top1_expert of shape {tuple(top1.shape)} into {batch} images")
    flat = top1.reshape(-1)
    if flat.numel() % seq_len or flat.numel() // seq_len < batch:
        raise ValueError(f"top1_expert of shape {tuple(top1.shape)} does not hold {batch} images of {seq_len} tokens")
    return flat.reshape(-1, seq_len)[:batch]


def write_routing_plots(task: "ImageClassificationTask", class_names: list[str], out_dir: Path,
                        title: str = "") -> list[str]:
    """Expert utilisation + class-by-expert matrices of ``task.test_routing`` into ``out_dir``. ``title`` names
    the run or evaluation (the utilisation figure is titled ``"<title>: expert utilisation"``)."""
    from zoo.plots import plot_expert_utilisation, plot_routing_matrices

    routing = task.test_routing
    if routing is None or not routing.layer_names:
        return []
    names = class_names if len(class_names) == task.num_classes else [str(i) for i in range(task.num_classes)]
    paths = [plot_expert_utilisation(routing.tokens_per_expert, routing.layer_names,
                                     out_dir / "expert_utilisation.png",
                                     title=f"{title}: expert utilisation" if title else None)]
    paths += plot_routing_matrices(routing.class_by_expert, names, routing.layer_names, out_dir)
    return [str(p) for p in paths]


class ImageClassificationTask(ZooTask):
    """Train / evaluate a zoo model on image classification (the V-MoE recipe).

    Args:
        model: preset name for :func:`zoo.create_model` (e.g. ``"vmoe_tiny_digits"``, ``"vmoe_s32"``).
        model_overrides: changes to the preset's config, nested dicts or dotted keys
            (``{"encoder": {"moe": {"num_experts": 8}}}`` or ``{"encoder.depth": 6}``).
        num_classes, in_chans, image_size: the input/output geometry. ``None`` = taken from the datamodule in
            :meth:`take_from_datamodule` (``train.py`` calls it as soon as the datamodule exists), else the
            preset's values.
        label_smoothing: of the cross entropy.
        pretrained: start from published weights: ``True`` (the preset's default tag), a tag, ``"hf-hub:ORG/REPO"``
            or ``"local-dir:PATH"`` (see :func:`zoo.create_model`); fine-tune with ``--model.pretrained mnist``.
        **shared: the optimiser, LR schedule and eval-time routing every task takes (:class:`ZooTask`,
            :class:`zoo.tasks.optim.OptimizerConfig`); defaults: ``OptimizerConfig()``.
    """

    def __init__(
        self,
        model: str = "vmoe_tiny_digits",
        model_overrides: Optional[dict[str, Any]] = None,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        image_size: Optional[int] = None,
        label_smoothing: float = 0.0,
        pretrained: Optional[Union[bool, str]] = None,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.model = self._build_model()
        self._init_metrics()
        self.test_routing: Optional[RoutingSummary] = None
        self._routing_report: Optional[RoutingReport] = None

    # ------------------------------------------------------------------------------------------ model
    def _build_model(self) -> nn.Module:
        hp = self.hparams
        overrides = dict(hp.model_overrides or {})
        for key in DATA_DIMS:
            if hp.get(key) is not None:
                overrides[key] = hp[key]
        model = create_model(hp.model, pretrained=hp.get("pretrained"), **overrides)
        self.apply_eval_routing(model)
        self._layer_names = moe_layer_names(model)
        return model

    @property
    def layer_names(self) -> list[str]:
        return self._layer_names

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_classes)

    def take_from_datamodule(self, dm: Any) -> None:
        """Take ``num_classes`` / ``in_chans`` / ``image_size`` from the datamodule where they were not given.

        A value given explicitly that disagrees with the datamodule is an error. The model is rebuilt (before any
        weights are loaded or optimisers made) only when the datamodule needs other values than the preset's."""
        rebuild = fill_from_datamodule(self.hparams, DATA_DIMS, dm, self.model.config, "model")
        if rebuild:
            self.model = self._build_model()
            self._init_metrics()

    def forward(self, images: Tensor) -> ModelOutput:
        return self.model(images)

    # ---------------------------------------------------------------------------------------- steps
    def _init_metrics(self) -> None:
        def make() -> nn.ModuleDict:
            metrics = {"acc": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
            if self.num_classes > 5:
                metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
            return nn.ModuleDict(metrics)

        self.val_metrics, self.test_metrics = make(), make()

    def _metrics(self, split: str) -> nn.ModuleDict:
        return self.val_metrics if split == "val" else self.test_metrics

    def _shared_step(self, batch: Any, split: str) -> tuple[Tensor, ModelOutput, Tensor]:
        images, labels = batch
        out = self(images)
        ce = F.cross_entropy(out.logits.float(), labels, label_smoothing=self.hparams.label_smoothing)
        aux = out.aux_loss.to(ce.dtype)
        loss = ce + aux
        self.log_losses_and_routing(split, loss, ce, aux, out, batch_size=labels.shape[0])
        return loss, out, labels

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, out, labels = self._shared_step(batch, "train")
        acc = (out.logits.detach().argmax(-1) == labels).float().mean()
        self.log("train/acc", acc, on_step=True, on_epoch=False, batch_size=labels.shape[0])
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: Any, split: str) -> ModelOutput:
        _, out, labels = self._shared_step(batch, split)
        for key, metric in self._metrics(split).items():
            metric(out.logits.detach(), labels)
            self.log(f"{split}/{key}", metric, on_step=False, on_epoch=True, prog_bar=key == "acc")
        return out

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_test_epoch_start(self) -> None:
        self._routing_report = RoutingReport(self.model, num_classes=self.num_classes).start()
        self.test_routing = None

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if self._routing_report is not None:
            self._routing_report.set_labels(batch[1])
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        report, self._routing_report = self._routing_report, None
        if report is None:
            return
        report.stop()
        self.test_routing = report.summary(self.cross_process_sum())

    # optimiser and LR schedule: RecipeOptimizerMixin (zoo/tasks/optim.py); checkpoint records: ZooTask

    def write_test_plots(self, out_dir: str | Path, title: str = "",
                         class_names: Optional[list[str]] = None) -> list[str]:
        """Expert utilisation + class-by-expert routing matrices of the last test pass (:func:`write_routing_plots`)."""
        return write_routing_plots(self, self.class_names_for_plots(class_names), Path(out_dir), title=title)
