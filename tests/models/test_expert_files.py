"""Named expert files (Uni-MoE progressive training): stage-2 dense FFNs saved, stage-3 experts initialised from them
by a mapping written in the recipe, and the errors a wrong mapping gets."""

import lightning as L
import pytest
import torch

import zoo
from zoo.models.expert_files import init_experts_from_files, load_expert_file, save_expert_file
from zoo.moe import MoELayer


def _dense(seed):
    torch.manual_seed(seed)
    return zoo.create_model("decoder_tiny").eval()


def test_expert_e_starts_as_the_ffn_of_file_e(tmp_path):
    a, b = _dense(1), _dense(2)
    fa, fb = save_expert_file(a, tmp_path / "a.safetensors"), save_expert_file(b, tmp_path / "b.safetensors")
    moe = zoo.upcycle(_dense(3), num_experts=4, top_k=2, moe_layers="sparse")
    untouched = {i: blk.mlp.experts.w1[3].clone() for i, blk in enumerate(moe.blocks) if isinstance(blk.mlp, MoELayer)}
    assert untouched
    done = init_experts_from_files(moe, {0: fa, 2: str(fb)})
    assert done == {0: str(fa), 2: str(fb)}
    x = torch.randn(5, moe.config.dim)
    with torch.no_grad():
        for i, w1_before in untouched.items():
            experts = moe.blocks[i].mlp.experts
            torch.testing.assert_close(experts.expert(0, x), a.blocks[i].mlp(x), rtol=0, atol=1e-6)
            torch.testing.assert_close(experts.expert(2, x), b.blocks[i].mlp(x), rtol=0, atol=1e-6)
            assert not torch.allclose(experts.expert(0, x), experts.expert(2, x))
            assert torch.equal(experts.w1[3], w1_before)  # not in the mapping: kept


def test_bad_mappings_fail_clearly(tmp_path):
    a = _dense(1)
    fa = save_expert_file(a, tmp_path / "a.safetensors")
    moe = zoo.upcycle(_dense(3), num_experts=4, top_k=2, moe_layers="sparse")
    with pytest.raises(FileNotFoundError, match="export_ffn"):
        init_experts_from_files(moe, {0: tmp_path / "missing.safetensors"})
    with pytest.raises(ValueError, match="experts 0..3"):
        init_experts_from_files(moe, {4: fa})
    # a file from a model whose block 0 is already MoE holds no FFN for block 0
    partly_moe = zoo.upcycle(_dense(4), num_experts=2, top_k=1, moe_layers=[0])
    fp = save_expert_file(partly_moe, tmp_path / "p.safetensors")
    assert sorted(load_expert_file(fp).ffns) == list(range(1, len(partly_moe.blocks)))
    with pytest.raises(ValueError, match="no dense FFN for block 0"):
        init_experts_from_files(moe, {1: fp})
    other = torch.nn.Linear(2, 2)
    torch.save({}, tmp_path / "x.pt")
    from safetensors.torch import save_file

    save_file({"w": other.weight.detach()}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a zoo expert file"):
        load_expert_file(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="no dense FFN to save"):
        save_expert_file(zoo.upcycle(_dense(5), num_experts=2, top_k=1), tmp_path / "all_moe.safetensors")


def test_recipes_export_and_map_expert_files_by_run_name(tmp_path):
    """A stage-2 run with ``export_ffn`` writes ``runs/<run>/experts/<name>.safetensors``; a stage-3 run maps
    ``run:<run>/<name>`` onto an expert index and starts that expert from it."""
    from tests.conftest import shared_dataset_dir
    from zoo.data.instruct_sets import InstructSetsDataModule
    from zoo.tasks.instruct import InstructTask

    shared_dataset_dir("mnist", "t10k-images-idx3-ubyte.gz")
    dm = lambda: InstructSetsDataModule(tasks=["mnist"], num_train=16, num_val=4, num_test=4,  # noqa: E731
                                        image_size=32, tokens_per_image=16, batch_size=8, seed=0)

    def fit(task, run):
        L.seed_everything(0)
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                            default_root_dir=str(tmp_path / "runs" / run))
        trainer.fit(task, datamodule=dm())

    over = {"vision.image_size": 32}
    stage2 = InstructTask("moe_llava_tiny_dense", model_overrides=over, lr=1e-2, export_ffn="image")
    fit(stage2, "stage2_image")
    path = tmp_path / "runs" / "stage2_image" / "experts" / "image.safetensors"
    assert path.is_file()
    upcycle = dict(placement="sparse", num_experts=4, top_k=2, num_modalities=4)
    stage3 = InstructTask("moe_llava_tiny_dense", model_overrides=over, upcycle=upcycle,
                          vocab_size=stage2.hparams.vocab_size, expert_files={1: "run:stage2_image/image"},
                          trainable=["routers"])  # experts frozen: they must still hold the file's FFN
    fit(stage3, "stage3")
    x = torch.randn(3, stage3.model.decoder.config.dim)
    with torch.no_grad():
        got = stage3.model.decoder.blocks[0].mlp.experts.expert(1, x)
        want = stage2.model.decoder.blocks[0].mlp(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    bad = InstructTask("moe_llava_tiny_dense", model_overrides=over, upcycle=upcycle,
                       vocab_size=stage2.hparams.vocab_size, expert_files={0: "run:no_such_run/image"})
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        fit(bad, "stage3_bad")
