"""``torch.compile`` for the MoE layer's routed forward (:func:`zoo.moe.layer.routed_moe`): the router's decision,
the auxiliary losses and statistics and, on the fused GPU path, the expert kernels, as ONE graph per layer call.

Why: that part is ~90 tiny kernels per MoE layer and training step (softmax, top-k, the buffer-rank scan,
losses, counts). Eager PyTorch pays one Python dispatch per kernel, so on a GPU the host falls behind and the
GPU waits (the V-MoE-B/16 training step is launch-bound there, ``benchmarks/results/train_step.md``). Compiled,
each of these functions is a handful of fused kernels forward and backward. The functions stay plain PyTorch:
the same code runs eagerly on CPU (the reference path) and compiled on CUDA, and tests pin one to the other.

The setting (``MoEConfig.compile_routing``): None = compile on CUDA only, True = always, False = never.
``TORCHDYNAMO_DISABLE=1`` turns every ``torch.compile`` off, these included. Inside a model that is itself being
compiled, the plain function is returned (the outer compile traces it).

CUDA graphs (``MoEConfig.cuda_graphs``, None = on, wherever the graph is compiled on CUDA): the compiled graph is
also replayed as a CUDA graph (``torch.compile(mode="reduce-overhead")``, PyTorch's CUDA graph trees), so its
forward and its backward each cost one replay of host time instead of one launch per kernel. On the fused GPU path
the graph holds the expert kernels too (``zoo.kernels.fused_moe`` is a custom op that compiles whole), so a V-MoE
layer's forward and backward become one replay each. The trees keep each call's outputs in their memory pool until
the next training step starts (the next call after a backward, or ``torch.compiler.cudagraph_mark_step_begin()``):
reading an output of an earlier step after that raises an error, never returns stale numbers. So a loop of forwards
without backward marks each step, and a leaf input's ``.grad`` is reset between steps; parameter gradients are
copied out of the pool (:func:`keep_grads_out_of_graph_pool`). Inside an outer CUDA graph capture (a whole captured
training step) the graph runs compiled without its own CUDA graph.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
import weakref
from typing import Callable, Iterable, Iterator, Optional

import torch

_COMPILED: dict[tuple[Callable, Optional[str]], Callable] = {}
_GRAD_HOOKED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def keep_grads_out_of_graph_pool(params: Iterable[Optional[torch.Tensor]]) -> None:
    """Make sure no ``.grad`` of ``params`` is memory of a CUDA graph pool.

    Why: a CUDA-graphed backward returns the parameters' gradients in the graph's pool, and autograd adopts such a
    tensor as ``.grad`` when ``.grad`` is None. The next step's replay reuses that memory, so gradients accumulated
    over several steps (``accumulate_grad_batches``, or no ``zero_grad`` in between) would fail with "accessing
    tensor output of CUDAGraphs that has been overwritten". A gradient hook copies the incoming gradient when it
    would be adopted (``.grad`` is None; one copy per parameter and step); gradients added to an existing ``.grad``
    need no copy. Registered once per parameter object (a copied or unpickled model gets its own)."""
    for p in params:
        if p is None or not p.requires_grad or _GRAD_HOOKED.get(id(p)) is p:
            continue
        p.register_hook(functools.partial(_copy_if_adopted, weakref.ref(p)))
        _GRAD_HOOKED[id(p)] = p


def _copy_if_adopted(param_ref: "weakref.ref[torch.Tensor]", grad: torch.Tensor) -> Optional[torch.Tensor]:
    param = param_ref()
    return grad.clone() if param is not None and param.grad is None else None


def compile_enabled(setting: Optional[bool], device: torch.device) -> bool:
    """Whether ``setting`` (None = CUDA only) compiles on ``device``."""
    return device.type == "cuda" if setting is None else bool(setting)


_CUDA_GRAPHS_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("zoo_cuda_graphs_off", default=False)


@contextlib.contextmanager
def cuda_graphs_off() -> Iterator[None]:
    """No CUDA-graph replay of compiled MoE steps inside this block (they still compile).

    For code that runs a layer twice per step, as activation checkpointing does (forward, then the recompute
    during backward): CUDA graph trees record the first call and see the recompute as a new, overlapping step
    ("graph recording observed an input tensor deallocate ..."). Whoever checkpoints enters this in the function
    it checkpoints, so the forward and its recompute both run without graphs."""
    token = _CUDA_GRAPHS_OFF.set(True)
    try:
        yield
    finally:
        _CUDA_GRAPHS_OFF.reset(token)


def cuda_graphs_enabled(setting: Optional[bool], device: torch.device) -> bool:
    """Whether a graph compiled for ``device`` is also replayed as a CUDA graph (None = yes; only ever on CUDA;
    never inside :func:`cuda_graphs_off`)."""
    if device.type != "cuda" or setting is False or _CUDA_GRAPHS_OFF.get():
        return False
    return not torch.cuda.is_current_stream_capturing()  # an outer capture records the kernels itself


def maybe_compiled(fn: Callable, setting: Optional[bool], device: torch.device,
                   cuda_graphs: Optional[bool] = False) -> Callable:
    """``fn`` itself, or its ``torch.compile``-d version (one per function and mode, shared by every layer; built on
    first use), replayed as a CUDA graph where ``cuda_graphs`` (:func:`cuda_graphs_enabled`) says so. A replayed
    graph's callable first hooks the gradients of every parameter among its arguments
    (:func:`keep_grads_out_of_graph_pool`).

    Compiled only while autograd records (training steps, the launch-bound part). Evaluation runs ``fn`` eagerly:
    its settings (eval capacity and k, no router noise, uneven last batches) would add a recompilation each, and
    it is not where the time goes. Not ``fullgraph``: a model whose shapes keep changing past dynamo's
    recompilation limit (e.g. LIMoE's image and text passes, masked and not, with uneven last batches) then
    falls back to eager with a warning instead of failing the run (the tests check that the functions compile
    to one graph each)."""
    if not compile_enabled(setting, device) or torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return fn
    mode = "reduce-overhead" if cuda_graphs_enabled(cuda_graphs, device) else None
    return _compiled(fn, mode, "MoEConfig(compile_routing=False) skips compiling.")


def compiled_once(fn: Callable, cuda_graphs: bool = False) -> Callable:
    """``torch.compile(fn)``, built on first use and shared by every caller in the process, falling back to ``fn`` if
    the compiler backend fails (as :func:`maybe_compiled`'s functions do); ``cuda_graphs``: also replayed as a CUDA
    graph (``mode="reduce-overhead"``; the parameters of modules among the arguments get
    :func:`keep_grads_out_of_graph_pool`). For the compiled decoder and vision tower (``DecoderLM.compile_blocks``,
    ``MoELLaVA.compile_tower``): they pass the module as an argument, and dynamo does not specialise on it, so one
    graph serves every block."""
    return _compiled(fn, "reduce-overhead" if cuda_graphs else None,
                     "compile=False (DecoderLM.compile_blocks, MoELLaVA.compile_tower) skips compiling.")


def _compiled(fn: Callable, mode: Optional[str], how_to_skip: str) -> Callable:
    """The process's one compiled version of ``fn`` in ``mode``, built on first use."""
    compiled = _COMPILED.get((fn, mode))
    if compiled is None:
        compiled = torch.compile(fn, mode=mode)
        if mode is not None:
            compiled = _keeping_grads_out_of_graph_pool(compiled)
        compiled = _eager_if_the_compiler_fails(compiled, fn, (fn, mode), how_to_skip)
        _COMPILED[(fn, mode)] = compiled
    return compiled


def _backend_compile_errors() -> tuple[type[BaseException], ...]:
    # A compiler backend that fails (e.g. torch 2.11's inductor emitting C++ that does not build for one kernel on an
    # AVX-512 host) raises one of these, before the graph runs.
    errors = []
    for module, name in (("torch._dynamo.exc", "BackendCompilerFailed"), ("torch._inductor.exc", "InductorError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _eager_if_the_compiler_fails(compiled: Callable, fn: Callable, key: tuple[Callable, Optional[str]],
                                 how_to_skip: str) -> Callable:
    """``compiled``, or ``fn`` from the first call on which the compiler backend fails: a warning says so and the
    run goes on eagerly (same values, slower) instead of dying on a compiler bug. The compiled functions are single
    graphs (the tests check it), so a backend failure comes before any of ``fn`` ran, and running ``fn`` then
    repeats nothing."""
    errors = _backend_compile_errors()

    @functools.wraps(fn)
    def call(*args):
        if _COMPILED.get(key) is not call:  # an earlier call fell back
            return fn(*args)
        try:
            return compiled(*args)
        except errors as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            warnings.warn(f"torch.compile of {getattr(fn, '__qualname__', fn)} failed in the compiler backend "
                          f"(torch {torch.__version__}: {type(err).__name__}: {first[:200]}); running it eagerly from "
                          f"now on: same results, slower. {how_to_skip}",
                          RuntimeWarning, stacklevel=2)
            _COMPILED[key] = fn
            return fn(*args)

    return call


def _keeping_grads_out_of_graph_pool(graphed: Callable) -> Callable:
    def call(*args):
        keep_grads_out_of_graph_pool(_parameters_in(args))
        return graphed(*args)

    return call


def _parameters_in(args: tuple) -> Iterator[torch.nn.Parameter]:
    """The parameters among ``args``, looking into tuples and lists (the layer passes the router's parameters and its
    experts' weights inside tuples) and modules (a compiled decoder gets the decoder)."""
    for arg in args:
        if isinstance(arg, torch.nn.Parameter):
            yield arg
        elif isinstance(arg, (tuple, list)):
            yield from _parameters_in(arg)
        elif isinstance(arg, torch.nn.Module):
            yield from arg.parameters()
