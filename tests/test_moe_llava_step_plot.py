"""benchmarks/moe_llava_step_plot.py: the rows of a run (merged runs of one session file, later rows winning), clear
errors for a session file without run names or with an unknown one, and the plot."""

import json

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def module():
    return load_benchmark("moe_llava_step_plot")


def _row(impl, ms):
    return dict(impl=impl, step_ms=ms)


def test_runs_merge_in_order_and_bad_specs_are_refused(module, tmp_path):
    session = tmp_path / "session.json"
    session.write_text(json.dumps({"runs": [
        {"run": "a", "results": [_row("zoo", 80.0), _row("free", 50.0), dict(impl="deepspeed", error="boom")]},
        {"run": "b", "results": [_row("zoo", 75.0), _row("deepspeed", 150.0)]}]}))
    rows = module.step_rows(f"{session}:a+b")
    assert {k: r["step_ms"] for k, r in rows.items()} == {"zoo": 75.0, "free": 50.0, "deepspeed": 150.0}
    with pytest.raises(ValueError, match="name them"):
        module.step_rows(str(session))
    with pytest.raises(ValueError, match=r"no run \['c'\]"):
        module.step_rows(f"{session}:a+c")
    single = tmp_path / "report.json"
    single.write_text(json.dumps({"results": [_row("zoo", 70.0)]}))
    assert module.step_rows(str(single))["zoo"]["step_ms"] == 70.0


def test_plot_writes_a_png(module, tmp_path):
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"results": [_row("zoo", 60.0), _row("free", 40.0), _row("deepspeed", 130.0)]}))
    out = tmp_path / "step.png"
    module.main([f"run 1={report}", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
