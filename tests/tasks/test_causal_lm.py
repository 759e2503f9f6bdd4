"""Causal-LM training: targets and loss masking, gradient checkpointing, the Flickr8k caption text data (split by
photo) and the recipes through train.py's CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

import zoo
from zoo.tasks.causal_lm import IGNORE, CausalLMTask, next_token_targets

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs" / "train").glob("lm_*.yaml"))


def test_next_token_targets_ignore_padding():
    ids = torch.tensor([[2, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0]])
    mask = ids != 0
    assert next_token_targets(ids, mask).tolist() == [[5, 6, 3, IGNORE, IGNORE], [7, 3, IGNORE, IGNORE, IGNORE]]


def test_loss_is_next_token_cross_entropy_plus_aux():
    torch.manual_seed(0)
    task = CausalLMTask(model="decoder_tiny_moe", vocab_size=50)
    ids = torch.randint(4, 50, (3, 10))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 6:] = False
    ids[~mask] = 0
    loss, out, targets = task._shared_step({"input_ids": ids, "attention_mask": mask}, "train")
    logits = out.logits[:, :-1]
    keep = targets != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep]) + out.aux_loss
    torch.testing.assert_close(loss, expected)
    assert out.aux_loss > 0 and keep.sum() == 3 * 9 - 4


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 512, (2, 12))
    grads = []
    losses = []
    for ckpt in (False, True, "except_moe"):
        torch.manual_seed(0)
        model = zoo.create_model("decoder_tiny_moe").train()
        model.gradient_checkpointing = ckpt
        out = model(ids)
        loss = out.logits.square().mean() + out.aux_loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == grads[2].keys() and len(grads[0]) > 10
    assert torch.equal(losses[0], losses[2])  # the same ops in the same order
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
        torch.testing.assert_close(grads[2][name], grads[0][name], msg=name)


@pytest.mark.parametrize("parallel_residual", [False, True])
def test_checkpointing_except_moe_runs_moe_layers_once_and_recomputes_the_rest(parallel_residual, monkeypatch):
    """``gradient_checkpointing="except_moe"``: each MoE layer runs once per step, outside any checkpoint (so its
    compiled routing may keep its CUDA graphs), every other part of every block is recomputed in the backward; the
    gradients equal an uncheckpointed run's (sequential and Phi-2's parallel residual)."""
    from zoo.layers.mlp import Mlp
    from zoo.moe import MoELayer, compiled

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # asked of a CPU-only torch here
    cuda = torch.device("cuda")
    overrides = {"parallel_residual": parallel_residual}
    ids = torch.randint(0, 512, (2, 10))
    grads = {}
    for ckpt in (False, "except_moe"):
        torch.manual_seed(0)
        model = zoo.create_model("decoder_tiny_moe", **overrides).train()
        model.gradient_checkpointing = ckpt
        calls = {"moe": [], "mlp": 0, "attn": 0}

        def moe_hook(m, a):
            calls["moe"].append(compiled.cuda_graphs_enabled(None, cuda))

        def count(key):
            def hook(m, a):
                calls[key] += 1
            return hook

        for block in model.blocks:
            if isinstance(block.mlp, MoELayer):
                block.mlp.register_forward_pre_hook(moe_hook)
            else:
                assert isinstance(block.mlp, Mlp)
                block.mlp.register_forward_pre_hook(count("mlp"))
            block.attn.register_forward_pre_hook(count("attn"))
        out = model(ids)
        (out.logits.square().mean() + out.aux_loss).backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        depth, moe = len(model.blocks), len(model.config.moe_layer_indices)
        dense = depth - moe
        runs = 1 if ckpt is False else 2
        assert calls["moe"] == [True] * moe  # once each, graphs allowed (the block-checkpointing test: off, twice)
        assert calls["mlp"] == runs * dense and calls["attn"] == runs * depth
    for name, g in grads[False].items():
        torch.testing.assert_close(grads["except_moe"][name], g, msg=name)


def test_gradient_checkpointing_values_are_checked():
    model = zoo.create_model("decoder_tiny_moe")
    with pytest.raises(ValueError, match="gradient_checkpointing must be one of"):
        model.gradient_checkpointing = "moe_only"
    task = CausalLMTask(model="decoder_tiny_moe", vocab_size=50, gradient_checkpointing="except_moe")
    assert task.model.gradient_checkpointing == "except_moe"


def test_task_refuses_a_non_decoder_preset():
    with pytest.raises(ValueError, match="needs a decoder LM preset"):
        CausalLMTask(model="vmoe_tiny_test")


def test_flickr8k_caption_text_is_split_by_photo(shared_dataset):
    shared_dataset("flickr8k_1k_subset", "captions.txt")
    from zoo.data.text import BOS, EOS, PAD, UNK, Flickr8kCaptionsLMDataModule

    dm = Flickr8kCaptionsLMDataModule(context_length=24, num_val=100)
    dm.setup()
    split = dm.split_indices
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (700, 100, 200)
    assert not set(split["train"]) & set(split["test"]) and not set(split["val"]) & set(split["test"])
    assert dm.split_sizes == {"train": 3500, "val": 500, "test": 1000}  # 5 captions per photo
    # the image-text datamodule's split rule: same permutation of photos for the same seed
    order = np.random.default_rng(0).permutation(1000)
    assert np.array_equal(split["test"], np.sort(order[800:1000]))
    train = dm.train_set.input_ids
    assert (train[:, 0] == BOS).all() and ((train == EOS).sum(1) == 1).all() and not (train == UNK).any()
    assert train.max() < dm.vocab_size < 5000
    test = dm.test_set.input_ids
    unk_share = float((test == UNK).sum() / (test != PAD).sum())
    assert 0 < unk_share < 0.1  # test photos have some words no training caption has
    item = dm.test_set[0]
    assert torch.equal(item["attention_mask"], item["input_ids"] != PAD)
    assert len(dm.vocab.decode(item["input_ids"][1:]).split()) >= 3


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_lm_recipes_instantiate(recipe, tmp_path, shared_dataset):
    shared_dataset("flickr8k_1k_subset", "captions.txt")
    from zoo.tasks.cli import build_cli

    cli = build_cli(["--config", str(recipe), f"--trainer.default_root_dir={tmp_path}"])
    assert type(cli.model).__name__ == "CausalLMTask"
    # the vocabulary size came from the data as soon as both existed
    assert cli.model.model.config.vocab_size == cli.datamodule.vocab_size == cli.model.hparams.vocab_size
    assert cli.run_name == recipe.stem


def test_moe_and_dense_recipes_have_equal_active_width():
    """The MoE recipe's k experts together are as wide as the dense recipe's MLP, same depth, width, data and
    optimiser (the perplexity comparison is fair)."""
    import yaml

    def task_of(name):
        recipe = yaml.safe_load((REPO / "configs" / "train" / f"{name}.yaml").read_text())
        args = dict(recipe["model"]["init_args"])
        return recipe, CausalLMTask(**args, vocab_size=100).model.config

    moe_recipe, moe = task_of("lm_tiny_flickr8k")
    dense_recipe, dense = task_of("lm_tiny_dense_flickr8k")
    assert moe.moe.top_k * moe.moe_mlp_dim == dense.mlp_dim and dense.moe is None
    assert (moe.depth, moe.dim, moe.num_heads) == (dense.depth, dense.dim, dense.num_heads)
    assert moe_recipe["data"] == dense_recipe["data"] and moe_recipe["trainer"] == dense_recipe["trainer"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="Lightning's FSDP strategy needs GPUs (it refuses "
                    "accelerator='cpu'); run on a machine with 2 GPUs")
def test_causal_lm_trains_under_fsdp():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(Path(__file__).with_name("_fsdp_lm.py"))], capture_output=True,
                            text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP OK steps=3" in result.stdout


def test_configure_model_is_a_no_op_without_a_device_mesh():
    """Outside ModelParallelStrategy (no device mesh) the model keeps its plain parameters, the same tensors."""
    task = CausalLMTask(model="decoder_tiny_moe", vocab_size=50)
    before = dict(task.model.named_parameters())
    task.configure_model()
    after = dict(task.model.named_parameters())
    assert before.keys() == after.keys() and all(after[n] is before[n] for n in before)
    assert all(type(p) is torch.nn.Parameter for p in after.values())


def test_sharding_refuses_a_tensor_parallel_mesh():
    """Lightning's default mesh for 2 devices on one node is (data_parallel=1, tensor_parallel=2): the zoo has no
    tensor-parallel plan, so sharding over it is refused with the setting to use instead, before any module changes."""
    from zoo.tasks.causal_lm import fully_shard_decoder

    class Dim:
        def __init__(self, n):
            self.n = n

        def size(self):
            return self.n

    class Mesh:  # the two things fully_shard_decoder reads of a DeviceMesh
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return Dim({"data_parallel": 1, "tensor_parallel": 2}[name])

    task = CausalLMTask(model="decoder_tiny_moe", vocab_size=50)
    with pytest.raises(ValueError, match="tensor_parallel=2.*tensor_parallel_size=1"):
        fully_shard_decoder(task.model, Mesh())
    assert all(type(p) is torch.nn.Parameter for p in task.model.parameters())


@pytest.mark.timeout(300)
def test_causal_lm_trains_sharded_on_cpu_and_matches_one_process(tmp_path):
    """FSDP2 on CPU: Lightning's ModelParallelStrategy, 2 processes over gloo, 3 steps of the tiny MoE LM (with
    gradient clipping that binds). The parameters are DTensors sharded on dim 0 (each rank holds half of every
    weight, the two halves make the full tensor), the optimiser holds those sharded tensors, and the run equals one
    process replaying the same samples (rank 0's then rank 1's batch as two accumulated micro-batches per step):
    same training losses per rank and step, same final parameters, same loss of the final model."""
    import subprocess
    import sys

    script = str(Path(__file__).with_name("_fsdp2_cpu_lm.py"))
    for mode in ("sharded", "single"):
        result = subprocess.run([sys.executable, script, mode, str(tmp_path)], capture_output=True, text=True,
                                timeout=240, cwd=REPO)
        assert result.returncode == 0, f"{mode}: {result.stderr[-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = torch.load(tmp_path / "single.pt", weights_only=False)

    assert [r["steps"] for r in ranks] == [3, 3] and single["steps"] == 3
    # Data parallel: per step the two ranks train on disjoint samples (8 each).
    for a, b in zip(ranks[0]["indices"], ranks[1]["indices"]):
        assert len(a) == len(b) == 8 and not set(a) & set(b)
    assert len(ranks[0]["indices"]) == 3

    # Really sharded: every parameter a DTensor split on dim 0 over the 2 ranks; the halves rebuild the full tensor.
    full = ranks[0]["full"]
    for name, held in ranks[0]["params"].items():
        other = ranks[1]["params"][name]
        assert held["dtensor"] and held["placements"] == [("Shard", 0)], (name, held["placements"])
        assert held["shape"] == tuple(full[name].shape)
        torch.testing.assert_close(torch.cat([held["local"], other["local"]]), full[name], rtol=0, atol=0)
    for big in ("blocks.0.mlp.experts.w1", "embed.weight", "lm_head.weight"):
        local, shape = ranks[0]["params"][big]["local"], ranks[0]["params"][big]["shape"]
        assert local.shape[0] == shape[0] // 2 and local.numel() == full[big].numel() // 2, big
    # The optimiser was built after sharding: it steps the DTensors, with the same decay / no-decay split.
    assert all(r["optimizer_holds_model_params"] for r in ranks)
    assert ranks[0]["optimizer_names"] == single["optimizer_names"]

    # Same training: losses (rank 0 and rank 1 per step = the replay's micro-batches), parameters, final loss.
    assert single["indices"] == [ranks[r]["indices"][step] for step in range(3) for r in range(2)]
    sharded_losses = [ranks[r]["losses"][step] for step in range(3) for r in range(2)]
    assert sharded_losses == pytest.approx(single["losses"], rel=1e-4)
    assert full.keys() == single["full"].keys()
    torch.manual_seed(0)
    initial = dict(CausalLMTask(model="decoder_tiny_moe", vocab_size=100).model.named_parameters())
    moved = max(float((single["full"][n] - initial[n]).abs().max()) for n in full)
    assert moved > 1e-3  # training changed the weights, so agreeing below is not agreeing on the init
    for name in full:
        torch.testing.assert_close(full[name], single["full"][name], rtol=1e-4, atol=1e-6, msg=name)

    sys.path.insert(0, str(Path(script).parent))
    try:
        from _fsdp2_cpu_lm import RandomTokens
    finally:
        sys.path.remove(str(Path(script).parent))
    ids = RandomTokens().ids
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}
    final = []
    for params in (full, single["full"]):
        task = CausalLMTask(model="decoder_tiny_moe", vocab_size=100).eval()
        task.model.load_state_dict(params)
        with torch.no_grad():
            final.append(float(task._shared_step(batch, "val")[0]))
    assert final[0] == pytest.approx(final[1], rel=1e-4)


def test_test_pass_reports_routing_and_records_only_then():
    """A test pass fills ``test_routing`` through RoutingReport (tokens per expert = the layers' kept slots, the
    examples counted); the layers record their routing only during that pass."""
    import lightning as L

    from zoo.moe import moe_layers

    torch.manual_seed(0)
    task = CausalLMTask(model="decoder_tiny_moe", vocab_size=50)
    ids = torch.randint(4, 50, (6, 10))
    loader = torch.utils.data.DataLoader([{"input_ids": row, "attention_mask": torch.ones(10, dtype=torch.bool)}
                                          for row in ids], batch_size=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.test(task, loader, verbose=False)
    routing = task.test_routing
    layers = moe_layers(task.model)
    assert routing.layer_names == task.layer_names and len(routing.tokens_per_expert) == len(layers) > 0
    assert routing.num_examples == 6
    k = layers[0].config.k(False)
    for tokens, dropped in zip(routing.tokens_per_expert, routing.dropped_fraction):
        assert float(tokens.sum()) == pytest.approx((1 - dropped) * k * 6 * 10)
    assert not any(layer.record_routing for layer in layers) and all(layer.last_routing is None for layer in layers)


def test_param_groups_with_tied_embeddings():
    """A tied LM head shares the token embedding: the optimiser gets that tensor once, without weight decay (it is
    an embedding), under the name ``named_parameters`` gives it; a training step runs."""
    from zoo.tasks.optim import build_optimizer, param_groups

    task = CausalLMTask(model="decoder_tiny_moe", vocab_size=50, model_overrides={"tie_embeddings": True})
    model = task.model
    assert model.lm_head.weight is model.embed.weight
    groups = param_groups(model, 0.1)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # every tensor once
    tied = {n for n, p in model.named_parameters() if p is model.lm_head.weight}
    assert len(tied) == 1 and tied <= set(groups[-1]["names"]) and groups[-1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.1)
    ids = torch.randint(4, 50, (2, 8))
    loss, _, _ = task._shared_step({"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)},
                                   "train")
    loss.backward()
    optimizer.step()


def test_strategies_writing_sharded_checkpoint_folders_are_refused_with_the_setting_to_use():
    """A zoo run keeps one checkpoint file per save (resume, eval.py, init_from read it): ModelParallelStrategy's
    default (sharded folders) and FSDPStrategy(state_dict_type="sharded") are refused before training, naming the
    init_args that write one file; those settings and plain DDP pass."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    from zoo.tasks.cli import refuse_sharded_checkpoints

    with pytest.raises(ValueError, match='"save_distributed_checkpoint": false'):
        refuse_sharded_checkpoints(ModelParallelStrategy())
    with pytest.raises(ValueError, match='"state_dict_type": "full"'):
        refuse_sharded_checkpoints(FSDPStrategy(state_dict_type="sharded"))
    for ok in (ModelParallelStrategy(save_distributed_checkpoint=False), FSDPStrategy(), DDPStrategy()):
        refuse_sharded_checkpoints(ok)


