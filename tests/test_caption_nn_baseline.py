"""benchmarks/caption_nn_baseline.py: cosine (not Euclidean) nearest neighbour, and the recipe's seed-built tower."""

import torch

from tests.conftest import load_benchmark

nnb = load_benchmark("caption_nn_baseline")


def test_nearest_is_by_cosine():
    train = torch.tensor([[10.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    test = torch.tensor([[0.1, 0.0], [3.0, 4.0], [-0.01, 0.001], [0.7, 0.71]])
    # [0.1, 0] is Euclidean-closest to [0.6, 0.8] but points the same way as [10, 0]
    assert nnb.nearest_train(test, train).tolist() == [0, 1, 2, 1]


def test_tower_is_the_recipes_seed_built_one():
    s = nnb.recipe_settings()
    assert s["image_size"] == 64 and s["model"] == "moe_llava_tiny_dense"
    a, b = nnb.build_tower(s), nnb.build_tower(s)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = a(x)
    assert out.ndim == 3 and out.shape[0] == 2  # token features [B, T, D], mean-pooled over T by the baseline
