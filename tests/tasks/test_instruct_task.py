"""InstructTask: MoE-Tuning's three stages on real MNIST instruction data (tiny model, a few CPU steps each). (Named apart from tests/data/test_instruct.py: test folders have no __init__, so basenames must be unique.)"""

import lightning as L
import pytest
import torch

from zoo.tasks.instruct import InstructTask, score_answers

TINY = {"vision.image_size": 32}


@pytest.fixture(scope="module")
def mnist_questions():
    from tests.conftest import shared_dataset_dir
    from zoo.data.instruct_sets import InstructSetsDataModule

    shared_dataset_dir("mnist", "t10k-images-idx3-ubyte.gz")
    return lambda: InstructSetsDataModule(tasks=["mnist", "pope"], task_options={"pope": {"source": "mnist"}},
                                          num_train=24, num_val=4, num_test=4, image_size=32, tokens_per_image=16,
                                          batch_size=8, seed=0)


def _fit(task, dm, tmp_path, steps=2):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(task, datamodule=dm)
    return trainer


def _state(task):
    return {k: v.detach().clone() for k, v in task.model.state_dict().items()}


def test_three_stages_train_what_their_spec_names(mnist_questions, tmp_path, capsys):
    L.seed_everything(0)
    stage1 = InstructTask("moe_llava_tiny_dense", model_overrides=TINY, trainable=["projector"], lr=1e-2,
                          warmup_steps=1)
    dm = mnist_questions()
    dm.setup()
    stage1.adapt_to_datamodule(dm)
    before = _state(stage1)
    trainer = _fit(stage1, dm, tmp_path)
    assert "trainable / frozen parameters per group" in capsys.readouterr().out
    after = _state(stage1)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projector.") for k in changed)  # stage I: the projector only
    ckpt1 = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(ckpt1)

    stage2 = InstructTask("moe_llava_tiny_dense", model_overrides=TINY, init_from=str(ckpt1), lr=1e-2,
                          warmup_steps=1, trainable=["projector", "embeddings", "attention", "norms", "dense_ffn",
                                                     "lm_head"])
    trainer = _fit(stage2, mnist_questions(), tmp_path)
    s2 = _state(stage2)
    assert torch.equal(s2["vision_tower.pos_embed"], after["vision_tower.pos_embed"])  # frozen, from stage I
    assert not torch.equal(s2["decoder.blocks.0.attn.q_proj.weight"], after["decoder.blocks.0.attn.q_proj.weight"])
    ckpt2 = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(ckpt2)

    upcycle = dict(placement="sparse", num_experts=4, top_k=2, renormalize=True, capacity_factor=1.5,
                   eval_capacity_factor=2.0, group_size=1, num_modalities=4, importance_loss_weight=0.0,
                   load_loss_weight=0.0, switch_loss_weight=0.01)
    stage3 = InstructTask("moe_llava_tiny_dense", model_overrides=TINY, init_from=str(ckpt2), upcycle=upcycle,
                          trainable=["experts", "routers"], vocab_size=stage2.hparams.vocab_size)
    stage3._load_previous_stage(str(ckpt2))  # what on_fit_start does in a fresh run
    # every expert starts as the stage-II FFN and the top-2 gates sum to 1: the model computes stage II's function
    dm = mnist_questions()
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    stage2.model.eval(), stage3.model.eval()
    with torch.no_grad():
        dense = stage2.model(batch["input_ids"], batch["attention_mask"], images=batch["images"])
        moe = stage3.model(batch["input_ids"], batch["attention_mask"], images=batch["images"])
    real = moe.attention_mask  # padding is never routed (its MoE output is 0), so only real tokens are compared
    assert len(stage3.layer_names) == 2 and (dense.logits - moe.logits)[real].abs().max() <= 1e-4
    trainable = {n.split(".mlp.")[-1].split(".")[0] for n, p in stage3.model.named_parameters() if p.requires_grad}
    assert trainable == {"router", "experts"}


def test_unknown_group_and_missing_previous_run(tmp_path):
    with pytest.raises(ValueError, match="unknown.*'projecter'.*projector"):
        InstructTask("moe_llava_tiny_dense", trainable=["projecter"])
    task = InstructTask("moe_llava_tiny_dense", init_from="run:stage_that_never_ran")
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=str(tmp_path / "runs" / "this_stage"))
    task.trainer = trainer
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*runs/stage_that_never_ran/checkpoints/last.ckpt"):
        task._resolve_init_from("run:stage_that_never_ran")


def test_scores_per_task_kind():
    answers = [
        {"task": "mnist", "answer": "7.", "references": ["7"]},
        {"task": "mnist", "answer": "1", "references": ["7"]},
        {"task": "pope", "answer": "Yes", "references": ["yes"]},
        {"task": "pope", "answer": "yes", "references": ["no"]},
        {"task": "pope", "answer": "no", "references": ["no"]},
        {"task": "pope", "answer": "no", "references": ["no"]},
        {"task": "caps", "answer": "a dog runs on the grass", "references": ["a dog runs on the grass", "a dog"]},
        # CIDEr's idf needs more than one image: with one, every n-gram is in every image's references (idf 0)
        {"task": "caps", "answer": "two children play in the snow", "references": ["two children play in the snow"]},
    ]
    m = score_answers(answers, {"pope": "yes_no", "caps": "caption"})
    assert m["mnist/exact_match"] == 0.5
    assert m["pope/accuracy"] == 0.75 and m["pope/yes_ratio"] == 0.5
    assert m["caps/exact_match"] == 1.0 and m["caps/bleu4"] == pytest.approx(1.0, abs=1e-6) and m["caps/cider"] > 0


def test_media_reach_the_model_by_name_and_unknown_media_are_refused():
    """The task passes each medium of the batch to the model by the name its forward takes; a medium the model has
    no encoder for (audio for MoE-LLaVA) is an error, never dropped in silence."""
    task = InstructTask("moe_llava_tiny_dense", model_overrides=TINY)
    images = torch.zeros(1, 3, 32, 32)
    assert set(task._media({"input_ids": torch.zeros(1, 2), "images": images, "video": None})) == {"images"}
    with pytest.raises(ValueError, match=r"\['audio', 'audio_lengths'\].*takes no such input"):
        task._media({"images": images, "audio": torch.zeros(1, 160), "audio_lengths": torch.tensor([160])})
