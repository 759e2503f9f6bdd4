"""Shared test helpers: the real datasets under ../shared/data (or $ZOO_DATA), skipping when they are absent.

Under CI (``CI=true``, as GitHub Actions and most CI services set it) a missing dataset FAILS the test instead:
CI is meant to have the data, so a broken path must not hide as a skip.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from zoo.data import find_dataset_dir


REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str, register: bool = False) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (benchmarks/ is not a package). ``register``: also put it in
    ``sys.modules`` under ``name`` (what pickling its functions for worker processes needs)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def running_in_ci() -> bool:
    """``CI`` is set to a true value (``true``, ``1``, ``yes``; any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _missing_data(reason: str) -> None:
    """Skip (a developer machine without the data) or, under CI, fail: there the data must be present."""
    if running_in_ci():
        pytest.fail(f"CI=true but {reason} (CI must provide ../shared/data or ZOO_DATA)", pytrace=False)
    pytest.skip(reason)


def shared_dataset_dir(name: str, marker: str) -> Path:
    """The real dataset folder, or skip the test saying where it was looked for (fail under ``CI=true``)."""
    try:
        folder = find_dataset_dir(name)
    except FileNotFoundError as err:
        _missing_data(f"real data '{name}' not found, so this test cannot run: {err}")
    if not (folder / marker).is_file():
        _missing_data(f"{folder} has no {marker}; set ZOO_DATA to a complete copy to run this test")
    return folder


@pytest.fixture(scope="session")
def shared_dataset() -> Callable[[str, str], Path]:
    """``shared_dataset(name, marker_file)``: the real dataset folder (e.g. ``"mnist"``), or skip the test."""
    return shared_dataset_dir


@pytest.fixture(scope="session")
def data_missing() -> Callable[[str], None]:
    """``data_missing(reason)``: for a test that found its real data absent by other means (e.g. a datamodule's
    FileNotFoundError): skip with the reason, or fail under ``CI=true``."""
    return _missing_data


@pytest.fixture
def spy_compiled_once(monkeypatch) -> Callable[[ModuleType], list]:
    """``spy(module)``: ``module``'s ``compiled_once`` (:func:`zoo.moe.compiled.compiled_once`, as the module imported
    it) records the name of every function it is asked to compile, in the list returned; the cache of compiled
    functions starts empty, so every use is seen (undone after the test)."""
    from zoo.moe import compiled

    monkeypatch.setattr(compiled, "_COMPILED", {})

    def spy(module: ModuleType) -> list:
        asked: list = []

        def recording(fn, **settings):
            asked.append(fn.__name__)
            return compiled.compiled_once(fn, **settings)

        monkeypatch.setattr(module, "compiled_once", recording)
        return asked

    return spy
