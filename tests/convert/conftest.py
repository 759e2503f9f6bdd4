"""Shared fixtures of the converter tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def convert_cli(tmp_path_factory):
    """``convert_cli(folder, *args) -> out``: ``python -m zoo.convert *args --out OUT`` run in-process into a fresh
    temporary folder named after ``folder``, asserting that it succeeded (exit status 0)."""
    from zoo.convert.__main__ import main

    def run(folder: str, *args: str) -> Path:
        out = tmp_path_factory.mktemp(folder)
        assert main([*args, "--out", str(out)]) == 0
        return out

    return run
