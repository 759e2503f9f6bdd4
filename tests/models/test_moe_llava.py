"""The MoE-LLaVA-style model: splicing with mixed batches, label masking, right padding, eval determinism, causal
routing, freeze groups and bad inputs (issue 19's list), on the tiny preset with random weights."""

import pytest
import torch

import zoo
from zoo.models.freeze import apply_freeze, moe_tuning_stage, param_groups
from zoo.models.multimodal import IGNORE_INDEX, IMAGE_TOKEN_ID
from zoo.moe import MoELayer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return zoo.create_model("moe_llava_tiny").eval()


def _images(model, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = model.config.vision.image_size
    return torch.randn(B, 3, S, S, generator=g)


def _tokens_per_image(model):
    with torch.no_grad():
        return model.encode_images(_images(model, 1)).shape[1]


def test_mixed_batch_splices_images_where_placeholders_are_and_masks_their_labels(model):
    N = _tokens_per_image(model)
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, 6, 7], [8, 9, 10, 11]])  # sample 1 has no placeholder
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, 10, 11]])
    images = _images(model, 2)
    with torch.no_grad():
        out = model(ids, images=images, labels=labels)
    assert out.logits.shape[:2] == (2, 3 + N)
    # sample 0: text | N image tokens | text; sample 1: 4 text tokens then right padding
    assert out.attention_mask[0].all() and out.attention_mask[1, :4].all() and not out.attention_mask[1, 4:].any()
    assert (out.labels[0, 1:1 + N] == IGNORE_INDEX).all() and out.labels[0, 1 + N:].tolist() == [6, 7]
    assert (out.labels[1, 4:] == IGNORE_INDEX).all()
    img = int(zoo.models.multimodal.PLACEHOLDER_MODALITY[IMAGE_TOKEN_ID])
    assert (out.modality[0, 1:1 + N] == img).all() and (out.modality[1, :4] != img).all()
    # a sample with no placeholder ignores its image: sample 1 alone, with another image, gives the same logits
    with torch.no_grad():
        alone = model(ids[1:], images=_images(model, 1, seed=7)).logits
    torch.testing.assert_close(out.logits[1, :4], alone[0, :4], rtol=0, atol=1e-5)


def test_eval_is_deterministic_bit_for_bit(model):
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, 6, 7, 8]])
    images = _images(model, 1)
    with torch.no_grad():
        a = model(ids, images=images).logits
        b = model(ids, images=images).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("eval_capacity_factor", [2.0, 0.5])
def test_routing_is_causal_later_tokens_never_change_earlier_logits(eval_capacity_factor):
    """With the preset's capacity and with one so tight that tokens are dropped (where a non-causal capacity rule
    would let later tokens push earlier ones out)."""
    torch.manual_seed(0)
    model = zoo.create_model("moe_llava_tiny", **{"decoder.moe.eval_capacity_factor": eval_capacity_factor}).eval()
    assert any(isinstance(m, MoELayer) for m in model.modules())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 40, (2, 12), generator=g)
    ids[:, 1] = IMAGE_TOKEN_ID
    changed = ids.clone()
    changed[:, 8:] = torch.randint(3, 40, (2, 4), generator=g)
    images = _images(model, 2)
    N = _tokens_per_image(model)
    with torch.no_grad():
        a = model(ids, images=images).logits
        b = model(changed, images=images).logits
    keep = 8 - 1 + N  # positions before the first changed token, after splicing
    assert torch.equal(a[:, :keep], b[:, :keep])
    assert not torch.equal(a[:, keep:], b[:, keep:])


def test_freeze_groups_of_the_three_stages(model):
    groups = param_groups(model)
    for stage in (1, 2, 3):
        m = zoo.create_model("moe_llava_tiny")
        apply_freeze(m, moe_tuning_stage(stage))
        on = {g for g, params in param_groups(m).items() for _, p in params if p.requires_grad}
        assert on == set(moe_tuning_stage(stage)) & {g for g, ps in groups.items() if ps}
        assert not any(p.requires_grad for _, p in param_groups(m)["vision_tower"])
    with pytest.raises(ValueError, match="projektor"):
        apply_freeze(zoo.create_model("moe_llava_tiny"), ["projektor"])


