"""What the README promises about testing: CI (``.ci/run``) runs exactly the README's test command, and tests that
need ``../shared/data`` skip with a reason when it is absent, except under CI (``CI=true``), where they fail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_section(title: str) -> str:
    """The text of the README's ``## <title>`` section (up to the next ``## `` heading)."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def bash_blocks(markdown: str) -> list[str]:
    """The contents of the ```bash fenced blocks, in order, stripped."""
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M)]


def ci_commands() -> list[str]:
    """The command lines of ``.ci/run``: not the shebang, comments, shell options or the ``cd`` to the repo root."""
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]


def test_ci_runs_the_readmes_test_command():
    blocks = bash_blocks(readme_section("Quick start"))
    assert len(blocks) >= 2, f"the Quick start should show the run command and the test command, found {blocks}"
    test_command = blocks[1]
    assert "pytest" in test_command, f"the second Quick start command should run the tests, got {test_command!r}"
    assert ci_commands() == [test_command], (
        f".ci/run runs {ci_commands()} but the README's Quick start test command is {test_command!r}; keep them equal")


def test_readme_command_parsing_sees_a_changed_command(tmp_path):
    """The comparison above is not vacuous: a different pytest line in the README's second block is seen."""
    changed = readme_section("Quick start").replace("python -m pytest -q", "python -m pytest -q -x", 1)
    assert bash_blocks(changed)[1] != ci_commands()[0]


# ---------------------------------------------------------------------------------------- missing real data
def outcome(call, *args) -> tuple[str, str]:
    """``("skip" | "fail", message)`` of a call that must end the test either way (caught here, so that a skip
    where a failure is expected fails this test instead of skipping it)."""
    try:
        call(*args)
    except pytest.skip.Exception as err:
        return "skip", str(err)
    except pytest.fail.Exception as err:
        return "fail", str(err)
    raise AssertionError(f"{call} returned instead of skipping or failing")


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """A data root that exists but holds no dataset folder."""
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("value", ["", "false", "0"])
def test_missing_data_skips_outside_ci(no_data, monkeypatch, shared_dataset, value):
    monkeypatch.setenv("CI", value)
    kind, message = outcome(shared_dataset, "mnist", "t10k-images-idx3-ubyte.gz")
    assert kind == "skip" and "real data 'mnist' not found" in message


@pytest.mark.parametrize("value", ["true", "TRUE", "1"])
def test_missing_data_fails_under_ci(no_data, monkeypatch, shared_dataset, value):
    monkeypatch.setenv("CI", value)
    kind, message = outcome(shared_dataset, "mnist", "t10k-images-idx3-ubyte.gz")
    assert kind == "fail" and "CI=true but real data 'mnist' not found" in message
    (no_data / "mnist").mkdir()  # the folder without its files fails too
    kind, message = outcome(shared_dataset, "mnist", "t10k-images-idx3-ubyte.gz")
    assert kind == "fail" and "has no t10k-images-idx3-ubyte.gz" in message


def test_present_data_is_returned_under_ci(no_data, monkeypatch, shared_dataset):
    monkeypatch.setenv("CI", "true")
    (no_data / "mnist").mkdir()
    (no_data / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    assert shared_dataset("mnist", "t10k-images-idx3-ubyte.gz") == no_data / "mnist"


def test_data_missing_fixture_follows_the_same_rule(data_missing, monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert outcome(data_missing, "dataset not available here")[0] == "fail"
    monkeypatch.delenv("CI")
    assert outcome(data_missing, "dataset not available here") == ("skip", "dataset not available here")
