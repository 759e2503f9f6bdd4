"""Where the real datasets live on disk.

The datasets are kept outside the repository (never copy them in). A data root is chosen, in order, from:

1. an explicit ``data_dir`` argument (CLI: ``--data.data_dir``),
2. the ``ZOO_DATA`` environment variable,
3. ``<repo root>/../shared/data`` where the repo root is the folder that holds the ``zoo`` package,
4. ``./data`` (relative to the current working directory).

Steps 3 and 4 are defaults: the first one that exists wins. An explicit choice (1 or 2) is used as given, even if
it does not exist, so that a typo gives an error instead of silently reading some other copy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "ZOO_DATA"

# zoo/data/paths.py -> parents[0] = zoo/data, parents[1] = zoo, parents[2] = repo root.
REPO_ROOT = Path(__file__).resolve().parents[2]

HOW_TO_POINT_ELSEWHERE = (
    f"Pass data_dir (CLI: --data.data_dir=/path/to/data) or set the {ENV_VAR} environment variable "
    "to the folder that holds the dataset folders."
)



def incomplete_dataset_error(label: str, folder: Path, missing: Sequence[str], needs: str) -> FileNotFoundError:
    """The error for a dataset folder that exists but lacks files: ``"<label> folder <folder> is empty" / "lacks
    <missing>"; it needs <needs>.`` plus how to point at another copy."""
    state = "is empty" if not any(folder.iterdir()) else f"lacks {', '.join(missing)}"
    return FileNotFoundError(f"{label} folder {folder} {state}; it needs {needs}. {HOW_TO_POINT_ELSEWHERE}")


@dataclass(frozen=True)
class DataRoot:
    """A resolved data root.

    Attributes:
        path: the chosen root folder (may not exist when it was chosen explicitly).
        source: where it came from, for error messages ("data_dir argument", "ZOO_DATA", "default ...").
        searched: every root that was considered, in order (more than one only for the defaults).
    """

    path: Path
    source: str
    searched: tuple[Path, ...]


def default_data_roots() -> tuple[Path, ...]:
    """The fallback roots, in order: ``<repo root>/../shared/data`` then ``./data``."""
    return (REPO_ROOT.parent / "shared" / "data", Path.cwd() / "data")


def resolve_data_root(data_dir: str | os.PathLike[str] | None = None) -> DataRoot:
    """Pick the data root: ``data_dir``, else ``$ZOO_DATA``, else the first existing default root.

    Nothing is checked beyond existence of the defaults; the dataset loaders raise the errors.
    """
    if data_dir is not None and str(data_dir) != "":
        path = Path(data_dir).expanduser()
        return DataRoot(path=path, source="data_dir argument", searched=(path,))
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        path = Path(env).expanduser()
        return DataRoot(path=path, source=f"{ENV_VAR} environment variable", searched=(path,))
    defaults = default_data_roots()
    for path in defaults:
        if path.is_dir():
            return DataRoot(path=path, source="default", searched=defaults)
    # None exists: report the first (the documented location) and list all in the error message.
    return DataRoot(path=defaults[0], source="default", searched=defaults)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root folder as a ``Path`` (see :func:`resolve_data_root`)."""
    return resolve_data_root(data_dir).path


def find_dataset_dir(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    marker_files: Sequence[str] = (),
) -> Path:
    """Locate the folder of one dataset, ``<data root>/<name>``.

    For convenience ``data_dir`` may also point at the dataset folder itself: when ``<data_dir>/<name>`` does not
    exist but ``data_dir`` holds the first of ``marker_files``, ``data_dir`` is used.

    Raises:
        FileNotFoundError: no such folder; the message lists every path searched and how to point elsewhere.
    """
    root = resolve_data_root(data_dir)
    candidates = [r / name for r in root.searched]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    if marker_files and root.source != "default" and (root.path / marker_files[0]).is_file():
        return root.path
    searched = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Dataset folder '{name}' not found (data root from {root.source}); searched: {searched}. "
        f"{HOW_TO_POINT_ELSEWHERE}"
    )
