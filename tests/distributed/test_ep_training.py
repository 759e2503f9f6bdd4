"""Expert-parallel training on 2 gloo processes == single-process training on the union batch."""

import json

import _ep_workers
import pytest

from zoo.distributed import spawn


@pytest.mark.timeout(300)  # a hung collective fails instead of stalling CI
def test_expert_parallel_training_matches_single_process(tmp_path):
    # vmoe_tiny_test (4 experts, 2 MoE layers, groups of 2 images, capacity 1.05), noise off, Adam, global-norm
    # clipping active; 5 steps of 4 images per rank vs one process with the 8 images. Checked in the workers:
    # loss curve, final parameters (experts gathered), Adam state (gathered and re-cut), for experts sharded
    # over both ranks and for replicated experts (expert_parallel_size=1, gradients summed over replicas).
    spawn(_ep_workers.train_worker, 2, 5, 4, str(tmp_path), backend="gloo", start_method="fork")
    report = json.loads((tmp_path / "train.json").read_text())
    ref = report["reference"]
    assert len(ref) == 5 and ref[0] != ref[-1]
    for losses in report["expert_parallel"].values():
        assert max(abs(a - b) for a, b in zip(losses, ref)) < 1e-5
