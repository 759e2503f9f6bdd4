"""``torch.compile`` for the routing bookkeeping of the MoE layer: the router's decision and the auxiliary
losses and statistics.

Why: that part is ~90 tiny kernels per MoE layer and training step (softmax, top-k, the buffer-rank scan,
losses, counts). Eager PyTorch pays one Python dispatch per kernel, so on a GPU the host falls behind and the
GPU waits (the V-MoE-B/16 training step is launch-bound there, ``benchmarks/results/train_step.md``). Compiled,
each of these functions is a handful of fused kernels forward and backward. The functions stay plain PyTorch:
the same code runs eagerly on CPU (the reference path) and compiled on CUDA, and tests pin one to the other.

The setting (``MoEConfig.compile_routing``): None = compile on CUDA only, True = always, False = never.
``TORCHDYNAMO_DISABLE=1`` turns every ``torch.compile`` off, these included. Inside a model that is itself being
compiled, the plain function is returned (the outer compile traces it).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

_COMPILED: dict[Callable, Callable] = {}


def compile_enabled(setting: Optional[bool], device: torch.device) -> bool:
    """Whether ``setting`` (None = CUDA only) compiles on ``device``."""
    return device.type == "cuda" if setting is None else bool(setting)


def maybe_compiled(fn: Callable, setting: Optional[bool], device: torch.device) -> Callable:
    """``fn`` itself, or its ``torch.compile``-d version (one per function, shared by every layer; built on first
    use).

    Compiled only while autograd records (training steps, the launch-bound part). Evaluation runs ``fn`` eagerly:
    its settings (eval capacity and k, no router noise, uneven last batches) would add a recompilation each, and
    it is not where the time goes. Not ``fullgraph``: a model whose shapes keep changing past dynamo's
    recompilation limit (e.g. LIMoE's image and text passes, masked and not, with uneven last batches) then
    falls back to eager with a warning instead of failing the run (the tests check that the functions compile
    to one graph each)."""
    if not compile_enabled(setting, device) or torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return fn
    compiled = _COMPILED.get(fn)
    if compiled is None:
        compiled = _COMPILED[fn] = torch.compile(fn)
    return compiled
