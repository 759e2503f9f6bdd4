"""``python train.py --trainer.devices 2 --trainer.strategy ...``: expert-parallel training from the command line
(2 CPU processes, gloo, Lightning's subprocess launcher)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_py_expert_parallel_two_processes(tmp_path):
    strategy = json.dumps({"class_path": "zoo.distributed.ExpertParallelStrategy"})
    cmd = [sys.executable, str(ROOT / "train.py"), "--trainer.accelerator=cpu", "--trainer.devices=2",
           f"--trainer.strategy={strategy}", "--trainer.max_steps=2", "--trainer.max_epochs=null",
           "--trainer.check_val_every_n_epoch=null", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
           "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}", "--test=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=580, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["global_step"] == 2
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    experts = {k: v.shape for k, v in ckpt["state_dict"].items() if ".experts." in k}
    # vmoe_tiny_digits has 4 experts per MoE layer: the checkpoint holds all 4, not the 2 of one rank
    assert experts and all(shape[0] == 4 for shape in experts.values()), experts
