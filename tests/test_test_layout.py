"""The test tree's own packages must not hide installed ones.

pytest (rootdir-relative "prepend" imports) puts ``tests/`` on ``sys.path`` because ``tests/moe`` and ``tests/models``
are packages (their tests import a sibling ``np_ref``). A test folder with an ``__init__.py`` is then importable under
its bare name, ahead of site-packages: ``tests/kernels/__init__.py`` made ``import kernels`` find the test folder
instead of Hugging Face's ``kernels`` package, which transformers imports, and every transformers parity test failed
with "cannot import name 'CUDAProperties' from 'kernels'"."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_package_shadows_an_installed_top_level_name():
    test_packages = {p.parent.name for p in TESTS.glob("*/__init__.py")}
    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    clashes = {name: installed[name] for name in test_packages if name in installed}
    assert not clashes, (f"tests/<name>/__init__.py hides the installed package(s) {clashes} while pytest runs: drop "
                         "the __init__.py (or rename the folder)")


def test_the_installed_kernels_package_is_the_one_imported():
    import pytest

    if "kernels" not in importlib.metadata.packages_distributions():
        pytest.skip("Hugging Face's kernels package is not installed (transformers >= 5 brings it)")
    import kernels

    assert TESTS not in Path(kernels.__file__).resolve().parents, kernels.__file__


def test_no_test_monkeypatches_a_torch_config_module():
    """pytest 9.2's ``monkeypatch.setattr`` DELETES an entry of torch's config modules (``torch._dynamo.config``,
    ``torch._inductor.config``) on undo, so every later test that reads it failed (error_on_recompile, in the
    session-13 fresh-environment CI run). Tests patch them with the modules' own ``config.patch(...)``."""
    import re

    pattern = re.compile(r"monkeypatch\.(setattr|delattr)\(\s*torch\._\w+\.config")
    offenders = [f"{p.relative_to(TESTS)}:{n}" for p in TESTS.rglob("*.py") if p.name != Path(__file__).name
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"use torch._dynamo.config.patch(...) (a context manager / decorator) instead: {offenders}"
