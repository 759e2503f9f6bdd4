"""compute_capacity against hand-computed values: ceil(S * k * cf / E), rounded up to a multiple."""

from __future__ import annotations

import pytest

from zoo.moe import compute_capacity

from . import np_ref


def test_vmoe_paper_value():
    # 400 tokens * k=2 * cf 1.05 / 8 experts = 105, rounded up to a multiple of 4 = 108.
    assert compute_capacity(400, 8, 2, 1.05) == 108


# (S, E, k, cf, multiple_of, expected) -- every expected value worked out by hand in the comment.
CASES = [
    (400, 8, 2, 1.05, 1, 105),   # 800*1.05/8 = 105 exactly (float gives 105.00000000000001)
    (400, 8, 2, 1.05, 4, 108),   # 105 -> next multiple of 4
    (400, 8, 2, 1.05, 0, 105),   # 0 = no rounding
    (400, 8, 1, 1.0, 4, 52),     # 50 -> 52
    (400, 8, 1, 1.0, 1, 50),
    (10, 4, 2, 1.0, 1, 5),       # 20/4 = 5
    (10, 4, 2, 1.0, 4, 8),
    (10, 3, 1, 1.0, 1, 4),       # 10/3 = 3.33 -> 4
    (7, 2, 1, 1.0, 1, 4),        # 3.5 -> 4
    (8, 8, 2, 1.25, 1, 3),       # 16*1.25/8 = 2.5 -> 3
    (8, 8, 2, 1.25, 4, 4),
    (1, 8, 1, 1.0, 1, 1),        # tiny group: 0.125 -> 1
    (1, 8, 1, 1.0, 4, 4),        # ... -> 4
    (1, 32, 2, 0.01, 1, 1),      # 0.000625 -> 1 (never 0)
    (2, 2, 1, 0.5, 1, 1),        # exactly 0.5 -> 1
    (3, 1, 1, 1.0, 1, 3),        # one expert takes the whole group
    (12, 4, 2, 1.5, 4, 12),      # 36/4 = 9 -> 12
    (197 * 8, 32, 2, 1.05, 4, 104),  # 8 images of 197 tokens, E=32: 3309.6/32 = 103.425 -> 104
    (50 * 8, 32, 2, 1.05, 4, 28),    # 840/32 = 26.25 -> 27 -> 28
    (16, 4, 2, 2.0, 4, 16),      # cf = E/k: C = S
    (100, 3, 1, 0.3, 1, 10),     # 30/3 = 10 exactly (0.3 is not exact in binary)
    (100, 7, 3, 0.7, 1, 30),     # 210/7 = 30 exactly
]


@pytest.mark.parametrize("S,E,k,cf,m,expected", CASES)
def test_capacity_table(S, E, k, cf, m, expected):
    assert np_ref.capacity(S, E, k, cf, m) == expected  # the exact-fraction reference agrees with the table
    assert compute_capacity(S, E, k, cf, m) == expected


@pytest.mark.parametrize("args", [(0, 8, 2, 1.0), (8, 0, 2, 1.0), (8, 8, 0, 1.0), (8, 8, 2, 0.0), (8, 8, 2, -1.0)])
def test_capacity_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        compute_capacity(*args)
