"""Contrastive task with self-supervision (SLIP's image SimCLR loss, a text-text loss between two captions):
the NT-Xent loss, training with the extra views, the auxiliary-loss bookkeeping, errors and checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from zoo.data.image_text import ImageTextCSVDataModule
from zoo.tasks.contrastive import ContrastiveTask, contrastive_loss, nt_xent_loss


def _csv_dataset(root: Path, n_images: int = 12) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["image,caption"]
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        lines += [f"im{i}.png,a photo number {i} of {w}" for w in ("a dog", "the beach", "two people")]
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root / "captions.csv"


def _datamodule(tmp_path: Path, **kw) -> ImageTextCSVDataModule:
    return ImageTextCSVDataModule(str(_csv_dataset(tmp_path)), image_size=16, batch_size=4, num_train=8, num_test=4,
                                  context_length=16, **kw)


def _trainer(tmp_path: Path, steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, limit_val_batches=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))


def test_nt_xent_by_hand():
    # Two images, two views each, in 2-D: a=(1,0), b=(0,1) (view 1); c=(.6,.8), d=(.8,-.6) (view 2); a<->c, b<->d.
    # Dot products: ab 0, ac .6, ad .8, bc .8, bd -.6, cd 0; temperature .5 doubles them.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    row_a = -1.2 + math.log(math.exp(0.0) + math.exp(1.2) + math.exp(1.6))   # a: positive c, negatives b, d
    row_b = 1.2 + math.log(math.exp(0.0) + math.exp(1.6) + math.exp(-1.2))   # b: positive d, negatives a, c
    row_c = -1.2 + math.log(math.exp(1.2) + math.exp(1.6) + math.exp(0.0))   # c: positive a, negatives b, d
    row_d = 1.2 + math.log(math.exp(-1.2) + math.exp(1.6) + math.exp(0.0))   # d: positive b, negatives a, c
    expected = (row_a + row_b + row_c + row_d) / 4
    assert float(nt_xent_loss(z1, z2, 0.5)) == pytest.approx(expected, rel=1e-6)
    # inputs are normalised inside; the views are interchangeable
    assert float(nt_xent_loss(3 * z1, 0.5 * z2, 0.5)) == pytest.approx(expected, rel=1e-6)
    assert float(nt_xent_loss(z2, z1, 0.5)) == pytest.approx(expected, rel=1e-6)
    # same-view negatives count: it is not the cross-view-only InfoNCE
    assert float(contrastive_loss(z1, z2, torch.tensor(2.0))) != pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(z1, z2[:1])


def test_image_ssl_training_steps_change_the_head_and_stay_finite(tmp_path):
    L.seed_everything(0)
    dm = _datamodule(tmp_path, image_views=2, view_color_jitter=0.5, text_views=2)
    task = ContrastiveTask("limoe_tiny_test", lr=3e-3, warmup_steps=1, image_ssl_weight=1.0, text_ssl_weight=0.5)
    head_before = {k: v.clone() for k, v in task.image_ssl_head.state_dict().items()}
    model_before = {k: v.clone() for k, v in task.model.state_dict().items()}
    logged: dict[str, list[float]] = {}

    def log(name, value, **kw):
        logged.setdefault(name, []).append(float(value.detach() if torch.is_tensor(value) else value))

    task.log = log
    trainer = _trainer(tmp_path, 3)
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 3
    head_after = task.image_ssl_head.state_dict()
    weights = [k for k in head_after if k.endswith("weight")]
    assert all(not torch.equal(head_before[k], head_after[k]) for k in weights)  # every layer of the head trained
    assert all(torch.isfinite(v.float()).all() for v in head_after.values())
    assert all(torch.isfinite(v.float()).all() for v in task.model.state_dict().values())
    assert any(not torch.equal(model_before[k], v) for k, v in task.model.state_dict().items())
    for name in ("train/loss", "train/image_ssl", "train/text_ssl", "train/aux_loss"):
        assert len(logged[name]) == 3 and all(math.isfinite(v) for v in logged[name]), name
    assert all(v > 0 for v in logged["train/image_ssl"] + logged["train/text_ssl"])
    # the head is in the optimiser, in its own groups (decay for matrices, none for biases / BatchNorm)
    opt = trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in task.image_ssl_head.parameters())
    assert all(id(p) in in_opt for p in task.model.parameters())


def test_loss_composition_and_aux_mean_over_views(tmp_path):
    """In eval mode (no router noise, dropout or patch dropout) a second view equal to the first gives the same
    pass again: the training loss is contrastive + aux (unchanged: the mean of two equal image terms) + the
    weighted SSL losses, each computed by hand here."""
    torch.manual_seed(0)
    task = ContrastiveTask("limoe_tiny_test", image_ssl_weight=0.7, text_ssl_weight=0.3, ssl_temperature=0.2,
                           ssl_hidden_dim=24, ssl_out_dim=8)
    assert [m.out_features for m in task.image_ssl_head if isinstance(m, torch.nn.Linear)] == [24, 24, 8]
    task.eval()
    from zoo.data.image_text import CaptionTokenizer

    tok = CaptionTokenizer(16)
    image = torch.randn(4, 3, 16, 16)
    text = tok(["a dog", "a cat on a mat", "two red cars", "the sea"])
    text2 = tok(["one dog", "a cat", "cars", "blue sea at night"])
    batch = {"image": image, "text": text, "label": torch.arange(4), "image_view2": image.clone(), "text_view2": text2}
    task.log = lambda *a, **k: None
    loss = task.training_step(batch, 0)
    with torch.no_grad():
        out = task.model(images=image, text=text)
        out_t2 = task.model(text=text2)
        con = contrastive_loss(out.image_embeds, out.text_embeds, out.logit_scale)
        h = task.image_ssl_head(out.image_features)
        img_ssl = nt_xent_loss(h, h, 0.2)
        txt_ssl = contrastive_loss(out.text_embeds, out_t2.text_embeds, torch.tensor(5.0))
        aux = out.image_aux_loss + (out.text_aux_loss + out_t2.aux_loss) / 2
    torch.testing.assert_close(out.image_aux_loss + out.text_aux_loss, out.aux_loss)
    assert float(out.aux_loss) > 0 and float(out.text_aux_loss) != pytest.approx(float(out_t2.aux_loss))
    torch.testing.assert_close(loss.detach(), con + aux + 0.7 * img_ssl + 0.3 * txt_ssl)


def test_missing_view_errors_name_the_datamodule_option(tmp_path):
    task = ContrastiveTask("limoe_tiny_test", image_ssl_weight=1.0)
    task.log = lambda *a, **k: None
    from zoo.data.image_text import CaptionTokenizer

    batch = {"image": torch.randn(2, 3, 16, 16), "text": CaptionTokenizer(16)(["a", "b"]), "label": torch.arange(2)}
    with pytest.raises(ValueError, match=r"image_view2.*image_views=2"):
        task.training_step(batch, 0)
    text_task = ContrastiveTask("limoe_tiny_test", text_ssl_weight=1.0)
    text_task.log = lambda *a, **k: None
    with pytest.raises(ValueError, match=r"text_view2.*text_views=2"):
        text_task.training_step(batch, 0)
    # caught before training when the datamodule is set not to give the view (evaluation does not need it)
    dm = _datamodule(tmp_path, image_views=1)
    with pytest.raises(ValueError, match=r"image_ssl_weight=1.0 needs a second view.*--data.init_args.image_views=2"):
        _trainer(tmp_path, 1).fit(task, datamodule=dm)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_test_batches=1, default_root_dir=str(tmp_path))
    trainer.test(task, datamodule=dm, verbose=False)
    assert "i2t_R@10" in task.last_metrics["test"]
    with pytest.raises(ValueError, match=r"text_ssl_weight=1.0 needs a second view.*text_views=2"):
        text_task.check_views(_datamodule(tmp_path / "t", image_views=2))  # images given twice, captions once
    text_task.check_views(_datamodule(tmp_path / "u", text_views=2))
    with pytest.raises(ValueError, match="image_ssl_weight"):
        ContrastiveTask("limoe_tiny_test", image_ssl_weight=-1.0)
    with pytest.raises(ValueError, match="ssl_temperature"):
        ContrastiveTask("limoe_tiny_test", ssl_temperature=0.0)


def test_default_task_has_no_ssl_head_and_ssl_checkpoints_load(tmp_path):
    plain = ContrastiveTask("limoe_tiny_test")
    assert plain.image_ssl_head is None and all(k.startswith("model.") for k in plain.state_dict())
    # the same random numbers as before the option existed: the model's init is unchanged by an SSL head
    torch.manual_seed(0)
    a = ContrastiveTask("limoe_tiny_test").model.state_dict()
    torch.manual_seed(0)
    b = ContrastiveTask("limoe_tiny_test", image_ssl_weight=1.0).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    L.seed_everything(0)
    dm = _datamodule(tmp_path, image_views=2)
    task = ContrastiveTask("limoe_tiny_test", warmup_steps=1, image_ssl_weight=1.0)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(task, datamodule=dm)
    ckpt = tmp_path / "ssl.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = ContrastiveTask.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    assert loaded.hparams.image_ssl_weight == 1.0 and loaded.image_ssl_head is not None
    sd, ref = loaded.state_dict(), task.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    # model-only reading (zoo.tasks.publish's checkpoint export keeps the `model.*` tensors) leaves the task's head out
    from zoo import create_model
    from zoo.tasks.publish import _lightning_state_dict

    model_sd, _ = _lightning_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False), str(ckpt))
    model = create_model("limoe_tiny_test", **task.hparams.model_overrides)
    model.load_state_dict(model_sd, strict=True)
    assert all(torch.equal(v, ref[f"model.{k}"]) for k, v in model.state_dict().items())
    # eval on the test split works as before (the head is not used there)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_test_batches=1, default_root_dir=str(tmp_path))
    trainer.test(loaded, datamodule=dm, verbose=False)
    m = loaded.last_metrics["test"]
    # 4 test photos: a caption's photo is always among the top 5 of 4 (t2i R@5 = R@10 = 1), and recall only grows
    # with k (measured i2t 0.25 / 0.75 / 1.0, t2i 0.25 / 1.0 / 1.0)
    assert m["t2i_R@5"] == m["t2i_R@10"] == 1.0 and m["i2t_R@10"] == 1.0, m
    assert m["i2t_R@1"] <= m["i2t_R@5"] and 4 * m["i2t_R@1"] == round(4 * m["i2t_R@1"])
    # the same weights evaluated in memory give the same numbers (the SSL head plays no part in eval)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_test_batches=1, default_root_dir=str(tmp_path))
    trainer.test(task, datamodule=dm, verbose=False)
    assert {k: v for k, v in task.last_metrics["test"].items() if "R@" in k} == {k: v for k, v in m.items()
                                                                             if "R@" in k}
