"""Contrastive image-text training (LIMoE, or any dual encoder with the same interface) as a LightningModule.

    batch {"image", "text", "label"} -> model(images, text) -> normalised image / text embeddings
    loss = symmetric InfoNCE (softmax, CLIP; open_clip's ClipLoss) or sigmoid (SigLIP) + model aux loss

The loss kind and the learned temperature (and SigLIP bias) belong to the model (``model.config.loss``,
``model.scale_and_bias()``). ``positives="labels"`` treats every pair of items with the same ``label`` as
positive (multi-positive InfoNCE / sigmoid targets): class-caption data has many captions of one class per
batch, which plain InfoNCE would push apart as negatives.

Optional self-supervision on the same photos and captions (off by default; for tiny image-text sets such as the
Flickr8k 1k subset, where contrastive training from scratch plateaus): ``image_ssl_weight`` adds SLIP's SimCLR
loss between two augmented views of each image (:func:`nt_xent_loss`), ``text_ssl_weight`` an InfoNCE loss
between two captions of the same image (DeCLIP-style multi-view supervision); see :class:`ContrastiveTask`.
The datamodule supplies the views (``image_views=2`` / ``text_views=2`` of the caption datamodules).

Evaluation (val / test), from the datamodule (:mod:`zoo.data.image_text`):

- zero-shot classification when it has ``class_names`` and ``zero_shot_templates``: class embedding = the
  normalised mean of the normalised prompt embeddings (CLIP prompt ensembling); top-1 accuracy
  (torchmetrics) of ``argmax_c image . class_c`` -> ``<split>/zero_shot_acc`` (+ ``_top5`` with > 5 classes);
  accuracies and recalls are fractions in [0, 1], as every task's logged metrics;
- retrieval when batches carry all captions of each image (``"text" [B, K, L]`` + ``"num_captions"``):
  image->text and text->image recall@K -> ``<split>/i2t_R@K``, ``<split>/t2i_R@K`` (an image->text hit is
  any of the image's captions in the top K);
- the contrastive loss on single-caption batches -> ``<split>/loss``;
- routing by modality (:class:`ModalityRoutingSummary`): per MoE layer, how many image / text tokens each
  expert got, the router's mean per-token entropy per modality, how many experts each modality effectively
  uses and how differently the two modalities route (Jensen-Shannon divergence). PNG plots (``zoo.plots``)
  of a test pass from :meth:`ContrastiveTask.write_test_plots` (``train.py`` / ``eval.py`` call it), or on their
  own after every test when ``plot_dir`` is given and after every validation with ``plot_val``.

Evaluation gathers embeddings in one process (retrieval needs all of them); run it on one device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from zoo.factory import create_model
from zoo.tasks.base import ZooTask, fill_from_datamodule, moe_layer_names
from zoo.tasks.optim import OptimizerConfig

# Model config keys the datamodule decides (the task takes them in take_from_datamodule()).
DATA_DIMS = ("in_chans", "image_size", "context_length")

from zoo.tasks.routing_report import plot_image_share, write_modality_routing_plots  # noqa: E402,F401 (re-exported)
from zoo.tasks.losses import contrastive_loss, nt_xent_loss  # noqa: E402,F401 (re-exported)
from zoo.tasks.retrieval import retrieval_chance, retrieval_recall, zero_shot_classifier  # noqa: E402,F401
from zoo.tasks.routing_report import MODALITY_NAMES, ModalityRoutingSummary, RoutingReport  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------- task
@dataclass
class _EvalState:
    image_embeds: list[Tensor] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)
    text_embeds: list[Tensor] = field(default_factory=list)
    text_owner: list[Tensor] = field(default_factory=list)
    num_images: int = 0
    classifier: Optional[Tensor] = None
    routing: Optional[RoutingReport] = None


class ContrastiveTask(ZooTask):
    """Contrastive image-text training of a zoo dual encoder (LIMoE) with zero-shot / retrieval evaluation.

    Args:
        model: preset name for :func:`zoo.create_model` (e.g. ``"limoe_tiny_mnist"``).
        model_overrides: changes to the preset's config (nested dicts or dotted keys, e.g.
            ``{"encoder.moe.local_entropy_weight": 0.0}``).
            The input geometry (``in_chans``, ``image_size``, ``context_length``) is taken from the datamodule
            in :meth:`setup` unless given here.
        positives: "pairs" (each image's own caption is its only positive) or "labels" (items with equal
            ``batch["label"]`` are positives).
        **shared: the optimiser, LR schedule and eval-time routing every task takes (:class:`ZooTask`,
            :class:`zoo.tasks.optim.OptimizerConfig`); defaults: ``optimizer_defaults`` (AdamW, betas (0.9, 0.98),
            eps 1e-6, weight decay 0.1; no decay on norms, biases, embeddings, position embeddings, temperature).
        aux_loss_weight: multiplies the model's auxiliary (MoE) loss; the per-loss weights live in the model
            config (``encoder.moe.*_weight``).
        retrieval_ks: the K of recall@K.
        plot_val: also write routing plots after every validation.
        plot_dir: where the task writes plots on its own: after every test when given, and with ``plot_val``
            (None = ``<trainer.log_dir or default_root_dir>/plots``). Without it test plots come only from
            :meth:`write_test_plots`, so a tool that evaluates (``eval.py``) decides where they go.
        image_ssl_weight: weight of an image self-supervision loss added to the training loss (0 = off, the
            default). SLIP (Mu et al. 2021) trains CLIP's loss plus SimCLR's NT-Xent between two strongly
            augmented views of each image, computed on a separate MLP head (768 -> 4096 -> 4096 -> 256 with
            BatchNorm + ReLU for ViT-B) over the image tower's pooled output, so the contrastive projection is
            not shared. Here: the batch's ``"image"`` (the view the image-text loss already uses) and a second
            view ``"image_view2"`` (datamodule option ``image_views=2``; ``view_color_jitter`` adds SimCLR's
            colour distortion to it) - one extra image pass, where SLIP uses two extra views. Both go through
            the shared transformer (routers included; LIMoE's patch dropout also differs per pass); the task's
            own head ``image_ssl_head`` (Linear-BN-ReLU-Linear-BN-ReLU-Linear, SLIP's shape scaled to the tiny
            models: ``D -> ssl_hidden_dim -> ssl_hidden_dim -> ssl_out_dim``, default ``4D`` and ``D`` for
            encoder width D) reads the pooled image tokens before the contrastive projection
            (``LIMoEOutput.image_features``, i.e. ``_pool_image``) and :func:`nt_xent_loss` compares the two
            views at ``ssl_temperature``. The head exists only when the weight is > 0; it is trained with the
            model (same optimiser, lr schedule and weight-decay rules) and saved in the task's checkpoint, but is
            not part of the model (``eval.py`` / :mod:`zoo.tasks.publish` use ``model.*`` only).
        text_ssl_weight: weight of a text-text loss (0 = off): symmetric InfoNCE (:func:`contrastive_loss`, scale
            ``1 / ssl_temperature``) between the normalised text embeddings of each image's caption and of a
            DIFFERENT caption of the same image, ``"text_view2"`` (datamodule option ``text_views=2``): the two
            captions are positives, the other images' captions negatives (with ``positives="labels"``, equal
            labels are positives). One extra text pass.
        ssl_temperature: temperature of both self-supervised losses (SLIP / SimCLR: 0.1).
        ssl_hidden_dim, ssl_out_dim: sizes of ``image_ssl_head`` (None: 4 x and 1 x the encoder width).

    MoE auxiliary losses of the extra passes: each extra pass goes through the same routers and has its own
    auxiliary (LIMoE entropy) losses. The loss keeps one auxiliary term per modality: with a second view of a
    modality, that modality's term is the MEAN over its two passes (``(main + view2) / 2``), so the routers are
    regularised on both views while the auxiliary weight per modality stays that of the recipe (only the
    self-supervised loss differs from a run without it). ``train/aux_loss`` logs that total.
    """

    optimizer_defaults = OptimizerConfig(betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)

    def __init__(
        self,
        model: str = "limoe_tiny_test",
        model_overrides: Optional[dict[str, Any]] = None,
        positives: Literal["pairs", "labels"] = "pairs",
        aux_loss_weight: float = 1.0,
        retrieval_ks: Sequence[int] = (1, 5, 10),
        plot_val: bool = False,
        plot_dir: Optional[str] = None,
        image_ssl_weight: float = 0.0,
        text_ssl_weight: float = 0.0,
        ssl_temperature: float = 0.1,
        ssl_hidden_dim: Optional[int] = None,
        ssl_out_dim: Optional[int] = None,
        **shared: Any,
    ) -> None:
        super().__init__(**shared)
        if positives not in ("pairs", "labels"):
            raise ValueError(f"positives must be 'pairs' or 'labels', got {positives!r}")
        if image_ssl_weight < 0 or text_ssl_weight < 0:
            raise ValueError(f"image_ssl_weight / text_ssl_weight must be >= 0, got {image_ssl_weight}, "
                             f"{text_ssl_weight}")
        if ssl_temperature <= 0:
            raise ValueError(f"ssl_temperature must be > 0, got {ssl_temperature}")
        self.model = self._build_model()
        # Built after the model, and only when used: a run without it draws the same random numbers as before.
        self.image_ssl_head: Optional[nn.Module] = self._build_ssl_head() if image_ssl_weight > 0 else None
        self._eval: dict[str, _EvalState] = {}
        self.val_routing: Optional[ModalityRoutingSummary] = None
        self.test_routing: Optional[ModalityRoutingSummary] = None
        self.last_metrics: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------------------------------ model
    def _build_model(self) -> nn.Module:
        hp = self.hparams
        model = create_model(hp.model, **dict(hp.model_overrides or {}))
        self.apply_eval_routing(model)
        for attr in ("scale_and_bias", "encode_text", "encode_image"):
            if not hasattr(model, attr):
                raise TypeError(f"model {hp.model!r} ({type(model).__name__}) is not a dual encoder: no {attr}()")
        self.layer_names = moe_layer_names(model)
        return model

    def _build_ssl_head(self) -> nn.Module:
        """SLIP's SimCLR head (Linear-BN-ReLU-Linear-BN-ReLU-Linear) scaled to the model's encoder width D."""
        hp = self.hparams
        try:
            D = int(self.model.config.encoder.dim)
        except AttributeError as err:
            raise TypeError(f"image_ssl_weight > 0 needs a LIMoE-like model with config.encoder.dim; "
                            f"{type(self.model).__name__} has none") from err
        hidden = hp.ssl_hidden_dim or 4 * D
        out = hp.ssl_out_dim or D
        return nn.Sequential(nn.Linear(D, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, out))

    def check_views(self, dm: Any) -> None:
        """ValueError when a self-supervised loss is on but ``dm`` is set not to give its second view (a
        datamodule without the ``image_views`` / ``text_views`` option is checked per batch instead)."""
        for weight, option in (("image_ssl_weight", "image_views"), ("text_ssl_weight", "text_views")):
            views = getattr(dm, option, None)
            if self.hparams.get(weight, 0.0) > 0 and views is not None and views < 2:
                raise ValueError(f"{weight}={self.hparams[weight]} needs a second view from the datamodule, but "
                                 f"{type(dm).__name__} has {option}={views}: set {option}=2 "
                                 f"(CLI: --data.init_args.{option}=2)")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.attached_datamodule()
        if stage == "fit" and dm is not None:  # evaluation needs no extra views
            self.check_views(dm)

    def extra_trainable_modules(self) -> list[nn.Module]:
        """The SimCLR head joins the optimiser (:class:`~zoo.tasks.optim.RecipeOptimizerMixin`)."""
        return [self.image_ssl_head] if self.image_ssl_head is not None else []

    def take_from_datamodule(self, dm: Any) -> None:
        """Take ``in_chans`` / ``image_size`` / ``context_length`` from the datamodule unless ``model_overrides``
        sets them (then they must agree). They are recorded in ``hparams.model_overrides`` (so a checkpoint
        rebuilds the same model); the model is rebuilt, before any weights load or optimiser exists, only when
        the preset differs."""
        overrides = dict(self.hparams.model_overrides or {})
        rebuild = fill_from_datamodule(overrides, DATA_DIMS, dm, self.model.config, "model_overrides")
        self.hparams.model_overrides = overrides
        if rebuild:
            self.model = self._build_model()

    def forward(self, images: Optional[Tensor] = None, text: Optional[Tensor] = None, text_mask: Optional[Tensor] = None):
        return self.model(images=images, text=text, text_mask=text_mask)

    # ----------------------------------------------------------------------------------------- losses
    @staticmethod
    def flatten_captions(batch: dict) -> tuple[Tensor, Optional[Tensor]]:
        """``batch["text"]`` as ``[T, L]`` plus each caption's image index in the batch: ``[B, L]`` -> (text,
        None); ``[B, K, L]`` (+ ``num_captions``) -> (the valid captions, their owners ``[T]``)."""
        text = batch["text"]
        if text.ndim == 2:
            return text, None
        B, K = text.shape[:2]
        n = batch.get("num_captions")
        n = torch.full((B,), K, device=text.device) if n is None else n.to(text.device)
        keep = torch.arange(K, device=text.device).unsqueeze(0) < n.unsqueeze(1)
        owner = torch.arange(B, device=text.device).unsqueeze(1).expand(B, K)[keep]
        return text[keep], owner

    def _positives(self, batch: dict, owner: Optional[Tensor] = None) -> Optional[Tensor]:
        """[B, T] positives: a caption matches its own image, or (``positives="labels"``) any image of its label."""
        B = batch["image"].shape[0]
        if self.hparams.positives == "labels" and "label" in batch:
            labels = batch["label"]
            text_labels = labels if owner is None else labels[owner]
            return labels.unsqueeze(1) == text_labels.unsqueeze(0)
        if owner is None:
            return None
        return torch.arange(B, device=owner.device).unsqueeze(1) == owner.unsqueeze(0)

    def _loss(self, out, batch: dict, owner: Optional[Tensor] = None) -> Tensor:
        scale, bias = out.logit_scale, out.logit_bias
        return contrastive_loss(out.image_embeds, out.text_embeds, scale, bias, self.model.config.loss,
                                self._positives(batch, owner))

    @staticmethod
    def _view(batch: dict, key: str, weight: str, option: str) -> Tensor:
        if key not in batch:
            raise ValueError(f"{weight} > 0 needs batch[{key!r}] (a second view of each training item), but the batch "
                             f"has only {sorted(batch)}: set the datamodule's {option}=2 "
                             f"(CLI: --data.init_args.{option}=2; ImageTextCSVDataModule / Flickr8kDataModule)")
        return batch[key]

    @staticmethod
    def _share(out, name: str) -> Tensor:
        value = getattr(out, name, None)
        if value is None:
            raise TypeError(f"the model's output has no {name}; the self-supervised losses need a LIMoE-like "
                            "dual encoder (zoo.models.limoe.LIMoEOutput)")
        return value

    def _self_supervised(self, out, batch: dict, owner: Optional[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """(change of the auxiliary loss, {log name: loss}) of the enabled self-supervised losses (see the class
        docstring): each extra pass's auxiliary loss replaces half of its modality's main-pass share."""
        hp = self.hparams
        aux_delta = out.aux_loss.new_zeros(())
        losses: dict[str, Tensor] = {}
        if hp.image_ssl_weight > 0:
            view = self._view(batch, "image_view2", "image_ssl_weight", "image_views")
            out2 = self.model(images=view)
            f1, f2 = self._share(out, "image_features"), self._share(out2, "image_features")
            losses["image_ssl"] = nt_xent_loss(self.image_ssl_head(f1), self.image_ssl_head(f2), hp.ssl_temperature)
            aux_delta = aux_delta + (out2.aux_loss - self._share(out, "image_aux_loss")) / 2
        if hp.text_ssl_weight > 0:
            view = self._view(batch, "text_view2", "text_ssl_weight", "text_views")
            if owner is not None:
                raise ValueError("text_ssl_weight > 0 needs one caption per item (batch['text'] [B, L]); turn "
                                 "train_all_captions off")
            out2 = self.model(text=view)
            scale = torch.full((), 1.0 / hp.ssl_temperature, device=out.text_embeds.device)  # a fill, no H2D copy
            losses["text_ssl"] = contrastive_loss(out.text_embeds, out2.text_embeds, scale, kind="softmax",
                                                  positives=self._positives(batch))
            aux_delta = aux_delta + (out2.aux_loss - self._share(out, "text_aux_loss")) / 2
        return aux_delta, losses

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        text, owner = self.flatten_captions(batch)
        out = self(batch["image"], text, batch.get("text_mask") if owner is None else None)
        con = self._loss(out, batch, owner)
        aux = out.aux_loss.to(con.dtype)
        hp = self.hparams
        ssl: dict[str, Tensor] = {}
        if hp.get("image_ssl_weight", 0.0) > 0 or hp.get("text_ssl_weight", 0.0) > 0:
            aux_delta, ssl = self._self_supervised(out, batch, owner)
            aux = aux + aux_delta.to(con.dtype)
        loss = con + self.hparams.aux_loss_weight * aux
        for name, value in ssl.items():
            loss = loss + hp[f"{name}_weight"] * value
        B = batch["image"].shape[0]
        log = dict(on_step=True, on_epoch=False, batch_size=B)
        self.log("train/loss", loss, prog_bar=True, **log)
        self.log("train/contrastive", con, **log)
        self.log("train/aux_loss", aux, **log)
        for name, value in ssl.items():
            self.log(f"train/{name}", value.detach(), **log)
        self.log("train/logit_scale", out.logit_scale.detach(), **log)
        for name, value in out.aux_losses.items():
            self.log(f"train/aux/{name}", value.detach().float(), **log)
        for name, img, txt in zip(self.layer_names, out.image_routing, out.text_routing):
            self.log(f"train/moe/{name}/dropped_image", img.dropped_fraction.float(), **log)
            self.log(f"train/moe/{name}/dropped_text", txt.dropped_fraction.float(), **log)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], **log)
        return loss

    # ------------------------------------------------------------------------------------- evaluation
    def _start_eval(self, split: str) -> None:
        if self._trainer is not None and self.trainer.world_size > 1:
            warnings.warn("ContrastiveTask evaluates per process (zero-shot / retrieval over the local shard)")
        state = _EvalState()
        state.routing = RoutingReport(self.model).start()
        dm = self.attached_datamodule()
        names, templates = getattr(dm, "class_names", None), getattr(dm, "zero_shot_templates", None)
        tokenizer = getattr(dm, "tokenizer", None)
        if names and templates and tokenizer is not None:
            state.classifier = zero_shot_classifier(self.model, tokenizer, names, templates)
        self._eval[split] = state

    def _eval_step(self, batch: dict, split: str) -> None:
        state = self._eval[split]
        images, text = batch["image"], batch.get("text")
        out = self(images)
        state.image_embeds.append(out.image_embeds.float().cpu())
        state.labels.append(batch["label"].cpu() if "label" in batch else torch.full((images.shape[0],), -1))
        B = images.shape[0]
        if text is not None and text.ndim == 3:  # all captions of each image: retrieval
            flat, owner = self.flatten_captions(batch)
            owner = owner + state.num_images
            tout = self(text=flat)
            state.text_embeds.append(tout.text_embeds.float().cpu())
            state.text_owner.append(owner.cpu())
        elif text is not None:  # one caption per image: the contrastive loss
            tout = self(text=text, text_mask=batch.get("text_mask"))
            out.text_embeds, out.logit_scale, out.logit_bias = tout.text_embeds, tout.logit_scale, tout.logit_bias
            loss = self._loss(out, batch)
            self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, batch_size=B, prog_bar=True)
        state.num_images += B

    def _finish_eval(self, split: str) -> dict[str, float]:
        state = self._eval.pop(split)
        state.routing.stop()
        metrics: dict[str, float] = {}
        if state.image_embeds:
            img = torch.cat(state.image_embeds)
            labels = torch.cat(state.labels)
            if state.classifier is not None and (labels >= 0).all():
                logits = img @ state.classifier.float().cpu().t()
                C = logits.shape[1]
                metrics["zero_shot_acc"] = float(MulticlassAccuracy(C, top_k=1, average="micro")(logits, labels))
                if C > 5:
                    metrics["zero_shot_acc_top5"] = float(MulticlassAccuracy(C, top_k=5, average="micro")(logits, labels))
            if state.text_embeds:
                txt, owner = torch.cat(state.text_embeds), torch.cat(state.text_owner)
                metrics.update(retrieval_recall(img @ txt.t(), owner, self.hparams.retrieval_ks))
        summary = state.routing.modality_summary(num_examples=state.num_images)
        if summary.layer_names:
            for k, v in summary.means().items():
                metrics[f"routing/{k}"] = v
        for k, v in metrics.items():
            self.log(f"{split}/{k}", v, prog_bar=k in ("zero_shot_acc", "i2t_R@10"))
        self.last_metrics[split] = dict(metrics)
        setattr(self, f"{split}_routing", summary)
        if summary.layer_names and (self.hparams.plot_val if split == "val" else bool(self.hparams.plot_dir)):
            epoch = self.current_epoch if self._trainer is not None else 0
            prefix = f"routing_{split}" + (f"_epoch{epoch}" if split == "val" else "")
            try:
                write_modality_routing_plots(summary, self.plot_dir(), prefix, title=f"{self.hparams.model} ({split})")
            except (ValueError, OSError) as err:  # plots are a convenience, never fail a run
                warnings.warn(f"routing plots skipped: {err}")
        return metrics

    def write_test_plots(self, out_dir: str | Path, title: str = "",
                         class_names: Optional[list[str]] = None) -> list[str]:
        """Routing-by-modality plots of the last test pass (:func:`write_modality_routing_plots`, prefix
        ``routing_test``) into ``out_dir``; ``title`` defaults to ``"<model preset> (test)"``. ``class_names`` is
        not used (these plots are per modality, not per class)."""
        summary = self.test_routing
        if summary is None or not summary.layer_names:
            return []
        paths = write_modality_routing_plots(summary, out_dir, "routing_test",
                                             title=title or f"{self.hparams.model} (test)")
        return [str(p) for p in paths]

    def plot_dir(self) -> Path:
        if self.hparams.plot_dir:
            return Path(self.hparams.plot_dir)
        if self._trainer is not None:
            base = self.trainer.log_dir or self.trainer.default_root_dir
            return Path(base) / "plots"
        return Path("plots")

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    # optimiser and LR schedule: RecipeOptimizerMixin (zoo/tasks/optim.py), shared with every task
