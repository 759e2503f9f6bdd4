"""benchmarks/generate.py runs end to end (toy widths on the CPU: --smoke) and writes its JSON / Markdown, with and
without --compile (the compiled decode step; its CUDA-graph rows need a GPU)."""

import json

import pytest

from tests.conftest import load_benchmark

pytest.importorskip("transformers")


def test_generate_benchmark_smoke(tmp_path):
    module = load_benchmark("generate")
    module.main(["--smoke", "--out", str(tmp_path), "--prompt", "8", "--new", "3", "--repeats", "1",
                 "--batches", "1", "2", "--profile"])
    data = json.loads((tmp_path / "generate.json").read_text())
    assert not data["errors"]
    rows = {(r["model"], r["impl"], r["batch"]) for r in data["results"]}
    assert rows == {("phi2x4", "zoo", 1), ("phi2x4", "zoo", 2), ("mixtral", "zoo", 1), ("mixtral", "zoo", 2),
                    ("mixtral", "transformers eager", 1), ("mixtral", "transformers eager", 2)}
    zoo_rows = [r for r in data["results"] if r["impl"] == "zoo"]
    assert all(0 < r["bandwidth_fraction"] and r["experts_per_step"] > 0 for r in zoo_rows)
    assert "| phi2x4 | zoo | 1 |" in (tmp_path / "generate.md").read_text()
    # --profile: one section per zoo mode (on the CPU the outermost aten ops stand in for GPU kernels)
    for name in ("phi2x4", "mixtral"):
        profile = (tmp_path / f"profile_{name}.md").read_text()
        assert f"### {name}, batch 1: zoo" in profile and "failed" not in profile
        assert "Per step:" in profile and "| GEMM / GEMV (cuBLAS, CUTLASS) |" in profile
        assert f"### {name}, batch 1: prefill of 8 tokens (zoo, eager)" in profile


def test_kernel_kinds():
    """The profile's kernel classes, on names the H200 profile shows."""
    module = load_benchmark("generate")
    kind = module.kernel_kind
    assert kind("_gemm_scatter_kernel") == kind("_route_hist_kernel") == "fused MoE (Triton)"
    assert kind("nvjet_tst_64x8_64x16_4x1_v_bz_TNT") == kind("void gemv2T_kernel_val<int, int, __nv_bfloat16>") \
        == kind("aten::addmm") == "GEMM / GEMV (cuBLAS, CUTLASS)"
    assert kind("void pytorch_flash::flash_fwd_splitkv_kernel<...>") == "attention"
    assert kind("triton_per_fused_add_native_layer_norm_0") == "inductor fused (Triton)"
    assert kind("void at::native::vectorized_elementwise_kernel<4, ...>") == "other (elementwise, copies, indexing)"


def test_generate_benchmark_smoke_compiled(tmp_path):
    """--compile adds "zoo + compile" rows (compiled decode step; inductor on the CPU, hence one batch size and one
    model: each compile takes seconds here)."""
    module = load_benchmark("generate")
    module.main(["--smoke", "--compile", "--out", str(tmp_path), "--prompt", "8", "--new", "3", "--repeats", "1",
                 "--batches", "2", "--models", "phi2x4"])
    data = json.loads((tmp_path / "generate.json").read_text())
    assert not data["errors"]
    rows = {r["impl"]: r for r in data["results"]}
    assert set(rows) == {"zoo", "zoo + compile"} and all(r["batch"] == 2 for r in rows.values())
    # the compiled step routed tokens like the eager one (same weights, same kinds of inputs)
    assert rows["zoo + compile"]["bandwidth_fraction"] > 0 and rows["zoo + compile"]["experts_per_step"] > 0
    assert "| phi2x4 | zoo + compile | 2 |" in (tmp_path / "generate.md").read_text()


def test_generate_benchmark_profile_reports_the_compiled_graphs(tmp_path):
    """--profile --compile says how many graphs and graph breaks compiling the step gave (one, none: a break is how
    the H200 run found the compiled step running mostly eagerly)."""
    module = load_benchmark("generate")
    module.main(["--smoke", "--compile", "--profile", "--out", str(tmp_path), "--prompt", "8", "--new", "3",
                 "--repeats", "1", "--batches", "1", "--models", "phi2x4", "--only", "zoo + compile"])
    profile = (tmp_path / "profile_phi2x4.md").read_text()
    assert "### phi2x4, batch 1: zoo + compile" in profile and "### phi2x4, batch 1: zoo\n" not in profile
    # --only: just that kind of row
    assert [r["impl"] for r in json.loads((tmp_path / "generate.json").read_text())["results"]] == ["zoo + compile"]
    assert "dynamo: 1 graph(s), 0 graph break(s) while compiling this step" in profile


def test_timed_decode_runs_without_routing_statistics(monkeypatch):
    """The timed runs are what zoo.models.generate runs: no MoE losses or statistics (sparse_aux) in any timed
    prefill or step; only the one untimed run that counts the experts computes them, once per model and batch."""
    import torch

    import zoo
    import zoo.moe.layer as layer_module

    module = load_benchmark("generate")
    monkeypatch.setattr(module, "DEVICE", "cpu")
    with torch.device("cpu"):
        model = zoo.models.DecoderLM(module.shrink(module.phi2x4_config(2))).eval()
    calls = []
    real = layer_module.sparse_aux
    monkeypatch.setattr(layer_module, "sparse_aux", lambda *a, **k: calls.append(1) or real(*a, **k))
    row = module.zoo_case("phi2x4", model, 2, 8, 3, 2, bandwidth=1e9)
    moe = len(module.moe_layers(model))
    # the counting run: one prefill + 3 steps, each through every MoE layer; the warm-up and 2 timed runs: none
    assert moe > 0 and len(calls) == 4 * moe
    assert row["experts_per_step"] > 0
    module.zoo_case("phi2x4", model, 2, 8, 3, 1, bandwidth=1e9)  # same model and batch: counted already
    assert len(calls) == 4 * moe