def test_bad_inputs_get_clear_errors(model):
    images = _images(model, 1)
    two = torch.tensor([[5, IMAGE_TOKEN_ID, 6, IMAGE_TOKEN_ID]])
    with pytest.raises(ValueError, match="placeholder"):
        model(two, images=images)
    S = model.config.vision.image_size
    with pytest.raises(ValueError, match=str(S)):
        model(torch.tensor([[5, IMAGE_TOKEN_ID, 6]]), images=torch.randn(1, 3, S + 8, S + 8))


def test_lora_is_a_freeze_group_of_every_family():
    """The ``lora`` group (only the low-rank factors) is a shared freeze group, not a Uni-MoE one: a MoE-LLaVA
    recipe can train ``[routers, lora]`` with LoRA on its experts and attention, every base frozen."""
    from zoo.models.freeze import apply_freeze, param_groups
    from zoo.models.lora_spec import LoRASpec, lora_parameter_names

    model = zoo.create_model("moe_llava_tiny")
    LoRASpec.from_dict({"experts": True, "modules": ["attention"], "r": 2, "alpha": 4}).apply(model)
    groups = param_groups(model)
    assert {n for n, _ in groups["lora"]} == lora_parameter_names(model) and groups["lora"]
    apply_freeze(model, ["routers", "lora"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora_parameter_names(model) | {n for n, _ in groups["routers"]}


def test_compile_tower_runs_the_frozen_tower_compiled_while_training_only(spy_compiled_once):
    """``MoELLaVA.compile_tower``: while training, the (frozen, no-autograd) tower's forward goes through one compiled
    function and gives the eager tower's features; in eval it runs as it is. The task's ``compile`` sets it and the
    decoder's ``compile_blocks``."""
    from zoo.models import moe_llava as module
    from zoo.tasks.instruct import InstructTask

    asked = spy_compiled_once(module)
    torch.manual_seed(0)
    model = zoo.create_model("moe_llava_tiny").train()
    images = _images(model, 2)
    eager = model.encode_images(images)
    assert asked == []
    model.compile_tower = True
    torch.testing.assert_close(model.encode_images(images), eager, rtol=1e-4, atol=1e-5)
    assert asked == ["_tower_forward"] and not any(p.requires_grad for p in model.vision_tower.parameters())
    asked.clear()
    model.eval().encode_images(images)
    assert asked == []
    task = InstructTask("moe_llava_tiny", compile=True)
    assert task.model.compile_tower is True and task.model.decoder.compile_blocks is True
    assert InstructTask("moe_llava_tiny").model.compile_tower is False


def test_the_training_compile_option_compiles_the_loss_too(spy_compiled_once):
    """``compile_blocks`` (the tasks' ``compile``) also puts the shifted cross-entropy through torch.compile while
    training (``shifted_lm_loss(compiled=True)``): the eager loss and gradients; not in eval."""
    from zoo.models import multimodal

    asked = spy_compiled_once(multimodal)
    torch.manual_seed(0)
    model = zoo.create_model("moe_llava_tiny").train()
    ids = torch.randint(0, model.config.decoder.vocab_size, (2, 9))
    ids[:, 1] = IMAGE_TOKEN_ID
    images = _images(model, 2)

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, None, images, ids.clone()).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.decoder.parameters() if p.grad is not None]

    eager, eager_grads = loss_and_grads()
    assert asked == []
    model.decoder.compile_blocks = True
    compiled, grads = loss_and_grads()
    assert asked == ["_shifted_cross_entropy"]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    asked.clear()
    with torch.no_grad():
        model.eval()(ids, None, images, ids.clone())
    assert asked == []
