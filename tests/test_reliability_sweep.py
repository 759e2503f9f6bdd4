"""The reliability sweep's in-process cases (``benchmarks/reliability_sweep.py``, issue 17): none may regress to a
raw library traceback, a silent wrong result or a crash. The CLI cases (subprocesses) run with the benchmark."""

from __future__ import annotations

import pytest

from tests.conftest import load_benchmark

sweep = load_benchmark("reliability_sweep", register=True)


@pytest.fixture(scope="module")
def results():
    return sweep.run_cases(sweep.build_cases(cli=False))


def test_the_sweep_covers_at_least_the_issues_213_cases(results):
    assert len(results) >= 213
    groups = {r.group for r in results}
    assert {"moe_config", "moe_layer", "model_inputs", "factory", "hub", "convert", "numerics",
            "determinism"} <= groups


def test_no_case_is_raw_silent_or_a_crash(results):
    bad = [f"{r.outcome} {r.id}: {r.detail}" for r in results if r.outcome in sweep.BAD_OUTCOMES]
    assert not bad, "\n".join(bad)


def test_no_case_is_unclear(results):
    unclear = [f"{r.id}: {r.detail}" for r in results if r.outcome == "unclear"]
    assert not unclear, "\n".join(unclear)


# The classifier itself: each outcome class is recognised (a sweep that called everything 'clear' would pass above).
def _outcome(run, error=None, mentions=()):
    ctx = sweep.Context()
    try:
        return sweep.classify(sweep.Case("t", "t", "t", run, error, tuple(mentions)), ctx).outcome
    finally:
        ctx.close()


def _zoo_error(ctx):
    from zoo.moe import MoEConfig
    MoEConfig(top_k=9)


def _library_error(ctx):
    import torch
    torch.zeros(2) + torch.zeros(3)


def test_the_classifier_tells_the_outcomes_apart():
    assert _outcome(_zoo_error, ValueError, ("top_k", "9")) == "clear"
    assert _outcome(_zoo_error, ValueError, ("a value the message lacks",)) == "unclear"
    assert _outcome(_zoo_error, KeyError) == "unclear"
    assert _outcome(_library_error, RuntimeError) == "raw"
    assert _outcome(lambda ctx: None, ValueError) == "silent"
    assert _outcome(lambda ctx: None) == "ok"
    assert _outcome(_library_error) == "raw"
    assert _outcome(_zoo_error) == "crash"

    def wrong(ctx):
        assert 1 == 2, "wrong result"

    assert _outcome(wrong) == "silent"
