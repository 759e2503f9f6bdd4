"""Uni-MoE progressive training through InstructTask on real FSDD speech and MNIST images (tiny model, a few CPU
steps per stage): (1) connectors only, (2) one dense run per modality writing its FFNs as a named expert file,
(3) the unified MoE with expert e started from the file the recipe maps to it, routers and experts trained."""

import lightning as L
import torch

from zoo.tasks.instruct import InstructTask

DENSE = {"decoder.moe": None, "decoder.moe_placement": None}


def _dm(tasks, tokenizer="compact"):
    from zoo.data.instruct_sets import InstructSetsDataModule

    return InstructSetsDataModule(tasks=tasks, num_train=16, num_val=4, num_test=4, image_size=32, tokens_per_image=16,
                                  tokens_per_audio=8, batch_size=8, seed=0, tokenizer=tokenizer)


def _fit(task, tasks, root, run, steps=2, tokenizer="compact"):
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=str(root / "runs" / run))
    trainer.fit(task, datamodule=_dm(tasks, tokenizer))
    trainer.save_checkpoint(root / "runs" / run / "checkpoints" / "last.ckpt")
    return task


def _params(task):
    return {k: v.detach().clone() for k, v in task.model.named_parameters()}


def test_three_progressive_stages(tmp_path):
    from tests.conftest import shared_dataset_dir

    shared_dataset_dir("mnist", "t10k-images-idx3-ubyte.gz")
    shared_dataset_dir("fsdd", "recordings/3_jackson_7.wav")
    both = ["fsdd", "mnist"]
    s1 = InstructTask("uni_moe_tiny", model_overrides=DENSE, trainable=["projector", "audio_connector"], lr=1e-2,
                      warmup_steps=1)
    dm = _dm(both)
    dm.setup()
    s1.adapt_to_datamodule(dm)  # sizes the vocabulary (the model is rebuilt once, here)
    before = _params(s1)
    _fit(s1, both, tmp_path, "stage1")
    moved = {k for k, v in _params(s1).items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith(("projector.", "audio_connector.")) for k in moved), [k for k in moved if not k.startswith(("projector.", "audio_connector."))]
    assert any(k.startswith("audio_connector.") for k in moved)  # speech samples reached the connector
    vocab = s1.hparams.vocab_size

    experts = {}
    for name, tasks in (("speech", ["fsdd"]), ("image", ["mnist"])):
        s2 = InstructTask("uni_moe_tiny", model_overrides=DENSE, vocab_size=vocab, init_from="run:stage1",
                          trainable=["dense_ffn"], export_ffn=name, lr=1e-2, warmup_steps=1)
        # one modality's data, the vocabulary of all stages (every stage's model must share it)
        _fit(s2, tasks, tmp_path, f"stage2_{name}", tokenizer=dm.tokenizer)
        experts[name] = s2
        assert (tmp_path / "runs" / f"stage2_{name}" / "experts" / f"{name}.safetensors").is_file()

    upcycle = dict(placement="all", num_experts=4, top_k=2, renormalize=True, dropless=True, num_modalities=4,
                   switch_loss_weight=0.01)
    s3 = InstructTask("uni_moe_tiny", model_overrides=DENSE, vocab_size=vocab, init_from="run:stage1",
                      upcycle=upcycle, expert_files={0: "run:stage2_speech/speech", 1: "run:stage2_image/image"},
                      trainable=["routers", "experts"], lr=1e-2, warmup_steps=1)
    x = torch.randn(3, s3.model.decoder.config.dim)
    s3.trainer = None
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path / "runs" / "stage3"))
    s3._trainer = trainer  # what fit does before on_fit_start; lets the start be checked before any step
    s3.on_fit_start()
    with torch.no_grad():
        for b, block in enumerate(s3.model.decoder.blocks):
            for e, name in enumerate(("speech", "image")):
                want = experts[name].model.decoder.blocks[b].mlp(x)
                torch.testing.assert_close(block.mlp.experts.expert(e, x), want, rtol=0, atol=1e-6)
    s3._trainer = None
    s3b = InstructTask("uni_moe_tiny", model_overrides=DENSE, vocab_size=vocab, init_from="run:stage1",
                       upcycle=upcycle, expert_files={0: "run:stage2_speech/speech", 1: "run:stage2_image/image"},
                       trainable=["routers", "experts"], lr=1e-2, warmup_steps=1)
    _fit(s3b, both, tmp_path, "stage3", steps=2)
    out = s3b.model.decoder.blocks[0].mlp
    assert out.experts.w1.requires_grad and not s3b.model.projector[0].weight.requires_grad
