"""Each family adapts checkpoints through its own registered filter (timm's ``checkpoint_filter_fn``): LIMoE's image
position embedding (no prefix token) is resized for another image size, its TEXT position embedding is never
resampled as an image grid (a shorter context keeps the first positions, a longer one is refused)."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo import hub
from zoo.layers import resize_pos_embed
from zoo.registry import get_family


def _captions(n: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        k = 3 + i % (length - 3)
        tokens[i, 0] = 49406
        tokens[i, 1:k] = torch.randint(1, 1000, (k - 1,), generator=g)
        tokens[i, k] = 49407
    return tokens


@pytest.fixture
def limoe_folder(tmp_path, random_model):
    model = random_model("limoe_tiny_test")
    hub.save_pretrained(model, tmp_path / "limoe")
    return model, f"local-dir:{tmp_path / 'limoe'}"


@torch.no_grad()
def test_limoe_loads_at_another_image_size(limoe_folder):
    model, source = limoe_folder
    big = zoo.create_model(source, image_size=32).eval()  # grid 4x4 -> 8x8
    assert big.image_pos_embed.shape == (1, 64, 32)
    assert any(n.startswith("image_pos_embed resized") for n in big.pretrained_cfg["notes"])
    # reference: the same weights with the image position embedding resized by hand (no prefix token)
    ref = zoo.create_model("limoe_tiny_test", image_size=32).eval()
    sd = dict(model.state_dict())
    sd["image_pos_embed"] = resize_pos_embed(sd["image_pos_embed"], 8, num_prefix_tokens=0)
    ref.load_state_dict(sd)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = _captions(2, 16)
    out, want = big(images=images, text=text), ref(images=images, text=text)
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
    # the text position embedding is the checkpoint's, untouched
    torch.testing.assert_close(big.text_pos_embed, model.text_pos_embed, rtol=0, atol=0)


@torch.no_grad()
def test_limoe_shorter_context_keeps_first_text_positions(limoe_folder):
    model, source = limoe_folder
    short = zoo.create_model(source, context_length=8).eval()
    torch.testing.assert_close(short.text_pos_embed, model.text_pos_embed[:, :8], rtol=0, atol=0)
    assert any("text_pos_embed truncated" in n for n in short.pretrained_cfg["notes"])
    text = _captions(3, 8)  # captions that fit both contexts embed the same
    torch.testing.assert_close(short.encode_text(text), model.encode_text(text), rtol=0, atol=0)


def test_limoe_longer_context_is_refused(limoe_folder):
    _, source = limoe_folder
    with pytest.raises(hub.CheckpointMismatchError, match=r"context_length=16 tokens, the model asks for "
                                                          r"context_length=24.*context_length <= 16"):
        zoo.create_model(source, context_length=24)


def test_vmoe_filter_keeps_the_cls_position(tmp_path, random_model):
    model = random_model("vmoe_tiny_test")
    hub.save_pretrained(model, tmp_path / "m")
    big = zoo.create_model(f"local-dir:{tmp_path / 'm'}", image_size=32)
    torch.testing.assert_close(big.pos_embed, resize_pos_embed(model.pos_embed.detach(), 8, 1), rtol=0, atol=0)


def test_families_register_their_filters_and_cards():
    for name in ("vmoe", "limoe"):
        fam = get_family(name)
        assert fam.checkpoint_filter is not None and fam.card.pipeline_tag and fam.input_size is not None
