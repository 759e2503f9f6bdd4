"""ExpertParallelStrategy with Lightning on 2 CPU processes (gloo; Lightning's ddp fork launcher) and the real classification task:
loss curve == single process; checkpoints hold full experts and resume on 1 and on 2 processes."""

import json

import _ep_lit
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from zoo.distributed import ExpertParallelStrategy

TOL = dict(rtol=1e-5, atol=1e-5)


def _trainer(tmp_path, tag, devices, ckpt_dir=None):
    callbacks = [_ep_lit.Recorder(str(tmp_path), tag)]
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=str(tmp_path / ckpt_dir), filename="{epoch}-{step}", save_top_k=-1,
                                         every_n_epochs=1))
    # Fork is fastest, but a process that has already used CUDA (other tests in this worker, on a GPU machine)
    # cannot fork workers that touch CUDA (Lightning saves the CUDA RNG state): spawn there.
    start_method = "spawn" if torch.cuda.is_initialized() else "fork"
    strategy = ExpertParallelStrategy(start_method=start_method) if devices > 1 else "auto"
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=2, gradient_clip_val=0.05,
                     limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(ckpt_dir),
                     default_root_dir=str(tmp_path), callbacks=callbacks)


def _read(tmp_path, tag, world):
    runs = [json.loads((tmp_path / f"{tag}_rank{r}.json").read_text()) for r in range(world)]
    losses = torch.tensor([r["losses"] for r in runs]).mean(0)  # the global loss is the mean of the ranks'
    logits = torch.tensor(sum((r["logits"] for r in runs), []))
    return losses, logits, runs


def _logits(task, images):
    task.eval()
    with torch.no_grad():
        return task(images).logits


@pytest.mark.slow
@pytest.mark.timeout(600)  # a hung collective fails instead of stalling CI
def test_expert_parallel_strategy_matches_single_process_and_reshards(tmp_path):
    images = _ep_lit.eval_images()
    # Single process: 6 steps (2 epochs of 3 batches of 8 images), gradient clipping active.
    ref_task = _ep_lit.make_task()
    _trainer(tmp_path, "ref", 1, "ckpt_ref").fit(ref_task, datamodule=_ep_lit.RankSlices())
    ref_losses, ref_logits0, _ = _read(tmp_path, "ref", 1)
    ref_final = _logits(ref_task, images)

    # Expert parallel on 2 processes: each rank 4 of the 8 images, 2 of the 4 experts of each MoE layer.
    task = _ep_lit.make_task()
    _trainer(tmp_path, "ep", 2, "ckpt_ep").fit(task, datamodule=_ep_lit.RankSlices())
    ep_losses, ep_logits0, runs = _read(tmp_path, "ep", 2)
    assert all(r["sharded_layers"] == 2 for r in runs)  # really expert parallel
    torch.testing.assert_close(ep_logits0, ref_logits0, **TOL)  # same initial model, EP forward
    torch.testing.assert_close(ep_losses, ref_losses, **TOL)  # the loss curve
    assert ref_losses[0] != ref_losses[-1]
    # After fit the module is complete again (experts gathered) and equals the single-process model.
    assert task.model.encoder.blocks[1].mlp.experts.w1.shape[0] == 4
    torch.testing.assert_close(_logits(task, images), ref_final, **TOL)

    # The checkpoints hold full expert tensors (and full Adam moments) under the normal names.
    mid = tmp_path / "ckpt_ep" / "epoch=0-step=3.ckpt"
    ckpt = torch.load(tmp_path / "ckpt_ep" / "epoch=1-step=6.ckpt", map_location="cpu", weights_only=False)
    for block in (1, 3):
        assert ckpt["state_dict"][f"model.encoder.blocks.{block}.mlp.experts.w1"].shape == (4, 32, 64)
        assert ckpt["state_dict"][f"model.encoder.blocks.{block}.mlp.experts.b2"].shape == (4, 32)
    moments = sorted(tuple(s["exp_avg"].shape) for s in ckpt["optimizer_states"][0]["state"].values())
    assert moments.count((4, 32, 64)) == 2 and moments.count((4, 64, 32)) == 2 and moments.count((4, 64)) == 2

    # Load on 1: the final EP checkpoint gives the single-process model's logits.
    one = _ep_lit.make_task()
    one.load_state_dict(ckpt["state_dict"])
    torch.testing.assert_close(_logits(one, images), ref_final, **TOL)

    # Resume on 1 process from the EP checkpoint after epoch 0: steps 4-6 == the single-process run's.
    resumed = _ep_lit.make_task()
    _trainer(tmp_path, "resume1", 1).fit(resumed, datamodule=_ep_lit.RankSlices(), ckpt_path=str(mid))
    r1_losses, _, _ = _read(tmp_path, "resume1", 1)
    torch.testing.assert_close(r1_losses, ref_losses[3:], **TOL)

    # Resume on 2 processes (experts and Adam state cut again): logits at the start (EP forward of the loaded
    # step-3 weights) == the step-3 model on one process, and steps 4-6 == the single-process run's.
    step3 = _ep_lit.make_task()
    step3.load_state_dict(torch.load(mid, map_location="cpu", weights_only=False)["state_dict"])
    resumed2 = _ep_lit.make_task()
    _trainer(tmp_path, "resume2", 2).fit(resumed2, datamodule=_ep_lit.RankSlices(), ckpt_path=str(mid))
    r2_losses, r2_logits0, _ = _read(tmp_path, "resume2", 2)
    torch.testing.assert_close(r2_logits0, _logits(step3, images), **TOL)
    torch.testing.assert_close(r2_losses, ref_losses[3:], **TOL)
