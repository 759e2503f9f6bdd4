"""Building a converted model without materialising it: the module tree is built on the ``meta`` device (no memory,
no random init), then the converted tensors become its parameters as they are (``load_state_dict(assign=True)``),
in their own precision. A 7B checkpoint in bf16 then needs ~14 GB, not a 28 GB float32 model plus the weights.

- :func:`init_empty` builds ``factory()`` on ``meta`` and re-creates every non-persistent buffer (RoPE ``inv_freq``,
  LoRA masks) on the CPU through the owning module's ``reset_buffers()``; a module with such a buffer but no
  ``reset_buffers`` is an error naming it, so a new buffer cannot silently stay empty.
- :func:`load_empty` fills such a model from a state dict (strict), keeps tied parameters tied and checks nothing is
  left on ``meta``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Optional, TypeVar

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def _meta_tensors(model: nn.Module, *, persistent: Optional[bool] = None) -> list[str]:
    """Names of meta parameters / buffers (``persistent``: only buffers of that kind) and plain tensor attributes."""
    out = []
    for mod_name, m in model.named_modules():
        pre = f"{mod_name}." if mod_name else ""
        if persistent is None:
            out += [pre + n for n, p in m._parameters.items() if p is not None and p.is_meta]
        for n, b in m._buffers.items():
            if b is not None and b.is_meta and (persistent is None
                                                or (n not in m._non_persistent_buffers_set) == persistent):
                out.append(pre + n)
        out += [pre + n for n, v in vars(m).items() if isinstance(v, Tensor) and v.is_meta]
    return out


def init_empty(factory: Callable[[], M]) -> M:
    """``factory()`` built on the ``meta`` device: parameters and persistent buffers are shape-only placeholders (fill
    them with :func:`load_empty`); non-persistent buffers are re-created on the CPU with their modules'
    ``reset_buffers()``."""
    with torch.device("meta"):
        model = factory()
    for mod_name, m in model.named_modules():
        lost = [n for n, b in m._buffers.items() if b is not None and b.is_meta and n in m._non_persistent_buffers_set]
        lost += [n for n, v in vars(m).items() if isinstance(v, Tensor) and v.is_meta]
        if not lost:
            continue
        reset = getattr(m, "reset_buffers", None)
        if reset is None:
            where = mod_name or "the model"
            raise TypeError(f"{type(m).__name__} ({where}) holds non-persistent tensor(s) {lost} that a meta-device "
                            "build leaves empty; give it a reset_buffers() method that re-creates them")
        reset()
    left = _meta_tensors(model, persistent=False)
    if left:
        raise TypeError(f"reset_buffers() left {left[:4]} on the meta device")
    return model


def load_empty(model: M, state: Mapping[str, Tensor]) -> M:
    """Make ``state``'s tensors the parameters / persistent buffers of ``model`` (from :func:`init_empty`) without
    copying them (``assign=True``; strict). Tied parameters (the same Parameter under several names, e.g. an LM head
    sharing the embedding) are tied again afterwards. Returns ``model`` in eval mode."""
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    for names in tied.values():
        owner = model.get_parameter(names[0])
        for alias in names[1:]:
            mod_name, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(mod_name), attr, owner)
    left = _meta_tensors(model)
    if left:
        raise TypeError(f"{left[:4]} are still on the meta device after loading (the state dict did not fill them)")
    return model.eval()
