"""benchmarks/lora_experts.py: its smoke run (every path agrees with the fp32 reference, the JSON and page it writes)
and its correctness check (a wrong path is caught)."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import lora_experts  # noqa: E402

PATH_KEYS = {"merge_each_step", "merged_once", "lowrank", "reference"}
TIMING_KEYS = {"fwd_ms", "fwd_peak_mb", "fwdbwd_ms", "fwdbwd_peak_mb"}


def test_smoke_run_writes_json_and_page_and_paths_agree(tmp_path):
    pytest.importorskip("triton")
    # The fused kernels run on the CPU under TRITON_INTERPRET=1, which Triton reads at import: a fresh process.
    # CUDA hidden: the smoke case is the fp32 CPU one on every machine (on a GPU it would pick CUDA and bf16).
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_experts.py"), "--smoke", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "lora_experts.json").read_text())
    for key in ("device", "torch", "triton", "python", "date", "command", "dtype"):
        assert data["env"][key], key
    assert data["settings"]["smoke"] is True and data["all_ok"] is True and not data["trimmed"]
    cases = [(r["variant"], r["per_expert_base"], r["E"]) for r in data["results"]]
    assert cases == [("v1", True, 4), ("v2", False, 8)]
    for rec in data["results"]:
        assert set(rec["paths"]) == PATH_KEYS
        assert rec["fused_backend"] and rec["lowrank_grouped"] and rec["merged_copy_mb"] > 0
        for key, p in rec["paths"].items():
            assert TIMING_KEYS <= set(p) and p["fwd_ms"] > 0 and p["fwdbwd_ms"] > 0, (key, p)
            assert p["ok"] is True and p["finite"] is True, (rec["name"], key, p)
            # fp32 on the CPU: every path within 1e-4 of the fp32 ground truth, whatever tolerance the benchmark uses
            assert p["y_err"] <= 1e-4 and p["grad_err"] <= 1e-4, (rec["name"], key, p)
            grads = {"x"} | ({"lora_a1", "lora_b1", "lora_a2", "lora_b2"} if key != "merged_once" else set())
            assert set(p["grad_errs"]) == grads, (key, p["grad_errs"])
        assert rec["paths"]["lowrank"]["err_vs_merged"] <= 1e-4
    assert data["conclusion"].startswith("training (fwd+bwd):") and "FAILED" not in data["conclusion"]
    page = (tmp_path / "lora_experts.md").read_text()
    assert data["conclusion"] in page and data["env"]["command"] in page
    assert page.count("| ok |") == 8 and "FAILED" not in page


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def test_check_catches_a_wrong_path():
    """The check compares against an independent fp32 loop: a path with a wrong output, a forgotten SwiGLU block
    mask, a wrong LoRA scaling or a missing input gradient fails it; the right low-rank path passes."""
    c = dict(lora_experts.SMOKE_FFN, variant="v1", **lora_experts.VARIANTS["v1"])
    for per_expert in (True, False):
        c["per_expert_base"] = per_expert
        ex = lora_experts.build_experts(c, torch.device("cpu"), torch.float32)
        inp = lora_experts.make_inputs(c, 40, 1, torch.device("cpu"), torch.float32)[0]
        ref = lora_experts.reference_outputs(ex, inp)

        def lowrank(x, ei, cw, keep):
            return lora_experts.lowrank_moe(ex, x, ei, cw, keep, grouped_mm=False)

        def unmasked(*a):
            with _patched(ex, "_b1_mask", torch.ones_like(ex._b1_mask)):
                return lowrank(*a)

        def rescaled(*a):
            with _patched(ex, "scaling", ex.scaling * 1.5):
                return lowrank(*a)

        paths = {"lowrank": lowrank, "off_by_1pct": lambda *a: 1.01 * lowrank(*a), "unmasked": unmasked,
                 "rescaled": rescaled, "no_input_grad": lambda x, *a: lowrank(x.detach(), *a)}
        res = lora_experts.check_paths(ex, paths, inp, ref, torch.float32)
        assert res["lowrank"]["ok"], res["lowrank"]
        for bad in ("off_by_1pct", "unmasked", "rescaled", "no_input_grad"):
            assert not res[bad]["ok"], (bad, res[bad])
