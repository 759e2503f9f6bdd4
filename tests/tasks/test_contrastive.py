"""Contrastive task: losses, retrieval / zero-shot metrics, routing-by-modality summary, a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo.data.image_text import ClassCaptionDataModule
from zoo.tasks.contrastive import (
    ContrastiveTask,
    ModalityRoutingSummary,
    contrastive_loss,
    retrieval_chance,
    retrieval_recall,
    zero_shot_classifier,
)


def _embeds(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_softmax_loss_is_symmetric_infonce():
    img, txt = _embeds()
    scale = torch.tensor(7.0)
    logits = scale * img @ txt.t()
    y = torch.arange(6)
    expected = (F.cross_entropy(logits, y) + F.cross_entropy(logits.t(), y)) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale), expected)
    # an identity positives matrix is the same loss
    torch.testing.assert_close(contrastive_loss(img, txt, scale, positives=torch.eye(6, dtype=torch.bool)), expected)


def test_multi_positive_softmax_and_sigmoid_losses():
    img, txt = _embeds()
    scale, bias = torch.tensor(5.0), torch.tensor(-2.0)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    pos = labels[:, None] == labels[None, :]
    logits = scale * img @ txt.t()
    t = pos.float() / pos.float().sum(1, keepdim=True)
    expected = (-(t * logits.log_softmax(1)).sum(1).mean() - (t * logits.t().log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale, positives=pos), expected)
    # sigmoid: pairs (open_clip SigLipLoss) and multi-positive, against the formula
    z = torch.eye(6) * 2 - 1
    sig = -F.logsigmoid(z * (logits + bias)).sum() / 6
    torch.testing.assert_close(contrastive_loss(img, txt, scale, bias, kind="sigmoid"), sig)
    z = pos.float() * 2 - 1
    torch.testing.assert_close(contrastive_loss(img, txt, scale, bias, kind="sigmoid", positives=pos),
                               -F.logsigmoid(z * (logits + bias)).sum() / 6)
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss(img, txt, scale, kind="sigmoid")


def test_retrieval_recall_by_hand():
    # 3 images, 5 texts: texts 0,1 -> image 0; 2 -> image 1; 3,4 -> image 2
    owner = torch.tensor([0, 0, 1, 2, 2])
    sim = torch.tensor([[0.1, 0.9, 0.8, 0.0, 0.2],   # image 0: own text 1 ranks first
                        [0.5, 0.4, 0.3, 0.2, 0.1],   # image 1: own text 2 ranks 3rd
                        [0.9, 0.1, 0.1, 0.0, 0.3]])  # image 2: best own text (4) ranks 2nd
    r = retrieval_recall(sim, owner, ks=(1, 2, 3))
    assert r["i2t_R@1"] == pytest.approx(1 / 3) and r["i2t_R@2"] == pytest.approx(2 / 3)
    assert r["i2t_R@3"] == pytest.approx(1.0)
    # text -> image ranks: t0: col [0.1,0.5,0.9] true 0 -> rank 2; t1: rank 0; t2: [0.8,0.3,0.1] true 1 -> 1;
    # t3: [0,0.2,0] true 2 -> 1 (ties count against: 0.0 vs 0.0 is not strictly greater, so rank 1); t4: rank 0
    assert r["t2i_R@1"] == pytest.approx(0.4) and r["t2i_R@2"] == pytest.approx(0.8)
    chance = retrieval_chance(200, 5, ks=(10,))
    assert chance["t2i_R@10"] == pytest.approx(0.05)
    assert chance["i2t_R@10"] == pytest.approx(1 - math.comb(995, 10) / math.comb(1000, 10))


def test_modality_routing_summary_math():
    counts = torch.tensor([[[10.0, 10, 0, 0], [0, 0, 5, 5]],     # layer 0: disjoint experts
                           [[4.0, 4, 4, 4], [2, 2, 2, 2]]])      # layer 1: identical usage
    s = ModalityRoutingSummary(["block1", "block3"], counts, torch.full((2, 2, 4), 0.25), torch.zeros(2, 2),
                               torch.tensor([[20.0, 10], [16, 8]]))
    torch.testing.assert_close(s.js_divergence(), torch.tensor([1.0, 0.0], dtype=s.js_divergence().dtype))
    torch.testing.assert_close(s.effective_experts(), torch.tensor([[2.0, 2.0], [4.0, 4.0]]))
    spec = s.specialised_experts()
    assert spec == {"image_only": [2, 0], "text_only": [2, 0], "shared": [0, 4]}
    d = s.as_dict()
    assert d["block1"]["image"]["usage"] == [0.5, 0.5, 0.0, 0.0] and d["block3"]["shared_experts"] == 4


class _OracleDualEncoder(nn.Module):
    """Maps a prompt to the one-hot of the class word it contains and an image to the one-hot of its
    pixel value: zero-shot accuracy must be 1 (all correct)."""

    def __init__(self, class_token_ids: list[int]) -> None:
        super().__init__()
        self.ids = torch.tensor(class_token_ids)
        self.w = nn.Parameter(torch.zeros(()))
        self.config = type("C", (), {"loss": "softmax", "in_chans": 1, "image_size": 8, "context_length": 16})()

    def forward(self, images=None, text=None, text_mask=None):
        from zoo.models.limoe import LIMoEOutput

        C = len(self.ids)
        img = txt = None
        if images is not None:
            img = F.one_hot(images.flatten(1)[:, 0].round().long().clamp(0, C - 1), C).float()
        if text is not None:
            hit = (text.unsqueeze(-1) == self.ids).any(1).float()  # [B, C]
            txt = F.normalize(hit + 1e-3, dim=-1)
        return LIMoEOutput(logits=None, aux_loss=torch.zeros(()), image_embeds=img, text_embeds=txt,
                           logit_scale=torch.tensor(10.0))

    def scale_and_bias(self):
        return torch.tensor(10.0), None

    encode_text = encode_image = forward


def test_zero_shot_classifier_and_eval_plumbing():
    dm = ClassCaptionDataModule("digits", batch_size=32)
    ids = [int(dm.tokenizer(w)[0, 1]) for w in dm.class_names]
    oracle = _OracleDualEncoder(ids)
    cls = zero_shot_classifier(oracle, dm.tokenizer, dm.class_names, dm.zero_shot_templates)
    assert cls.shape == (10, 10) and torch.equal(cls.argmax(1), torch.arange(10))
    task = ContrastiveTask("limoe_tiny_test")
    task.model = oracle
    task.layer_names = []
    dm.setup()

    class _FakeTrainer:  # just what the eval hooks read
        datamodule, world_size, current_epoch = dm, 1, 0

    task._trainer = _FakeTrainer()
    task.log = lambda *a, **k: None
    task._start_eval("test")
    for batch in dm.test_dataloader():
        batch = dict(batch, image=batch["label"].float().view(-1, 1, 1, 1).expand(-1, 1, 8, 8))
        task._eval_step(batch, "test")
    metrics = task._finish_eval("test")
    assert metrics["zero_shot_acc"] == pytest.approx(1.0)


def test_tiny_contrastive_run_zero_shot_and_plots(tmp_path):
    """Train a tiny LIMoE for a few steps on digits with captions; evaluate zero-shot; write plots."""
    L.seed_everything(0)
    dm = ClassCaptionDataModule("digits", batch_size=64)
    task = ContrastiveTask("limoe_tiny_test", positives="labels", lr=3e-3, warmup_steps=2,
                           plot_dir=str(tmp_path / "plots"))
    trainer = L.Trainer(max_steps=3, limit_val_batches=1, limit_test_batches=2, accelerator="cpu", logger=False,
                        num_sanity_val_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(task, datamodule=dm)
    assert task.model.config.image_size == 8 and task.model.config.in_chans == 1  # taken from the data
    assert task.hparams.model_overrides["image_size"] == 8
    trainer.test(task, datamodule=dm, verbose=False)
    m = task.last_metrics["test"]
    # 3 steps do not train (measured 0.195 on the 128 test images, chance 0.1): the metric is checked against a
    # zero-shot classification written out here from the trained model (CLIP prompt ensembling, top-1 / top-5)
    task.eval()
    with torch.no_grad():
        tokens = dm.tokenizer([t.format(c) for c in dm.class_names for t in dm.zero_shot_templates])
        prompts = F.normalize(task(text=tokens).text_embeds.float(), dim=-1)
        classes = F.normalize(prompts.view(len(dm.class_names), len(dm.zero_shot_templates), -1).mean(1), dim=-1)
        batches = [b for _, b in zip(range(2), dm.test_dataloader())]
        images = torch.cat([task(b["image"]).image_embeds.float() for b in batches])
        labels = torch.cat([b["label"] for b in batches])
    scores = images @ classes.t()
    assert labels.numel() == 128
    assert m["zero_shot_acc"] == pytest.approx(float((scores.argmax(1) == labels).float().mean()), abs=1e-6)
    top5 = (scores.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean()
    assert m["zero_shot_acc_top5"] == pytest.approx(float(top5), abs=1e-6)
    assert 1.0 <= m["routing/effective_experts_image"] <= 4.0 and 1.0 <= m["routing/effective_experts_text"] <= 4.0
    s = task.test_routing
    assert s.counts.shape == (1, 2, 4) and s.counts[0, 0].sum() > 0 and s.counts[0, 1].sum() > 0
    pngs = {p.name for p in (tmp_path / "plots").glob("*.png")}
    names = {"routing_test_by_modality.png", "routing_test_expert_mix.png", "routing_test_utilisation_image.png",
             "routing_test_utilisation_text.png"}
    assert names <= pngs
    # the hook train.py / eval.py call: the same plots wherever they ask
    paths = [Path(p) for p in task.write_test_plots(tmp_path / "elsewhere", title="tiny (test)")]
    assert {p.name for p in paths} == names and all(p.parent == tmp_path / "elsewhere" and p.is_file() for p in paths)


def test_test_plots_only_where_asked_and_eval_overrides(tmp_path):
    """Without plot_dir a test pass writes no plots by itself (the caller picks the folder via write_test_plots);
    eval-time routing overrides reach every MoE layer and the hparams (what eval.py sets on a checkpoint)."""
    from zoo.moe import MoELayer

    dm = ClassCaptionDataModule("digits", batch_size=64)
    task = ContrastiveTask("limoe_tiny_test", warmup_steps=1)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, limit_test_batches=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(task, datamodule=dm)
    trainer.test(task, datamodule=dm, verbose=False)
    assert task.test_routing is not None and task.test_routing.num_examples == 64
    assert not list(tmp_path.rglob("*.png"))
    task.set_eval_overrides(capacity_factor=4.0, top_k=1)
    layers = [m for m in task.model.modules() if isinstance(m, MoELayer)]
    assert layers and all(m.config.eval_capacity_factor == 4.0 and m.config.eval_top_k == 1 for m in layers)
    assert task.hparams.eval_capacity_factor == 4.0 and task.hparams.eval_top_k == 1


def test_sigmoid_loss_through_the_task_trains_the_bias():
    task = ContrastiveTask("limoe_tiny_test", model_overrides={"loss": "sigmoid"}, total_steps=10, warmup_steps=1)
    from zoo.data.image_text import CaptionTokenizer

    batch = {"image": torch.randn(3, 3, 16, 16), "text": CaptionTokenizer(16)(["a cat", "two dogs", "a red car"]),
             "label": torch.arange(3)}
    out = task(batch["image"], batch["text"])
    loss = task._loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and task.model.logit_bias.grad is not None and task.model.logit_scale.grad is not None
    # one step of the task's own optimiser moves the bias (it is in the optimiser and its gradient is not zero)
    bias_before = task.model.logit_bias.detach().clone()
    optimizer = task.configure_optimizers()["optimizer"]
    optimizer.step()
    assert not torch.equal(task.model.logit_bias.detach(), bias_before)


def test_several_captions_per_image_rectangular_loss():
    img, _ = _embeds(3)
    txt = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    owner = torch.tensor([0, 0, 1, 2, 2])
    pos = torch.arange(3).unsqueeze(1) == owner.unsqueeze(0)
    scale = torch.tensor(4.0)
    logits = scale * img @ txt.t()
    t = pos.float()
    expected = (-(t / t.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
                + F.cross_entropy(logits.t(), owner)) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale, positives=pos), expected)
    with pytest.raises(ValueError, match="positives"):
        contrastive_loss(img, txt, scale)
    # the task flattens [B, K, L] captions with num_captions and builds the same positives
    from zoo.data.image_text import CaptionTokenizer

    tok = CaptionTokenizer(16)
    text = torch.stack([tok(["a", "b", "c"]), tok(["d", "e", "f"])])  # [2, 3, 16]
    batch = {"image": torch.randn(2, 3, 16, 16), "text": text, "num_captions": torch.tensor([3, 1])}
    flat, own = ContrastiveTask.flatten_captions(batch)
    assert flat.shape == (4, 16) and own.tolist() == [0, 0, 0, 1]
    task = ContrastiveTask("limoe_tiny_test")
    assert task._positives(batch, own).tolist() == [[True, True, True, False], [False, False, False, True]]
    out = task(batch["image"], flat)
    # through the task: the same rectangular loss, on the model's embeddings and the caption owners
    logits = out.logit_scale * out.image_embeds @ out.text_embeds.t()
    t = (torch.arange(2).unsqueeze(1) == own.unsqueeze(0)).float()
    expected = (-(t / t.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
                + F.cross_entropy(logits.t(), own)) / 2
    torch.testing.assert_close(task._loss(out, batch, own), expected)
