"""benchmarks/generate_history.py: the best zoo row per (model, batch) over a run's files, and the plot."""

import json
from pathlib import Path

from tests.conftest import REPO, load_benchmark


def _module():
    return load_benchmark("generate_history")


def _run_file(path: Path, rows: list[tuple[str, str, int, float]]) -> Path:
    path.write_text(json.dumps({"results": [
        {"model": m, "impl": impl, "batch": b, **({"bandwidth_fraction": f} if f is not None else {})}
        for m, impl, b, f in rows]}))
    return path


def test_best_zoo_row_per_model_and_batch_later_files_replace(tmp_path):
    module = _module()
    first = _run_file(tmp_path / "a.json", [("phi2x4", "zoo", 1, 0.04), ("phi2x4", "zoo + CUDA graph", 1, 0.27),
                                            ("mixtral", "transformers eager", 1, None), ("mixtral", "zoo", 32, 0.3)])
    second = _run_file(tmp_path / "b.json", [("phi2x4", "zoo + compile + CUDA graph", 1, 0.21)])
    best = module.best_zoo_rows([first])
    assert best[("phi2x4", 1)]["impl"] == "zoo + CUDA graph" and set(best) == {("phi2x4", 1), ("mixtral", 32)}
    # a later file (a later lease call of the same run) replaces the row, even when lower
    assert module.best_zoo_rows([first, second])[("phi2x4", 1)]["bandwidth_fraction"] == 0.21


def test_plot_of_committed_runs(tmp_path):
    results = REPO / "benchmarks" / "results"
    out = tmp_path / "history.png"
    _module().main(["--out", str(out), f"s12={results / 'generate_session12.json'}",
                    f"s14={results / 'generate_session14_phi2x4.json'},{results / 'generate_session14_mixtral.json'}"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
