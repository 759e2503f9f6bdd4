"""Checked state-dict loading: put a checkpoint into a model, adapting what the model's family knows how to adapt
(its registered ``checkpoint_filter``: another image resolution, ...) and failing with an error that lists what was
expected and what was found (missing / unexpected names, other shapes, config differences)."""

from __future__ import annotations

import logging
from dataclasses import is_dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from zoo.config import flatten, to_dict
from zoo.errors import CheckpointMismatchError, CorruptCheckpointError
from zoo.registry import family_of_model

logger = logging.getLogger("zoo.checkpoint")


def config_diff(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """``["encoder.dim: model 64, checkpoint 128", ...]`` for every dotted key whose value differs."""
    a, b = flatten(expected), flatten(found)
    return [f"{k}: model {a.get(k, '<absent>')!r}, checkpoint {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str,
                            checkpoint_config: Optional[Mapping[str, Any]] = None, reset_head: bool = False,
                            adapt: bool = True) -> list[str]:
    """Strictly load ``state_dict`` into ``model`` with errors that say what was expected and found.

    ``adapt``: run the model family's ``checkpoint_filter`` first (e.g. resize image position embeddings to another
    resolution; the family knows its prefix tokens and which tensors are image grids). ``reset_head`` keeps the
    model's freshly initialised classifier ``head.*`` (used when ``num_classes`` is overridden). Returns notes
    about what was adapted.
    """
    own = model.state_dict()
    sd = dict(state_dict)
    notes: list[str] = []
    model_cfg = to_dict(model.config) if is_dataclass(getattr(model, "config", None)) else None
    diff = config_diff(model_cfg, checkpoint_config) if (model_cfg is not None and checkpoint_config) else []
    diff_msg = ("\nconfig differences (model vs checkpoint config.json):\n  " + "\n  ".join(diff)) if diff else ""
    if reset_head:
        for k in [k for k in sd if k.startswith("head.")]:
            del sd[k]
        notes.append("classifier head re-initialised (num_classes overridden)")
    skip = {k for k in own if reset_head and k.startswith("head.")}
    missing = sorted(set(own) - set(sd) - skip)
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        common = set(own) & set(sd)
        fam = family_of_model(model)
        family = fam.name if fam is not None else type(model).__name__
        head = (f"{source} does not look like a {family} checkpoint: none of its {len(sd)} tensors has a name the "
                f"model expects" if not common else f"{source} does not match the model's parameter names")
        raise CheckpointMismatchError(
            f"{head}\n  missing ({len(missing)}, expected by the model): {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}\n  unexpected ({len(unexpected)}, found in the checkpoint): "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}{diff_msg}")
    fam = family_of_model(model)
    if adapt and fam is not None and fam.checkpoint_filter is not None:
        sd, adapted = fam.checkpoint_filter(sd, model)
        notes += adapted
    bad = [f"{k}: expected {list(own[k].shape)} (model), found {list(v.shape)} (checkpoint)"
           for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        shown = bad[:12] + ([f"... and {len(bad) - 12} more"] if len(bad) > 12 else [])
        raise CheckpointMismatchError(f"{source}: config/weights mismatch, {len(bad)} tensor(s) have other "
                                      "shapes:\n  " + "\n  ".join(shown) + diff_msg)
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:  # a diverged run's or damaged weights: loading them gives NaN outputs / chance accuracy
        raise CorruptCheckpointError(f"{source} holds non-finite (NaN / inf) weights in {len(nonfinite)} tensor(s), "
                                     f"e.g. {nonfinite[:4]}; it is damaged or from a diverged run: use an earlier "
                                     "checkpoint")
    with torch.no_grad():
        for k, v in sd.items():
            if v.dtype != own[k].dtype and own[k].is_floating_point():
                sd[k] = v.to(own[k].dtype)
    model.load_state_dict(sd, strict=not reset_head)
    if diff and not bad:
        logger.info("%s: config.json differs from the model config in non-shape settings:\n  %s", source,
                    "\n  ".join(diff))
    return notes
