"""benchmarks/moe_llava_step.py runs end to end on the CPU (the tiny preset, one step per implementation) and writes
what its GPU run reports: the zoo / official ratio, the ideal-MoE bound, and with --profile the phase split and the
profiler tables."""

import json
import subprocess
import sys
from pathlib import Path

import torch

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
        assert set(phases) == {"forward: before the tower", "forward: vision tower + projector",
                               "forward: projector, decoder, loss", "backward (with the checkpoint recompute)",
                               "optimizer"}
        assert all(ms >= 0 for ms in phases.values()) and phases["backward (with the checkpoint recompute)"] > 0
        assert r["profile"]["top_ops"] and (tmp_path / "profile" / r["profile"]["table"]).is_file()
    report = (tmp_path / "moe_llava_step.md").read_text()
    assert "Bound:" in report and "Ceiling:" in report and "| forward: vision tower + projector |" in report and "Top ops of `ideal`" in report


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


def test_step_benchmark_peer_checkpointing_frozen_bf16_and_the_moe_layers_alone(tmp_path):
    """--peer-checkpointing sets the official algorithm's policy apart from the zoo's (MoE-LLaVA checkpoints whole
    layers); free follows the zoo. The report names each row's policy and the MoE layers' own cost over free.
    --frozen-bf16 stores exactly the frozen Linear / Conv2d weights in bf16 (run under CPU bf16 autocast);
    --no-moe-cuda-graphs reaches the MoE layers' config, --compile the model's compile options."""
    from tests.conftest import load_benchmark

    module = load_benchmark("moe_llava_step")
    common = ["--preset", "moe_llava_tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch", "2",
              "--text-tokens", "8", "--except-moe", "--peer-checkpointing", "blocks"]
    data = module.main([*common, "--frozen-bf16", "--impls", "zoo,free,deepspeed", "--out", str(tmp_path)])
    rows = {r["impl"]: r for r in data["results"]}
    assert not any("error" in r for r in rows.values()), rows
    assert [rows[i]["gradient_checkpointing"] for i in ("zoo", "free", "deepspeed")] == ["except_moe", "except_moe",
                                                                                          True]
    assert data["moe_layers_ms"] == {i: rows[i]["step_ms"] - rows["free"]["step_ms"] for i in ("zoo", "deepspeed")}
    report = (tmp_path / "moe_llava_step.md").read_text()
    assert "| all but the MoE layers |" in report and "| whole blocks |" in report and "The MoE layers alone" in report

    args = module.main.__globals__["argparse"].Namespace(
        preset="moe_llava_tiny", device="cpu", decoder_depth=None, impl="zoo", no_checkpointing=False,
        except_moe=False, peer_checkpointing=None, frozen_bf16=True, fused_backend="auto", no_moe_cuda_graphs=True,
        compile=True)
    model = module.build(args)
    assert model.decoder.compile_blocks and model.compile_tower
    assert {b.mlp.config.cuda_graphs for b in model.decoder.blocks if b.moe_position} == {False}
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        matmul = isinstance(owner, (torch.nn.Linear, torch.nn.Conv2d))
        want = torch.bfloat16 if matmul and not any(q.requires_grad for q in owner.parameters(recurse=False)) \
            else torch.float32
        assert p.dtype == want, name
    assert any(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_force_fused_backend_replaces_the_per_shape_rule(monkeypatch):
    """--fused-backend: every shape gets the named backend, where the rule would pick by shape."""
    import importlib

    from tests.conftest import load_benchmark

    kernels = importlib.import_module("zoo.kernels.fused_moe")

    monkeypatch.setattr(kernels, "choose_backend", kernels.choose_backend)  # undone after the test
    x = torch.zeros(4, 8)
    assert kernels.choose_backend(x, 4, 2, 4, 8, 16, "gelu_tanh") == "triton"  # CPU: no grouped_mm
    load_benchmark("moe_llava_step").force_fused_backend("grouped_mm")
    assert kernels.choose_backend(x, 4, 2, 4, 8, 16, "gelu_tanh") == "grouped_mm"


def test_profile_phases_keep_the_tower_when_it_is_compiled(tmp_path):
    """--compile --profile: the tower's phase is timed around the model's image encoding, which a compiled tower
    still goes through (module hooks on the tower would not fire)."""
    from tests.conftest import load_benchmark

    module = load_benchmark("moe_llava_step")
    row = module.main(["--preset", "moe_llava_tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch", "2",
                       "--text-tokens", "8", "--fp32", "--compile", "--profile", str(tmp_path), "--impl", "zoo"])
    phases = row["profile"]["phases_ms"]
    assert {"forward: before the tower", "forward: vision tower + projector"} <= set(phases), phases
    assert len(row["profile"]["phases_ms"]) == 5


def test_report_gives_the_gpu_work_ratio_of_profiled_gpu_runs(tmp_path):
    """With GPU profiles of the zoo and the official algorithm, the report gives the ratio of their kernels' busy time
    (what the step ratio would be without host waits); without them (a CPU run) it gives none."""
    from tests.conftest import load_benchmark

    module = load_benchmark("moe_llava_step")

    def row(impl, ms, busy):
        gpu = None if busy is None else dict(busy_ms_per_step=busy, idle_ms_per_step=1.0, longest_gaps=[])
        return dict(impl=impl, preset="p", decoder_depth=8, batch=4, tokens_per_step=3328, step_ms=ms,
                    tokens_per_s=3328 / ms, peak_mem_gb=1.0, trainable_params=1, gradient_checkpointing=True,
                    profile=dict(phases_ms={"optimizer": 1.0}, top_ops=[], table="t.txt", gpu=gpu))

    env = dict(device="H200", date="today", torch="2", command="c")
    data = dict(env=env, results=[row("zoo", 80.0, 50.0), row("deepspeed", 140.0, 110.0)])
    module.write_report(data, tmp_path)
    assert data["gpu_work_ratio"] == 110.0 / 50.0
    assert "GPU work a step" in (tmp_path / "moe_llava_step.md").read_text()
    cpu = dict(env=env, results=[row("zoo", 80.0, None), row("deepspeed", 140.0, None)])
    module.write_report(cpu, tmp_path)
    assert "gpu_work_ratio" not in cpu and "GPU work a step" not in (tmp_path / "moe_llava_step.md").read_text()
