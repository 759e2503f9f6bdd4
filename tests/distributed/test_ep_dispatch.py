"""The all-to-all expert-parallel dispatcher equals the local sorted dispatcher (2 gloo processes)."""

import _ep_workers
import pytest

from zoo.distributed import spawn


@pytest.mark.timeout(300)  # a hung collective fails instead of stalling CI
def test_all_to_all_dispatch_matches_sorted_dispatch():
    # Outputs and gradients (tokens, combine weights, expert shards) for top-k with uneven splits, one
    # expert per rank, expert-choice slots, a rank whose experts get no token, a rank with no token; Soft
    # MoE slots; and whole MoELayers (top-k with capacity, expert choice, soft) sharded vs complete.
    spawn(_ep_workers.dispatch_and_layer_worker, 2, backend="gloo", start_method="fork")
