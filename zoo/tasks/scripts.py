"""Console scripts of an installed package: ``zoo-train`` and ``zoo-eval`` run what ``train.py`` / ``eval.py`` run
(their mains return the JSON summary they print; a console script must return an exit status instead)."""

from __future__ import annotations


def train() -> int:
    """``zoo-train``: ``train.py``."""
    from zoo.tasks.cli import main

    main()
    return 0


def evaluate() -> int:
    """``zoo-eval``: ``eval.py``."""
    from zoo.tasks.evaluate import main

    main()
    return 0
