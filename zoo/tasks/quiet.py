"""Library notices the project's own commands (``train.py``, ``eval.py``) do not show: advice and deprecations
that a user of these commands can do nothing about. Installed by the commands' ``main`` only, so code that imports
:mod:`zoo` as a library keeps every notice of its libraries."""

from __future__ import annotations

import logging
import warnings

# Lightning's advertising tips ("💡 Tip: ... try installing litlogger / litmodels").
_TIP_PREFIX = "💡 Tip:"
# Deprecations raised inside the libraries themselves (not by zoo code): (message regex, category).
KNOWN_LIBRARY_DEPRECATIONS = (
    # lightning's pytree helper on torch >= 2.6; fixed by a later lightning release, nothing to change here
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIP_PREFIX)


def quiet_library_notices() -> None:
    """Drop Lightning's tip lines and the :data:`KNOWN_LIBRARY_DEPRECATIONS` warnings (idempotent)."""
    from lightning_utilities.core import rank_zero

    logger = rank_zero.log  # the logger rank_zero_info writes to (Lightning points it at its own)
    if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
        logger.addFilter(_DropLightningTips())
    for message, category in KNOWN_LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category)
