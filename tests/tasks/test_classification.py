"""ImageClassificationTask, the optimiser pieces and the plots (in-process, on scikit-learn digits; seconds)."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch

from zoo.data import DigitsDataModule
from zoo.moe import moe_layers
from zoo.plots import plot_expert_utilisation, plot_routing_matrices, plot_routing_matrix, plot_training_curves
from zoo.tasks import ImageClassificationTask, build_scheduler, lr_multiplier, param_groups, split_decay_params
from zoo.tasks.classification import tokens_by_image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: threading only costs
    yield
    torch.set_num_threads(old)


def _trainer(**kw) -> L.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)  # no checkpoints/ folder left in the working directory
    return L.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, **kw)


def assert_png(path) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"


# --------------------------------------------------------------------------------------------------- the task
def test_fast_dev_run_fit_and_test_on_digits():
    L.seed_everything(0)
    task = ImageClassificationTask(model="vmoe_tiny_digits", warmup_steps=2)
    dm = DigitsDataModule(batch_size=32)
    trainer = _trainer(fast_dev_run=3)
    trainer.fit(task, dm)
    assert trainer.global_step == 3
    results = trainer.test(task, dm, verbose=False)[0]
    for key in ("test/acc", "test/acc_top5", "test/loss", "test/ce", "test/aux_loss",
                "test/moe/block1/dropped", "test/moe/block1/max_share", "test/moe/block3/min_share",
                "test/moe/block1/capacity"):
        assert key in results, key
    # the logged loss is cross-entropy + the MoE aux loss; 3 steps leave the model at chance, so the cross-entropy
    # is that of a near-uniform prediction over 10 classes (measured 2.3001 vs ln 10 = 2.3026)
    assert results["test/loss"] == pytest.approx(results["test/ce"] + results["test/aux_loss"], abs=1e-5)
    assert 0.0 < results["test/aux_loss"] < 0.01 and abs(results["test/ce"] - math.log(10)) < 0.1
    assert results["test/acc"] < results["test/acc_top5"]
    routing = task.test_routing
    assert routing.layer_names == ["block1", "block3"]
    n_images = 3 * 32  # fast_dev_run=3 batches
    assert routing.num_examples == n_images
    seq = 1 + (8 // 2) ** 2  # CLS + 4x4 patches
    for cbe, tpe, dropped in zip(routing.class_by_expert, routing.tokens_per_expert, routing.dropped_fraction):
        assert cbe.shape == (10, 4)
        assert cbe.sum() == n_images * seq  # every token has one top-1 expert
        assert tpe.shape == (4,)
        # top-2 with capacity: kept assignments = (1 - dropped) * 2 slots per token
        assert tpe.sum().item() == pytest.approx((1 - dropped) * 2 * n_images * seq, rel=1e-6)
    shares = routing.shares()
    assert all(abs(sum(s) - 1) < 1e-6 for s in shares)


def test_training_step_logs_losses_and_routing():
    task = ImageClassificationTask(model="vmoe_tiny_digits")
    dm = DigitsDataModule(batch_size=16)
    trainer = _trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(task, dm)
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/ce", "train/aux_loss", "train/aux/importance_loss", "train/aux/load_loss",
                "train/moe/block1/dropped", "train/moe/block3/max_share", "train/lr", "val/acc", "val/loss"):
        assert key in logged, key
    assert torch.isclose(logged["train/loss"], logged["train/ce"] + logged["train/aux_loss"], atol=1e-5)


def test_geometry_comes_from_the_datamodule():
    # vmoe_tiny_test is 16x16 RGB; digits upsampled to 16x16 are grayscale -> in_chans is taken from the data.
    task = ImageClassificationTask(model="vmoe_tiny_test", warmup_steps=1)
    assert task.model.config.in_chans == 3
    dm = DigitsDataModule(batch_size=8, image_size=16)
    _trainer(fast_dev_run=1).fit(task, dm)
    assert (task.model.config.in_chans, task.model.config.image_size, task.model.config.num_classes) == (1, 16, 10)
    assert task.hparams.in_chans == 1 and task.hparams.image_size == 16  # saved -> checkpoints rebuild the same


def test_explicit_geometry_that_disagrees_with_the_data_fails():
    task = ImageClassificationTask(model="vmoe_tiny_digits", num_classes=7)
    with pytest.raises(ValueError, match="num_classes=7 but the datamodule DigitsDataModule has num_classes=10"):
        _trainer(fast_dev_run=1).fit(task, DigitsDataModule(batch_size=8))


def test_eval_overrides_reach_every_moe_layer():
    task = ImageClassificationTask(model="vmoe_tiny_digits", eval_capacity_factor=2.0, eval_top_k=1)
    layers = moe_layers(task.model)
    assert len(layers) == 2
    assert all(m.config.eval_capacity_factor == 2.0 and m.config.eval_top_k == 1 for m in layers)
    task.set_eval_overrides(capacity_factor=4.0)
    assert all(m.config.eval_capacity_factor == 4.0 and m.config.eval_top_k == 1 for m in layers)
    assert task.hparams.eval_capacity_factor == 4.0


def test_unknown_model_name_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'vmoe_tiny_digit'; did you mean 'vmoe_tiny_digits'"):
        ImageClassificationTask(model="vmoe_tiny_digit")


def test_tokens_by_image_drops_group_padding():
    # 3 images of 2 tokens routed as one padded group of 4 images -> [1, 8]; padding rows are -1.
    top1 = torch.tensor([[0, 1, 2, 3, 1, 1, -1, -1]])
    assert tokens_by_image(top1, batch=3, seq_len=2).tolist() == [[0, 1], [2, 3], [1, 1]]
    assert tokens_by_image(torch.zeros(3, 2, dtype=torch.long), batch=3).shape == (3, 2)


# ------------------------------------------------------------------------------------------ optimiser pieces
def test_weight_decay_groups_exclude_norms_biases_and_embeddings():
    task = ImageClassificationTask(model="vmoe_tiny_digits")
    decay, no_decay = split_decay_params(task.model)
    names = dict(task.model.named_parameters())
    assert set(decay) | set(no_decay) == set(names) and not set(decay) & set(no_decay)
    for name in ("cls_token", "pos_embed", "patch_embed.proj.bias", "encoder.blocks.0.norm1.weight",
                 "encoder.blocks.0.norm1.bias", "encoder.blocks.0.attn.qkv.bias", "encoder.norm.weight",
                 "encoder.blocks.1.mlp.experts.b1", "encoder.blocks.1.mlp.experts.b2", "head.bias"):
        assert name in no_decay, name
    for name in ("patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.mlp.fc1.weight",
                 "encoder.blocks.1.mlp.experts.w1", "encoder.blocks.1.mlp.experts.w2",
                 "encoder.blocks.1.mlp.router.proj.weight", "head.weight"):
        assert name in decay, name
    groups = param_groups(task.model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert groups[1]["names"] == no_decay

    opt = task.configure_optimizers  # through the task: the optimizer gets the same groups
    task.trainer = None  # noqa: B010 (no trainer: use total_steps)
    task.hparams.total_steps = 10
    optimizer = opt()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    wd = {n: g["weight_decay"] for g in optimizer.param_groups for n in g["names"]}
    assert wd["pos_embed"] == 0.0 and wd["encoder.blocks.1.mlp.experts.b1"] == 0.0
    assert wd["encoder.blocks.1.mlp.experts.w1"] == task.hparams.weight_decay


def test_lr_schedule_matches_hand_computed_values():
    # warmup 10 steps, 110 in all: the decay phase is steps 10..110 (100 steps).
    assert lr_multiplier(0, 10, 110) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_multiplier(4, 10, 110) == pytest.approx(0.5)
    assert lr_multiplier(9, 10, 110) == pytest.approx(1.0)
    assert lr_multiplier(10, 10, 110) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_multiplier(60, 10, 110) == pytest.approx(0.5)  # halfway: (1 + cos(pi/2)) / 2
    assert lr_multiplier(35, 10, 110) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)  # 0.853553...
    assert lr_multiplier(60, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_multiplier(35, 10, 110, decay="linear") == pytest.approx(0.75)
    assert lr_multiplier(110, 10, 110) == pytest.approx(0.0)
    assert lr_multiplier(500, 10, 110, decay="linear", min_lr_ratio=0.2) == pytest.approx(0.2)  # clipped
    assert lr_multiplier(50, 10, 110, decay="constant") == 1.0

    # The scheduler applies it per optimiser step: the LR used by step s is base * lr_multiplier(s).
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.4)
    sched = build_scheduler(opt, warmup_steps=10, total_steps=110)
    seen = []
    for _ in range(61):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.04) and seen[9] == pytest.approx(0.4)
    assert seen[60] == pytest.approx(0.2)  # 0.4 * 0.5
    with pytest.raises(ValueError, match="unknown lr decay"):
        build_scheduler(opt, 1, 10, decay="step")


def test_task_schedule_length_comes_from_the_trainer():
    task = ImageClassificationTask(model="vmoe_tiny_digits", lr=0.01, warmup_steps=2, lr_decay="linear")
    dm = DigitsDataModule(batch_size=128)  # 1257 train images -> 10 batches per epoch
    trainer = _trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(task, dm)
    assert task.schedule_total_steps() == 4
    # after 4 steps the scheduler has stepped 4 times: multiplier(4) with warmup 2, total 4 -> linear end = 0
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * lr_multiplier(4, 2, 4, "linear"))


# ------------------------------------------------------------------------------------------------------ plots
def test_plots_write_valid_pngs(tmp_path):
    shares = [torch.tensor([10.0, 20.0, 30.0, 40.0]), [0.25, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0]]
    p = plot_expert_utilisation(shares, ["block1", "block3"], tmp_path / "util.png", title="t")
    assert_png(p)
    m = torch.arange(12.0).reshape(3, 4)
    assert_png(plot_routing_matrix(m, ["cat", "dog", "ship"], tmp_path / "m.png"))
    assert_png(plot_routing_matrix(m, ["cat", "dog", "ship"], tmp_path / "raw.png", normalize=None))
    paths = plot_routing_matrices([m, m], ["cat", "dog", "ship"], ["block1", "block/3"], tmp_path / "mats")
    assert [x.name for x in paths] == ["routing_matrix_block1.png", "routing_matrix_block_3.png"]
    for x in paths:
        assert_png(x)
    with pytest.raises(ValueError, match="row names"):
        plot_routing_matrix(m, ["cat"], tmp_path / "bad.png")

    csv_path = tmp_path / "metrics.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss", "val/acc", "train/lr"])
        w.writeheader()
        for step in range(5):
            w.writerow({"epoch": 0, "step": step, "train/loss": 2.0 - step / 5, "train/lr": 0.001})
        w.writerow({"epoch": 0, "step": 4, "val/acc": 0.5})
    assert_png(plot_training_curves(csv_path, tmp_path / "curves.png"))


def test_shared_optimiser_group_resolves_per_task_defaults():
    """The optimiser / eval-routing arguments are declared once (ZooTask); each task keeps its own defaults, the
    hyper-parameters hold every value used, and a bad value fails at construction with the field's name."""
    from zoo.tasks.contrastive import ContrastiveTask
    from zoo.tasks.optim import OptimizerConfig

    task = ImageClassificationTask(model="vmoe_tiny_digits", lr=0.01, eval_top_k=1)
    assert task.optimizer_config() == OptimizerConfig(lr=0.01)
    assert task.hparams.lr == 0.01 and task.hparams.betas == (0.9, 0.999) and task.hparams.eval_top_k == 1
    assert all(m.config.eval_top_k == 1 for m in moe_layers(task.model))
    con = ContrastiveTask("limoe_tiny_test", weight_decay=0.3)
    assert con.optimizer_config() == OptimizerConfig(betas=(0.9, 0.98), eps=1e-6, weight_decay=0.3)
    assert con.hparams.eps == 1e-6 and con.hparams.weight_decay == 0.3
    task.hparams.total_steps = 10  # no trainer to estimate it
    opt = task.configure_optimizers()["optimizer"]
    assert opt.defaults["lr"] == 0.01 and opt.defaults["betas"] == (0.9, 0.999)
    for bad, match in (({"lr": 0.0}, "lr must be > 0"), ({"lr_decay": "step"}, "unknown lr decay"),
                       ({"optimizer": "sgd"}, "unknown optimizer"), ({"min_lr_ratio": 2.0}, "min_lr_ratio")):
        with pytest.raises(ValueError, match=match):
            ImageClassificationTask(model="vmoe_tiny_digits", **bad)
