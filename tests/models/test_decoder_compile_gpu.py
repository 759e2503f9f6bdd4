"""``DecoderLM.compile_blocks`` and ``MoELLaVA.compile_tower`` on the GPU, where the MoE layers take the fused
experts and the whole block stack is one compiled function (``_training_blocks``), replayed as CUDA graphs with
``"cuda_graphs"``: several optimizer steps (one of them accumulating two micro-batches, whose gradients must survive
the next replay) give the eager run's losses and weights (SGD). Skipped without CUDA (the CPU tests in
tests/tasks/test_causal_lm.py cover the plumbing: the CPU compiles no CUDA graphs).

Session 17, H200 (torch 2.11): 6 passed; session 18 (with the no-sync step test): 9 passed."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import zoo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fused experts, CUDA graphs)")


def train(compile_blocks, checkpointing, steps: int = 3):
    torch.manual_seed(0)
    model = zoo.create_model("decoder_tiny_moe").cuda().train()
    model.gradient_checkpointing = checkpointing
    model.compile_blocks = compile_blocks
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # not Adam: it turns rounding-level gradients into whole steps
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (2, 16), generator=gen).cuda() for _ in range(steps + 1)]
    losses = []
    for i in range(steps):
        micro = batches[i:i + 2] if i == 1 else batches[i:i + 1]  # step 1 accumulates two micro-batches
        for ids in micro:
            out = model(ids)
            loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            (loss + out.aux_loss).backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, "except_moe"])
@pytest.mark.parametrize("mode", [True, "cuda_graphs"])
def test_compiled_stack_trains_as_eager(mode, checkpointing, spy_compiled_once):
    from zoo.models import decoder as decoder_module

    asked = spy_compiled_once(decoder_module)
    eager_losses, eager_weights = train(False, checkpointing)
    torch._dynamo.reset()
    counters.clear()
    losses, weights = train(mode, checkpointing)
    assert asked and set(asked) == {"_training_blocks"}
    # one graph for the stack (the MoE layers' routing traced in, not compiled apart), no break, no recompilation
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-3, atol=1e-4)
    for name, w in eager_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-3, atol=1e-4, msg=name)


def stage3_moe_llava(compile_option):
    """The tiny MoE-LLaVA on the GPU as the stage-III benchmark trains it (``except_moe``, the task's compile option)."""
    from zoo.models.freeze import apply_freeze, moe_tuning_stage

    torch.manual_seed(0)
    model = zoo.create_model("moe_llava_tiny").cuda()
    apply_freeze(model, moe_tuning_stage(3))
    model.decoder.gradient_checkpointing = "except_moe"
    model.decoder.compile_blocks = compile_option
    model.compile_tower = bool(compile_option)
    return model.train()


def train_moe_llava(compile_option, steps: int = 3):
    from zoo.models.multimodal import IMAGE_TOKEN_ID

    model = stage3_moe_llava(compile_option)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    size = model.config.vision.image_size
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.decoder.vocab_size, (2, 9), generator=gen)
        ids[:, 1] = IMAGE_TOKEN_ID
        images = torch.randn(2, 3, size, size, generator=gen)
        ids, images = ids.cuda(), images.cuda()
        out = model(ids, torch.ones_like(ids, dtype=torch.bool), images, ids.clone())
        out.loss.backward()
        losses.append(out.loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


@pytest.mark.parametrize("mode", [True, "cuda_graphs"])
def test_compiled_moe_llava_step_trains_as_eager(mode):
    """The stage-III step with the tower compiled and replayed as a CUDA graph and the decoder compiled whole: the
    eager run's losses over several steps (the tower's features live in the graph pool until the next replay)."""
    eager = train_moe_llava(False)
    compiled = train_moe_llava(mode)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mode", [False, True, "cuda_graphs"])
def test_moe_llava_training_step_launches_without_a_sync_after_its_host_read(mode):
    """After splice_media's one host read of the ids, a stage-III forward + loss + backward queues its work without
    waiting for the GPU: the image encoder here first queues ~0.5 s of GPU sleep, and the step's host side must return
    with it still running (a sync anywhere, e.g. a blocking copy or a boolean index, would wait it out)."""
    from zoo.models.multimodal import IMAGE_TOKEN_ID

    model = stage3_moe_llava(mode)
    size = model.config.vision.image_size
    ids = torch.randint(0, model.config.decoder.vocab_size, (2, 9))
    ids[:, 1] = IMAGE_TOKEN_ID
    ids, images, mask = ids.cuda(), torch.randn(2, 3, size, size).cuda(), torch.ones(2, 9, dtype=torch.bool).cuda()
    for _ in range(3):  # compile and record first
        model(ids, mask, images, ids.clone()).loss.backward()
    encode = model.encode_images

    def slow_encode(x):
        torch.cuda._sleep(int(1e9))
        return encode(x)

    model.encode_images = slow_encode
    torch.cuda.synchronize()
    out = model(ids, mask, images, ids.clone())
    out.loss.backward()
    assert not torch.cuda.current_stream().query(), "the step waited for the GPU after the host read"
    torch.cuda.synchronize()
    assert torch.isfinite(out.loss)