def _check_compile_blocks(ckpt, mode, spy_compiled_once, compiled_functions: set, graphs: int,
                          moe_calls_per_layer: Optional[int] = None) -> None:
    """Loss and gradients of ``decoder_tiny_moe`` (MoE in blocks 0 and 2 of 4) with ``compile_blocks=mode`` equal the
    eager run's (inductor may round differently), compiling exactly ``compiled_functions`` into ``graphs`` dynamo
    graphs without a graph break, each MoE layer called ``moe_calls_per_layer`` times a step (where the layers run
    eagerly: 2 when their checkpoint recomputes them); evaluation compiles nothing."""
    from torch._dynamo.utils import counters

    from zoo.models import decoder as decoder_module

    asked = spy_compiled_once(decoder_module)
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, 512, (2, 10))
    runs = {}
    for compile_blocks in (False, mode):
        torch.manual_seed(0)
        model = zoo.create_model("decoder_tiny_moe").train()
        model.gradient_checkpointing = ckpt
        model.compile_blocks = compile_blocks
        calls = []
        moe_layers = [block.mlp for block in model.blocks if block.moe_position]
        if moe_calls_per_layer is not None and compile_blocks:
            for layer in moe_layers:
                layer.register_forward_pre_hook(lambda m, a: calls.append(m))
        out = model(ids)
        loss = out.logits.square().mean() + out.aux_loss
        loss.backward()
        runs[compile_blocks] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.grad is not None})
    assert set(asked) == compiled_functions
    if moe_calls_per_layer is not None:
        assert len(calls) == moe_calls_per_layer * len(moe_layers) > 0
    # a break inside the stack's block loop makes dynamo skip the whole loop: asked, but nothing compiled
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(runs[mode][0], runs[False][0], rtol=1e-5, atol=1e-6)
    assert runs[mode][1].keys() == runs[False][1].keys() and len(runs[False][1]) > 10
    for name, g in runs[False][1].items():
        torch.testing.assert_close(runs[mode][1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    asked.clear()
    with torch.no_grad():
        model.eval()(ids)
    assert asked == []


INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
WHOLE_STACK_CASES = [(False, True), ("except_moe", True), ("except_moe", "cuda_graphs")]


@pytest.mark.parametrize("ckpt,mode", [(True, True), ("except_moe", True), (False, "cuda_graphs")])
def test_compile_blocks_compiles_block_by_block_where_the_stack_cannot_be_one_graph(ckpt, mode, spy_compiled_once):
    """``DecoderLM.compile_blocks`` with whole-block checkpoints (MoE layers inside checkpoints), or with MoE layers
    that break graphs (the CPU's reference dispatcher; under TRITON_INTERPRET=1 the fused path would trace): dense
    blocks compiled whole, MoE blocks' attention parts, the MoE layers eager in between."""
    if INTERPRETED and ckpt is not True:
        pytest.skip("under TRITON_INTERPRET=1 the fused experts trace: the whole stack is one graph")
    _check_compile_blocks(ckpt, mode, spy_compiled_once, {"_dense_block", "_attention_part"}, graphs=2,
                          moe_calls_per_layer=2 if ckpt is True else 1)


@pytest.mark.skipif(not INTERPRETED, reason="needs the fused experts: runs in the TRITON_INTERPRET=1 process of "
                                            "test_compile_blocks_traces_the_whole_stack_with_fused_experts")
@pytest.mark.parametrize("ckpt,mode", WHOLE_STACK_CASES)
def test_compile_blocks_whole_stack(ckpt, mode, spy_compiled_once):
    _check_compile_blocks(ckpt, mode, spy_compiled_once, {"_training_blocks"}, graphs=1)


@pytest.mark.skipif(not INTERPRETED, reason="needs the fused experts: runs in the TRITON_INTERPRET=1 process of "
                                            "test_compile_blocks_traces_the_whole_stack_with_fused_experts")
def test_compile_blocks_whole_stack_moe_llava():
    """The stage-III MoE-LLaVA step as the benchmark runs it (spliced image tokens as inputs_embeds, modality ids,
    "except_moe", the dense blocks checkpointed whole): two graphs (the block stack and the shifted cross-entropy,
    which the compile option compiles too), no break, the eager loss and gradients."""
    from torch._dynamo.utils import counters

    from zoo.models.freeze import apply_freeze, moe_tuning_stage
    from zoo.models.multimodal import IMAGE_TOKEN_ID

    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for compile_blocks in (False, True):
        torch.manual_seed(0)
        model = zoo.create_model("moe_llava_tiny")
        apply_freeze(model, moe_tuning_stage(3))
        model.decoder.gradient_checkpointing = "except_moe"
        model.decoder.compile_blocks = compile_blocks
        model.train()
        ids = torch.randint(0, model.config.decoder.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
        ids[:, 1] = IMAGE_TOKEN_ID
        images = torch.randn(2, 3, model.config.vision.image_size, model.config.vision.image_size,
                             generator=torch.Generator().manual_seed(2))
        out = model(ids, torch.ones_like(ids, dtype=torch.bool), images, ids.clone())
        out.loss.backward()
        runs[compile_blocks] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.grad is not None})
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-6)
    assert runs[True][1].keys() == runs[False][1].keys() and runs[False][1]
    for name, g in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_blocks_traces_the_whole_stack_with_fused_experts():
    """With MoE layers on the fused experts (the GPU path; here its Triton kernels under TRITON_INTERPRET=1, which
    Triton reads at import: a fresh process) and no whole-block checkpoints, the block stack is ONE compiled function
    (``_training_blocks``), for "cuda_graphs" too (no replay on the CPU: tests/models/test_decoder_gpu.py replays
    it), with the eager run's loss and gradients."""
    if INTERPRETED:
        pytest.skip("this is the interpreted process itself")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                           "-k", "test_compile_blocks_whole_stack"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 and f"{len(WHOLE_STACK_CASES) + 1} passed" in proc.stdout, proc.stdout[-3000:]


def test_compile_blocks_values_are_checked_and_the_task_sets_them():
    model = zoo.create_model("decoder_tiny_moe")
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="compile_blocks must be one of"):
            model.compile_blocks = bad
    assert CausalLMTask(model="decoder_tiny_moe", vocab_size=50, compile=True).model.compile_blocks is True
    assert CausalLMTask(model="decoder_tiny_moe", vocab_size=50).model.compile_blocks is False
