"""benchmarks/moe_llava_step.py runs end to end on the CPU (the tiny preset, one step per implementation) and writes
what its GPU run reports: the zoo / official ratio, the ideal-MoE bound, and with --profile the phase split and the
profiler tables."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_step_benchmark_smoke_with_bound_and_profile(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "moe_llava_step.py"), "--preset", "moe_llava_tiny", "--device",
           "cpu", "--steps", "1", "--warmup", "0", "--batch", "2", "--text-tokens", "8", "--fp32",
           "--profile", str(tmp_path / "profile"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "moe_llava_step.json").read_text())
    rows = {r["impl"]: r for r in data["results"]}
    assert set(rows) == {"zoo", "deepspeed", "ideal", "free"} and not any("error" in r for r in rows.values())
    # the ceiling's step has no expert parameters left, only one trainable scalar per MoE layer (2 in the tiny preset)
    assert rows["free"]["trainable_params"] == 2
    assert rows["zoo"]["trainable_params"] == rows["ideal"]["trainable_params"] > 2
    assert data["ceiling"] == rows["free"]["tokens_per_s"] / rows["deepspeed"]["tokens_per_s"]
    assert data["speedup"] == rows["zoo"]["tokens_per_s"] / rows["deepspeed"]["tokens_per_s"]
    assert data["bound"] == rows["ideal"]["tokens_per_s"] / rows["deepspeed"]["tokens_per_s"]
    for impl, r in rows.items():
        phases = r["profile"]["phases_ms"]
        assert set(phases) == {"forward: before the tower", "forward: vision tower",
                               "forward: projector, decoder, loss", "backward (with the checkpoint recompute)",
                               "optimizer"}
        assert all(ms >= 0 for ms in phases.values()) and phases["backward (with the checkpoint recompute)"] > 0
        assert r["profile"]["top_ops"] and (tmp_path / "profile" / r["profile"]["table"]).is_file()
    report = (tmp_path / "moe_llava_step.md").read_text()
    assert "Bound:" in report and "Ceiling:" in report and "| forward: vision tower |" in report and "Top ops of `ideal`" in report


def test_idle_gaps_merges_overlapping_kernels_and_ranks_the_gaps():
    """The profile's GPU idle time: kernels that overlap count once, a gap is time with no kernel between the first
    start and the last end, and the longest gaps name the kernels on each side."""
    from tests.conftest import load_benchmark

    module = load_benchmark("moe_llava_step")
    kernels = [(30.0, 40.0, "c"), (0.0, 10.0, "a"), (5.0, 12.0, "b"), (100.0, 101.0, "d")]  # a and b overlap
    busy, idle, gaps = module.idle_gaps(kernels)
    assert (busy, idle) == (12.0 + 10.0 + 1.0, 18.0 + 60.0)
    assert gaps == [dict(us=60.0, before="c", after="d"), dict(us=18.0, before="b", after="c")]
    assert module.idle_gaps([]) == (0.0, 0.0, [])


def test_step_benchmark_except_moe_checkpointing():
    """--except-moe: the decoder checkpoints its blocks but not their MoE layers (or the peers in their place)."""
    from tests.conftest import load_benchmark

    module = load_benchmark("moe_llava_step")
    common = ["--preset", "moe_llava_tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch", "2",
              "--text-tokens", "8", "--fp32", "--except-moe"]
    for impl in ("zoo", "deepspeed"):
        row = module.main([*common, "--impl", impl])
        assert row["gradient_checkpointing"] == "except_moe" and row["final_loss"] > 0, impl
