"""Uni-MoE v1 stage 3 with LoRA (InstructTask ``lora:``): the experts start as the stage-2 FFN files (frozen
per-expert bases, B = 0), only routers + LoRA factors train, merged == unmerged after training, and a resumed run
restores the LoRA weights exactly. Tiny model, MNIST only, 2 CPU steps; stage 1 / 2 outputs are written directly."""

import copy

import lightning as L
import torch

import zoo
from zoo.layers import LoRALinear
from zoo.models.expert_files import save_expert_file
from zoo.models.lora_spec import lora_parameter_names, merge_all_lora
from zoo.moe import LoRAExperts
from zoo.tasks.instruct import InstructTask

DENSE = {"decoder.moe": None, "decoder.moe_placement": None}
UPCYCLE = dict(placement="all", num_experts=4, top_k=2, renormalize=True, dropless=True, num_modalities=4,
               switch_loss_weight=0.01)


def _dm():
    from zoo.data.instruct_sets import InstructSetsDataModule

    return InstructSetsDataModule(tasks=["mnist"], num_train=16, num_val=4, num_test=4, image_size=32,
                                  tokens_per_image=16, batch_size=8, seed=0)


def _dense(seed, vocab):
    torch.manual_seed(seed)
    return zoo.create_model("uni_moe_tiny", **DENSE, **{"decoder.vocab_size": vocab}).eval()


def _stage3(vocab):
    return InstructTask("uni_moe_tiny", model_overrides=DENSE, vocab_size=vocab, init_from="run:s1", upcycle=UPCYCLE,
                        expert_files={0: "run:s2_a/a", 1: "run:s2_b/b"}, trainable=["routers", "lora"],
                        lora={"experts": True, "modules": ["attention"], "r": 2, "alpha": 4}, lr=1e-2,
                        warmup_steps=1)


def _trainer(root, steps, callbacks=()):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                     default_root_dir=str(root / "runs" / "s3"), callbacks=list(callbacks))


class _AtStart(L.Callback):
    """Runs after InstructTask.on_fit_start (init_from, expert files), before the first step."""

    def on_train_start(self, trainer, task):
        self.params = {k: v.detach().clone() for k, v in task.model.named_parameters()}
        self.check(task)


def test_stage3_lora_starts_as_the_files_trains_only_routers_and_factors_merges_and_resumes(tmp_path):
    from tests.conftest import shared_dataset_dir

    shared_dataset_dir("mnist", "t10k-images-idx3-ubyte.gz")
    dm = _dm()
    dm.setup()
    vocab = dm.vocab_size
    stage1 = _dense(5, vocab)
    state = {f"model.{k}": v for k, v in stage1.state_dict().items()}
    (tmp_path / "runs" / "s1" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": state, "global_step": 0, "pytorch-lightning_version": L.__version__},
               tmp_path / "runs" / "s1" / "checkpoints" / "last.ckpt")
    files = {name: _dense(seed, vocab) for name, seed in (("a", 6), ("b", 7))}
    for name, model in files.items():
        save_expert_file(model, tmp_path / "runs" / f"s2_{name}" / "experts" / f"{name}.safetensors")

    task = _stage3(vocab)
    x = torch.randn(3, task.model.decoder.config.dim)

    def check(t):
        with torch.no_grad():
            for b, block in enumerate(t.model.decoder.blocks):
                experts = block.mlp.experts
                assert isinstance(experts, LoRAExperts) and experts.per_expert_base
                assert all(float(f.abs().sum()) == 0 for f in (experts.lora_b1, experts.lora_b2))
                for e, src in enumerate((files["a"], files["b"], stage1, stage1)):  # 2, 3: upcycled stage 1
                    want = src.decoder.blocks[b].mlp(x)
                    torch.testing.assert_close(experts.expert(e, x), want, rtol=0, atol=1e-6)
                    torch.testing.assert_close(experts.stacked().expert(e, x), want, rtol=0, atol=1e-6)
                q = block.attn.o_proj
                assert isinstance(q, LoRALinear) and torch.equal(q.base.weight, stage1.decoder.blocks[b].attn.o_proj.weight)

    start = _AtStart()
    start.check = check
    L.seed_everything(0)
    trainer = _trainer(tmp_path, 2, [start])
    trainer.fit(task, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "runs" / "s3" / "checkpoints" / "last.ckpt")
    after = {k: v.detach().clone() for k, v in task.model.named_parameters()}
    moved = {k for k, v in after.items() if not torch.equal(v, start.params[k])}
    lora = lora_parameter_names(task.model)
    assert {n for n, p in task.model.named_parameters() if p.requires_grad} == lora | {
        n for n in after if ".router." in n}
    assert moved and moved <= lora | {n for n in after if ".router." in n}, sorted(moved - lora)[:4]
    assert any(n.endswith("experts.lora_b1") for n in moved) and any(".router." in n for n in moved)
    assert any(n.endswith("o_proj.lora_B") for n in moved)

    task.model.eval()  # merged == unmerged on a real batch
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        unmerged = task(batch).logits
        merged_model = copy.deepcopy(task.model)
        assert merge_all_lora(merged_model) > len(task.model.decoder.blocks)  # attention linears + experts
        assert not lora_parameter_names(merged_model)
        task.model, kept = merged_model, task.model
        torch.testing.assert_close(task(batch).logits, unmerged, rtol=1e-4, atol=1e-4)
        task.model = kept

    resumed = _stage3(vocab)  # a resumed run: the checkpoint restores bases AND factors exactly, no file re-init
    trainer = _trainer(tmp_path, 2)
    trainer.fit(resumed, datamodule=dm, ckpt_path=str(tmp_path / "runs" / "s3" / "checkpoints" / "last.ckpt"))
    got = dict(resumed.model.named_parameters())
    assert set(got) == set(after) and all(torch.equal(got[k], v) for k, v in after.items())
