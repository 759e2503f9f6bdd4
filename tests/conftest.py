"""Shared test helpers: the real datasets under ../shared/data (or $ZOO_DATA), skipping when they are absent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from zoo.data import find_dataset_dir


def shared_dataset_dir(name: str, marker: str) -> Path:
    """The real dataset folder, or skip the test saying where it was looked for."""
    try:
        folder = find_dataset_dir(name)
    except FileNotFoundError as err:
        pytest.skip(f"real data '{name}' not found, so this test cannot run: {err}")
    if not (folder / marker).is_file():
        pytest.skip(f"{folder} has no {marker}; set ZOO_DATA to a complete copy to run this test")
    return folder


@pytest.fixture(scope="session")
def shared_dataset() -> Callable[[str, str], Path]:
    """``shared_dataset(name, marker_file)``: the real dataset folder (e.g. ``"mnist"``), or skip the test."""
    return shared_dataset_dir
