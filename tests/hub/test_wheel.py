"""A package, not only a checkout: the wheel carries the presets, recipes and published weights (mapped from
configs/ and weights/, no second copy), and in a fresh virtualenv, from another folder, ``create_model(...,
pretrained=True)`` and the console scripts work."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _packages_in_pyproject() -> set[str]:
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^packages = \[(.*?)\]", text, re.S | re.M).group(1)
    return set(re.findall(r'"([\w.]+)"', block))


def test_every_zoo_package_is_listed_in_pyproject():
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "zoo").rglob("__init__.py")}
    missing = found - _packages_in_pyproject()
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build from a copy of the sources (an in-tree build would leave build/ and *.egg-info in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("zoo", "configs", "weights"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                           "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("moe_zoo-*.whl")
    return whl


def test_wheel_carries_presets_recipes_weights_and_scripts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in (REPO / "configs").glob("*/*/*.yaml"):
        assert f"zoo/_configs/{preset.relative_to(REPO / 'configs').as_posix()}" in names
    for recipe in (REPO / "configs/train").glob("*.yaml"):
        assert f"zoo/_configs/train/{recipe.name}" in names
    for path in (REPO / "weights").rglob("*"):
        if path.is_file():
            assert f"zoo/_weights/{path.relative_to(REPO / 'weights').as_posix()}" in names
    entry_points = zipfile.ZipFile(wheel).read("moe_zoo-0.1.0.dist-info/entry_points.txt").decode()
    assert "zoo-train = zoo.tasks.scripts:train" in entry_points
    assert "zoo-eval = zoo.tasks.scripts:evaluate" in entry_points


@pytest.mark.slow
def test_fresh_venv_creates_pretrained_model_from_another_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ZOO_CONFIGS", "ZOO_WEIGHTS")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import zoo; m = zoo.create_model('vmoe_tiny_digits', pretrained=True); "
            "print(zoo.__file__); print(m.pretrained_cfg['source']); print(len(zoo.list_models()))")
    proc = subprocess.run([str(python), "-c", code], cwd=elsewhere, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, source, n = proc.stdout.split("\n")[-4:-1]
    site = str(venv.resolve())
    assert str(Path(module).resolve()).startswith(site), f"imported {module}, not the installed wheel"
    assert source.startswith("local-dir:") and str(Path(source[len("local-dir:"):]).resolve()).startswith(site)
    assert int(n) == len(list((REPO / "configs/models").glob("*/*.yaml")))
    for script in ("zoo-train", "zoo-eval"):
        proc = subprocess.run([str(bindir / script), "--help"], cwd=elsewhere, capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), (script, proc.stderr[-2000:])
