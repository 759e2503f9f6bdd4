"""The CPU/gloo smoke path of benchmarks/scaling.py (the GPU run uses the same code with NCCL)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_scaling_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "scaling.json").read_text())
    assert report["smoke"] and report["world_sizes"] == [1, 2]
    got = {(r["workload"], r["mode"], r["world_size"]): r for r in report["results"]}
    for workload in ("vmoe_b16", "llm_moe_layer"):
        for mode in ("ep", "ddp"):
            for n in (1, 2):
                r = got[(workload, mode, n)]
                assert r["throughput"] > 0 and r["global_batch"] == n * r["per_gpu_batch"]
                assert 0 < r["scaling_efficiency"] and (n > 1 or r["scaling_efficiency"] == 1)
                assert 0 <= r["a2a_share"] < 1
        ep2 = got[(workload, "ep", 2)]
        assert ep2["a2a_calls_per_step"] > 0 and ep2["a2a_ms_per_step"] > 0  # tokens really were exchanged
        assert got[(workload, "ddp", 2)]["a2a_calls_per_step"] == 0
        # expert parallel: each rank holds half the experts, so fewer parameters than plain DDP
        assert ep2["params_per_rank"] < got[(workload, "ddp", 2)]["params_per_rank"]
    md = (tmp_path / "scaling.md").read_text()
    assert "smoke run" in md and "| ep | 2 |" in md
