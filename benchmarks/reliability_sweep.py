"""Reliability sweep (issue 17): a table of concrete bad inputs and faults a demanding user would try, each run and
its outcome classified automatically.

    PYTHONPATH=$PWD python benchmarks/reliability_sweep.py            # all cases, writes results/reliability_sweep.*
    PYTHONPATH=$PWD python benchmarks/reliability_sweep.py --no-cli        # in-process cases only (seconds)
    PYTHONPATH=$PWD python benchmarks/reliability_sweep.py --only moe_config --print

Every case declares what counts as a pass: an error of a given type whose message contains given strings (the bad
value or the name of the bad setting / file, and the way out), or a correct result (a check that raises
``AssertionError`` when the result is wrong). Outcomes:

- ``clear``: the expected error type, raised by the zoo's own check, and the message has every required string;
- ``ok``: a correct result (for cases that expect one);
- ``unclear``: the expected type from the zoo's own code, or another type raised by the zoo's code, whose message
  lacks a required string;
- ``raw``: an exception raised inside a library (torch, numpy, safetensors, the standard library, ...) rather than
  by a check of the zoo;
- ``silent``: no error where one was expected, or a wrong result;
- ``crash``: an unexpected exception in a case that expects a result (or a CLI process killed by a signal).

Cases run in process except the CLI group (a few ``train.py`` / ``eval.py`` subprocesses that fail at parse or setup
time). ``tests/test_reliability_sweep.py`` runs the in-process cases and fails on any raw / silent / crash outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
ZOO_DIR = REPO / "zoo"
THIS_FILE = Path(__file__).resolve()
OUTCOMES = ("clear", "ok", "unclear", "raw", "silent", "crash")
BAD_OUTCOMES = ("raw", "silent", "crash")


@dataclass
class Case:
    """One bad input or fault. ``run(ctx)`` does the thing; with ``error`` set the case passes when it raises that
    type with every string of ``mentions`` in its message (case-insensitive); with ``error=None`` it passes when
    ``run`` returns without raising (it asserts the result itself)."""

    id: str
    group: str
    what: str
    run: Callable[["Context"], Any]
    error: Optional[type | tuple[type, ...]] = None
    mentions: tuple[str, ...] = ()
    cli: bool = False


@dataclass
class Result:
    id: str
    group: str
    what: str
    outcome: str
    detail: str
    seconds: float


class Context:
    """Shared fixtures built once: a temporary folder, small models and a published folder of one."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="zoo_sweep_"))
        self._cache: dict[str, Any] = {}

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def model(self, name: str) -> torch.nn.Module:
        """A fresh-seeded, eval-mode model of preset ``name`` (shared between cases: cases must not modify it)."""
        def make():
            import zoo
            torch.manual_seed(0)
            return zoo.create_model(name).eval()
        return self.cached(f"model:{name}", make)

    def published(self) -> Path:
        """A pristine ``save_pretrained`` folder of ``vmoe_tiny_test`` (copy it before damaging it)."""
        def make():
            import zoo
            folder = self.tmp / "published"
            zoo.save_pretrained(self.model("vmoe_tiny_test"), folder)
            return folder
        return self.cached("published", make)

    def damaged_copy(self, name: str) -> Path:
        folder = self.tmp / f"pub_{name}"
        shutil.copytree(self.published(), folder)
        return folder

    def path(self, name: str) -> Path:
        return self.tmp / name


# --------------------------------------------------------------------------------------------------- classification
def _raised_in_zoo(err: BaseException) -> bool:
    """True when the innermost frame of ``err`` is the zoo's code (or a call made by this file, e.g. a bad keyword
    argument, which Python reports at the call site); False when a library raised it."""
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    filename = Path(last.tb_frame.f_code.co_filename).resolve()
    return filename == THIS_FILE or ZOO_DIR in filename.parents or filename.parent == REPO


def _short(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg[:300]}"


def classify(case: Case, ctx: Context) -> Result:
    start = time.perf_counter()
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            case.run(ctx)
    except AssertionError as err:
        outcome = "silent"
        detail = f"wrong result: {err}"
    except SystemExit as err:  # argparse in a CLI entry point called in process: exit 2 + a usage line
        text = out.getvalue().strip().splitlines()
        message = text[-1] if text else str(err.code)
        if case.error is not None and issubclass(SystemExit, _as_tuple(case.error)) and err.code not in (0, None):
            missing = [m for m in case.mentions if m.lower() not in message.lower()]
            outcome = "unclear" if missing else "clear"
            detail = message[:300] + (f" [lacks {missing}]" if missing else "")
        else:
            outcome = "silent" if err.code in (0, None) else "unclear"
            detail = f"exit {err.code}: {message[:300]}"
    except Exception as err:  # noqa: BLE001 (classifying every failure is the point)
        detail = _short(err)
        own = _raised_in_zoo(err)
        if case.error is None:
            outcome = "crash" if own else "raw"
        elif not own:
            outcome = "raw"
        else:
            missing = [m for m in case.mentions if m.lower() not in str(err).lower()]
            right_type = isinstance(err, _as_tuple(case.error))
            outcome = "clear" if right_type and not missing else "unclear"
            if not right_type:
                detail += f" [expected {_names(case.error)}]"
            if missing:
                detail += f" [lacks {missing}]"
        if outcome in ("raw", "crash"):
            frames = traceback.extract_tb(err.__traceback__)
            if frames:
                detail += f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})"
    else:
        if case.error is None:
            outcome, detail = "ok", "correct result"
        else:
            outcome, detail = "silent", f"no error (expected {_names(case.error)})"
    return Result(case.id, case.group, case.what, outcome, detail, time.perf_counter() - start)


def _as_tuple(error: type | tuple[type, ...]) -> tuple[type, ...]:
    return error if isinstance(error, tuple) else (error,)


def _names(error: type | tuple[type, ...]) -> str:
    return " / ".join(t.__name__ for t in _as_tuple(error))


# ------------------------------------------------------------------------------------------------------- the cases
CASES: list[Case] = []


def case(id: str, group: str, what: str, run: Callable[[Context], Any], error: Any = None,
         mentions: Sequence[str] = (), cli: bool = False) -> None:
    if any(c.id == id for c in CASES):
        raise ValueError(f"duplicate case id {id!r}")
    CASES.append(Case(id, group, what, run, error, tuple(mentions), cli))


def _moe_layer(**cfg: Any):
    from zoo.moe import MoEConfig, MoELayer
    torch.manual_seed(0)
    defaults = dict(num_experts=4, top_k=2, group_size=2)
    return MoELayer(8, 16, MoEConfig(**{**defaults, **cfg}))


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# ---- MoEConfig: every field with a bad value, directly and through create_model overrides (the YAML path) ----
MOE_BAD_VALUES: list[tuple[str, Any, tuple[str, ...]]] = [
    ("num_experts", 0, ("num_experts", "0")),
    ("num_experts", -3, ("num_experts", "-3")),
    ("num_experts", 2.5, ("num_experts", "2.5")),
    ("num_experts", "4", ("num_experts", "'4'")),
    ("top_k", 0, ("top_k", "0")),
    ("top_k", 9, ("top_k", "9")),
    ("top_k", 1.5, ("top_k", "1.5")),
    ("top_k", "2", ("top_k", "'2'")),
    ("eval_top_k", 0, ("eval_top_k", "0")),
    ("eval_top_k", 9, ("eval_top_k", "9")),
    ("capacity_factor", 0.0, ("capacity_factor", "0.0")),
    ("capacity_factor", -1.0, ("capacity_factor", "-1.0")),
    ("capacity_factor", float("nan"), ("capacity_factor", "nan")),
    ("capacity_factor", float("inf"), ("capacity_factor", "inf", "dropless")),
    ("capacity_factor", None, ("capacity_factor", "None", "dropless")),
    ("capacity_factor", "1.0", ("capacity_factor", "'1.0'")),
    ("eval_capacity_factor", float("nan"), ("eval_capacity_factor", "nan")),
    ("eval_capacity_factor", 0.0, ("eval_capacity_factor", "0.0")),
    ("capacity_multiple_of", -4, ("capacity_multiple_of", "-4")),
    ("group_size", 0, ("group_size", "0")),
    ("group_size", -2, ("group_size", "-2")),
    ("group_size", 1.5, ("group_size", "1.5")),
    ("router", "bogus", ("router", "bogus", "topk")),
    ("router", "TopK", ("router", "TopK", "topk")),
    ("activation", "bogus", ("activation", "bogus", "gelu")),
    ("dispatch", "bogus", ("dispatch", "bogus", "sorted")),
    ("noise_std", -1.0, ("noise_std", "-1.0")),
    ("noise_std", float("nan"), ("noise_std", "nan")),
    ("num_modalities", 0, ("num_modalities", "0")),
    ("slots_per_expert", 0, ("slots_per_expert", "0")),
    ("importance_loss_weight", -1.0, ("importance_loss_weight", "-1.0")),
    ("load_loss_weight", float("nan"), ("load_loss_weight", "nan")),
    ("switch_loss_weight", -0.5, ("switch_loss_weight", "-0.5")),
    ("z_loss_weight", float("inf"), ("z_loss_weight", "inf")),
    ("local_entropy_weight", -1.0, ("local_entropy_weight", "-1.0")),
    ("global_entropy_weight", -1.0, ("global_entropy_weight", "-1.0")),
    ("global_entropy_min_experts", 0.5, ("global_entropy_min_experts", "0.5")),
    ("local_entropy_weight_by_modality", (0.1, 0.2), ("local_entropy_weight_by_modality", "2")),
    ("global_entropy_min_experts_by_modality", (0.5,), ("global_entropy_min_experts_by_modality", "0.5")),
    ("num_shared_experts", -1, ("num_shared_experts", "-1")),
    ("shared_expert_hidden_dim", 0, ("shared_expert_hidden_dim", "0")),
    ("shared_expert_gate", True, ("shared_expert_gate", "num_shared_experts")),
    ("renormalize", "yes", ("renormalize", "'yes'")),
    ("batch_priority", 1.0, ("batch_priority", "1.0")),
    ("dropless", "false", ("dropless", "'false'")),
]


def _slug(value: Any) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in repr(value))[:16]


def _add_moe_config_cases() -> None:
    from zoo.config import ConfigError

    for field_name, value, mentions in MOE_BAD_VALUES:
        def direct(ctx, f=field_name, v=value):
            from zoo.moe import MoEConfig
            MoEConfig(**{f: v})

        def override(ctx, f=field_name, v=value):
            import zoo
            zoo.create_model("vmoe_tiny_test", encoder={"moe": {f: v}})

        case(f"moe_config.{field_name}={_slug(value)}", "moe_config", f"MoEConfig({field_name}={value!r})", direct,
             (ValueError, TypeError), mentions)
        case(f"moe_yaml.{field_name}={_slug(value)}", "moe_config",
             f"create_model('vmoe_tiny_test', encoder.moe.{field_name}={value!r})", override, ConfigError, mentions)
    case("moe_config.unknown_key", "moe_config", "MoEConfig(num_expert=4) (typo)",
         lambda ctx: __import__("zoo").MoEConfig(num_expert=4), TypeError, ("num_expert",))
    case("moe_yaml.unknown_key", "moe_config", "create_model(..., encoder.moe.num_expert=4) (typo)",
         lambda ctx: __import__("zoo").create_model("vmoe_tiny_test", **{"encoder.moe.num_expert": 4}),
         ValueError, ("num_expert", "num_experts"))


# ---- MoELayer inputs ----
def _add_moe_layer_cases() -> None:
    def call(shape=(2, 5, 8), dtype=torch.float32, mask=None, modality=None, layer_kwargs=None, train=False):
        def run(ctx):
            layer = _moe_layer(**(layer_kwargs or {})).train(train)
            x = torch.randn(*shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 5, shape, dtype=dtype)
            return layer(x, mask=mask(shape) if callable(mask) else mask,
                         modality=modality(shape) if callable(modality) else modality)
        return run

    E = ValueError
    case("moe_layer.x_2d", "moe_layer", "x of shape [B, D] (no sequence axis)", call((4, 8)), E, ("[B, S, D", "(4, 8)"))
    case("moe_layer.x_4d", "moe_layer", "x of shape [B, H, W, D]", call((2, 3, 3, 8)), E, ("[B, S, D", "(2, 3, 3, 8)"))
    case("moe_layer.x_wrong_dim", "moe_layer", "x with D=7 for a D=8 layer", call((2, 5, 7)), E, ("D=8", "7"))
    case("moe_layer.x_int", "moe_layer", "integer x", call(dtype=torch.int64), (ValueError, TypeError),
         ("int64", "float"))
    case("moe_layer.x_float64", "moe_layer", "float64 x into a float32 layer", call(dtype=torch.float64),
         (ValueError, TypeError), ("float64", "float32"))
    case("moe_layer.mask_shape", "moe_layer", "mask [B, S+1]", call(mask=lambda s: torch.ones(s[0], s[1] + 1)), E,
         ("mask", "(2, 6)"))
    case("moe_layer.mask_3d", "moe_layer", "mask [B, S, 1]", call(mask=lambda s: torch.ones(s[0], s[1], 1)), E,
         ("mask", "(2, 5, 1)"))
    case("moe_layer.modality_shape", "moe_layer", "modality [B]", call(modality=lambda s: torch.zeros(s[0],
         dtype=torch.long)), E, ("modality", "(2,)"))
    case("moe_layer.modality_out_of_range", "moe_layer", "modality id 3 with num_modalities=2",
         call(modality=lambda s: torch.full(s[:2], 3), layer_kwargs={"num_modalities": 2}, train=True), E,
         ("modality", "3", "num_modalities"))
    case("moe_layer.modality_negative", "moe_layer", "modality id -1",
         call(modality=lambda s: torch.full(s[:2], -1), layer_kwargs={"num_modalities": 2}, train=True), E,
         ("modality", "-1"))
    case("moe_layer.modality_float", "moe_layer", "float modality ids",
         call(modality=lambda s: torch.zeros(s[:2]), layer_kwargs={"num_modalities": 2}, train=True),
         (ValueError, TypeError), ("modality", "float"))

    def empty(shape):
        def run(ctx):
            for train in (True, False):
                y = _moe_layer().train(train)(torch.randn(*shape))
                assert y.shape == shape, f"output shape {tuple(y.shape)} != {shape}"
        return run

    case("moe_layer.empty_batch", "moe_layer", "B=0 (empty batch), train and eval", empty((0, 5, 8)))
    case("moe_layer.empty_seq", "moe_layer", "S=0 (empty sequences)", empty((2, 0, 8)))

    def fully_masked(ctx):
        layer = _moe_layer().train(True)
        y = layer(torch.randn(2, 5, 8), mask=torch.zeros(2, 5, dtype=torch.bool))
        assert torch.equal(y, torch.zeros_like(y)), "masked tokens must give 0"
        assert _finite(layer.aux.loss), f"aux loss {layer.aux.loss} with every token masked"

    case("moe_layer.all_masked", "moe_layer", "every token masked: zero output, finite aux loss", fully_masked)

    def odd_batch(ctx):
        layer = _moe_layer(group_size=4).eval()
        x = torch.randn(3, 5, 8)
        y = layer(x)
        assert y.shape == x.shape and _finite(y)

    case("moe_layer.batch_not_multiple_of_group", "moe_layer", "B=3 with group_size=4", odd_batch)

    def nan_input(ctx):
        layer = _moe_layer(dispatch="loop").eval()
        x = torch.randn(2, 5, 8)
        x[0, 0, 0] = float("nan")
        y = layer(x)
        assert not _finite(y[0, 0]), "a NaN token's output must not come out finite (it would hide the NaN)"

    case("moe_layer.nan_token_visible", "moe_layer", "a NaN token gives a non-finite output (not hidden)", nan_input)

    for router in ("topk", "expert_choice", "soft"):
        for train in (True, False):
            for masked in (False, True):
                def run(ctx, router=router, train=train, masked=masked):
                    layer = _moe_layer(router=router).train(train)
                    x = torch.randn(4, 6, 8, requires_grad=True)
                    mask = None
                    if masked:
                        mask = torch.ones(4, 6, dtype=torch.bool)
                        mask[:, 4:] = False
                    y = layer(x, mask=mask)
                    assert y.shape == x.shape and _finite(y), "output shape / finiteness"
                    if masked and router != "soft":
                        assert torch.equal(y[:, 4:], torch.zeros_like(y[:, 4:])), "masked tokens must give 0"
                    assert _finite(layer.aux.loss)
                    if train:
                        (y.sum() + layer.aux.loss).backward()
                        assert _finite(x.grad), "non-finite gradient"

                tag = f"{router}.{'train' if train else 'eval'}{'.masked' if masked else ''}"
                case(f"moe_layer.{tag}", "moe_layer", f"{router} router, {'train' if train else 'eval'}"
                     f"{', padded' if masked else ''}: finite output, aux loss and gradients", run)

    def loop_vs_sorted(ctx):
        x = torch.randn(4, 6, 8)
        a = _moe_layer(dispatch="loop").eval()(x)
        b = _moe_layer(dispatch="sorted").eval()(x)
        torch.testing.assert_close(a, b)

    case("moe_layer.dispatch_agree", "moe_layer", "dispatch loop and sorted give the same output", loop_vs_sorted)
    case("moe_layer.fused_on_cpu", "moe_layer", "dispatch='fused' on CPU",
         call(layer_kwargs={"dispatch": "fused"}), RuntimeError, ("fused", "dispatch='auto'"))

    def wrong_experts(ctx):
        from zoo.moe import MoEConfig, MoELayer
        MoELayer(8, 16, MoEConfig(num_experts=4), experts=torch.nn.Linear(8, 8))

    case("moe_layer.experts_wrong_type", "moe_layer", "experts=nn.Linear", wrong_experts, TypeError,
         ("Experts", "Linear"))

    def experts_wrong_size(ctx):
        from zoo.moe import MoEConfig, MoELayer
        from zoo.moe.experts import StackedExperts
        MoELayer(8, 16, MoEConfig(num_experts=4), experts=StackedExperts(3, 8, 16, "gelu_tanh", True))

    case("moe_layer.experts_wrong_count", "moe_layer", "3 experts for num_experts=4", experts_wrong_size, ValueError,
         ("num_experts=3", "4"))

    def causal_router(router):
        def run(ctx):
            from zoo.moe import MoEConfig, MoELayer
            MoELayer(8, 16, MoEConfig(num_experts=4, router=router), causal=True)
        return run

    case("moe_layer.causal_expert_choice", "moe_layer", "causal layer with expert-choice routing",
         causal_router("expert_choice"), ValueError, ("expert_choice", "topk"))
    case("moe_layer.causal_soft", "moe_layer", "causal layer with Soft MoE", causal_router("soft"), ValueError,
         ("soft", "topk"))

    def dim_zero(ctx):
        from zoo.moe import MoEConfig, MoELayer
        MoELayer(0, 16, MoEConfig(num_experts=4))

    case("moe_layer.dim_zero", "moe_layer", "MoELayer(dim=0)", dim_zero, ValueError, ("dim", "0"))

    def hidden_negative(ctx):
        from zoo.moe import MoEConfig, MoELayer
        MoELayer(8, -16, MoEConfig(num_experts=4))

    case("moe_layer.hidden_negative", "moe_layer", "MoELayer(hidden_dim=-16)", hidden_negative, ValueError,
         ("hidden_dim", "-16"))

    def eval_override(ctx, **kw):
        from zoo.moe.layer import set_eval_overrides
        model = __import__("zoo").create_model("vmoe_tiny_test")
        set_eval_overrides(model, **kw)

    case("moe_layer.eval_override_nan", "moe_layer", "set_eval_overrides(capacity_factor=nan)",
         lambda ctx: eval_override(ctx, capacity_factor=float("nan")), ValueError, ("capacity_factor", "nan"))
    case("moe_layer.eval_override_topk", "moe_layer", "set_eval_overrides(top_k=9) with 4 experts",
         lambda ctx: eval_override(ctx, top_k=9), ValueError, ("top_k", "9"))


# ---- model inputs ----
def _add_model_input_cases() -> None:
    def vmoe(make):
        def run(ctx):
            return ctx.model("vmoe_tiny_test")(make())
        return run

    E = ValueError
    case("vmoe.channels_1", "model_inputs", "V-MoE (3 channels) given 1-channel images",
         vmoe(lambda: torch.randn(2, 1, 16, 16)), E, ("3 channel", "got 1", "in_chans"))
    case("vmoe.channels_4", "model_inputs", "V-MoE given RGBA images", vmoe(lambda: torch.randn(2, 4, 16, 16)), E,
         ("3 channel", "got 4"))
    case("vmoe.size_32", "model_inputs", "V-MoE (16x16) given 32x32 images", vmoe(lambda: torch.randn(2, 3, 32, 32)), E,
         ("16x16", "32x32", "image_size"))
    case("vmoe.size_nonsquare", "model_inputs", "V-MoE given 16x20 images", vmoe(lambda: torch.randn(2, 3, 16, 20)), E,
         ("16x16", "16x20"))
    case("vmoe.hwc", "model_inputs", "V-MoE given channels-last [B, H, W, C] images",
         vmoe(lambda: torch.randn(2, 16, 16, 3)), E, ("channel", "got 16"))
    case("vmoe.3d", "model_inputs", "V-MoE given one image [C, H, W]", vmoe(lambda: torch.randn(3, 16, 16)), E,
         ("[B, C, H, W]", "unsqueeze(0)"))
    case("vmoe.uint8", "model_inputs", "V-MoE given uint8 images",
         vmoe(lambda: torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)), E, ("uint8", "normalise"))
    case("vmoe.nan", "model_inputs", "V-MoE given an image with a NaN pixel",
         vmoe(lambda: torch.randn(2, 3, 16, 16).index_fill_(0, torch.tensor([1]), float("nan"))), E, ("NaN",))
    case("vmoe.inf", "model_inputs", "V-MoE given an image with an inf pixel",
         vmoe(lambda: torch.full((2, 3, 16, 16), float("inf"))), E, ("Inf",))
    case("vmoe.numpy", "model_inputs", "V-MoE given a numpy array",
         vmoe(lambda: torch.randn(2, 3, 16, 16).numpy()), TypeError, ("ndarray", "Tensor"))
    case("vmoe.list", "model_inputs", "V-MoE given a Python list", vmoe(lambda: [[0.0]]), TypeError, ("list",))
    case("vmoe.float64", "model_inputs", "V-MoE (float32) given float64 images",
         vmoe(lambda: torch.randn(2, 3, 16, 16, dtype=torch.float64)), (ValueError, TypeError), ("float64", "float32"))

    def vmoe_ok(shape, **kw):
        def run(ctx):
            model = ctx.model("vmoe_tiny_test")
            x = torch.randn(*shape, **kw)
            out = model(x)
            logits = out.logits if hasattr(out, "logits") else out
            assert logits.shape == (shape[0], 10), f"logits shape {tuple(logits.shape)}"
            assert _finite(logits)
        return run

    case("vmoe.empty_batch", "model_inputs", "V-MoE given B=0 images: empty logits", vmoe_ok((0, 3, 16, 16)))
    case("vmoe.batch_1", "model_inputs", "V-MoE given one image (B=1 < group_size)", vmoe_ok((1, 3, 16, 16)))
    case("vmoe.batch_odd", "model_inputs", "V-MoE given B=3 (group_size 2)", vmoe_ok((3, 3, 16, 16)))

    def channels_last(ctx):
        model = ctx.model("vmoe_tiny_test")
        x = torch.randn(4, 3, 16, 16)
        a = model(x).logits
        b = model(x.contiguous(memory_format=torch.channels_last)).logits
        torch.testing.assert_close(a, b)

    case("vmoe.channels_last_memory", "model_inputs", "channels_last memory format gives the same logits",
         channels_last)

    def limoe(images=None, text=None, mask=None):
        def run(ctx):
            model = ctx.model("limoe_tiny_test")
            kw = {}
            if images is not None:
                kw["images"] = images()
            if text is not None:
                kw["text"] = text()
            if mask is not None:
                kw["text_mask"] = mask()
            return model(**kw)
        return run

    tokens = lambda *s: torch.randint(1, 100, s)  # noqa: E731
    case("limoe.no_inputs", "model_inputs", "LIMoE.forward() with neither images nor text", limoe(), E,
         ("images", "text"))
    case("limoe.channels", "model_inputs", "LIMoE given 1-channel images",
         limoe(images=lambda: torch.randn(2, 1, 16, 16)), E, ("3 channel", "got 1"))
    case("limoe.size", "model_inputs", "LIMoE given 24x24 images", limoe(images=lambda: torch.randn(2, 3, 24, 24)), E,
         ("16x16", "24x24"))
    case("limoe.text_float", "model_inputs", "LIMoE given float text",
         limoe(text=lambda: torch.randn(2, 16)), E, ("token ids", "float"))
    case("limoe.text_1d", "model_inputs", "LIMoE given text [L] (no batch axis)", limoe(text=lambda: tokens(16)), E,
         ("[B, L]", "(16,)"))
    case("limoe.text_too_long", "model_inputs", "LIMoE (context 16) given 17 tokens", limoe(text=lambda: tokens(2, 17)),
         E, ("17", "context_length"))
    case("limoe.token_out_of_range", "model_inputs", "LIMoE given a token id >= vocab_size",
         limoe(text=lambda: tokens(2, 16).index_fill_(1, torch.tensor([3]), 10 ** 6)), E, ("vocab_size",))
    case("limoe.token_negative", "model_inputs", "LIMoE given a negative token id",
         limoe(text=lambda: tokens(2, 16).index_fill_(1, torch.tensor([3]), -5)), E, ("vocab_size",))
    case("limoe.mask_shape", "model_inputs", "LIMoE text_mask of another shape",
         limoe(text=lambda: tokens(2, 16), mask=lambda: torch.ones(2, 15, dtype=torch.bool)), E,
         ("text_mask", "(2, 15)"))
    case("limoe.mask_empty_row", "model_inputs", "LIMoE caption with no valid token",
         limoe(text=lambda: tokens(2, 16), mask=lambda: torch.zeros(2, 16, dtype=torch.bool)), E, ("valid token",))

    def limoe_padding(ctx):
        # right padding with a mask: the padded caption embeds like the unpadded one (padding takes no capacity)
        model = ctx.model("limoe_tiny_test")
        text = torch.randint(1, 100, (1, 6))
        short = model.encode_text(text, torch.ones(1, 6, dtype=torch.bool))
        padded = torch.cat([text, torch.zeros(1, 10, dtype=torch.long)], 1)
        mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 10)], 1).bool()
        torch.testing.assert_close(model.encode_text(padded, mask), short, atol=1e-5, rtol=1e-5)

    case("limoe.right_padding", "model_inputs", "LIMoE caption right-padded with a mask = unpadded", limoe_padding)

    def decoder(ids, mask=None, **kw):
        def run(ctx):
            model = ctx.model("decoder_tiny_moe")
            return model(ids(), attention_mask=None if mask is None else mask(), **kw)
        return run

    lm_ids = lambda *s: torch.randint(0, 512, s)  # noqa: E731
    case("decoder.ids_float", "model_inputs", "decoder given float input_ids", decoder(lambda: torch.randn(2, 8)),
         (ValueError, TypeError), ("input_ids", "float"))
    case("decoder.ids_1d", "model_inputs", "decoder given input_ids [S]", decoder(lambda: lm_ids(8)), E,
         ("[B, S]", "(8,)"))
    case("decoder.ids_out_of_range", "model_inputs", "decoder given a token id >= vocab_size",
         decoder(lambda: lm_ids(2, 8).index_fill_(1, torch.tensor([2]), 512)), E, ("512", "vocab_size"))
    case("decoder.ids_negative", "model_inputs", "decoder given a negative token id",
         decoder(lambda: lm_ids(2, 8).index_fill_(1, torch.tensor([2]), -1)), E, ("-1", "vocab_size"))
    def long_input(ctx):  # max_seq_len is the trained context and the default KV-cache size, not a hard limit (RoPE)
        logits = ctx.model("decoder_tiny_moe")(lm_ids(1, 200)).logits
        assert logits.shape == (1, 200, 512) and _finite(logits)

    case("decoder.longer_than_max_seq_len", "model_inputs", "decoder (max_seq_len 128) given 200 tokens: runs "
         "(RoPE positions have no hard limit), finite logits", long_input)
    case("decoder.mask_shape", "model_inputs", "decoder attention_mask of another shape",
         decoder(lambda: lm_ids(2, 8), mask=lambda: torch.ones(2, 7)), E, ("attention_mask", "(2, 7)"))

    def gen(ids, mask=None, **kw):
        def run(ctx):
            model = ctx.model("decoder_tiny_moe")
            return model.generate(ids(), attention_mask=None if mask is None else mask(), **kw)
        return run

    case("generate.right_padding", "model_inputs", "generate with a right-padded prompt",
         gen(lambda: lm_ids(2, 6), mask=lambda: torch.tensor([[1] * 6, [1] * 4 + [0] * 2]), max_new_tokens=3), E,
         ("LEFT",))
    case("generate.max_new_tokens_0", "model_inputs", "generate(max_new_tokens=0)",
         gen(lambda: lm_ids(1, 4), max_new_tokens=0), E, ("max_new_tokens", "0"))
    case("generate.temperature_0", "model_inputs", "generate(do_sample=True, temperature=0)",
         gen(lambda: lm_ids(1, 4), do_sample=True, temperature=0.0, max_new_tokens=2), E,
         ("temperature", "do_sample=False"))
    case("generate.top_k_0", "model_inputs", "generate(do_sample=True, top_k=0)",
         gen(lambda: lm_ids(1, 4), do_sample=True, top_k=0, max_new_tokens=2), E, ("top_k", "0"))
    case("generate.top_p_0", "model_inputs", "generate(do_sample=True, top_p=0)",
         gen(lambda: lm_ids(1, 4), do_sample=True, top_p=0.0, max_new_tokens=2), E, ("top_p", "0"))
    case("generate.top_p_2", "model_inputs", "generate(do_sample=True, top_p=1.5)",
         gen(lambda: lm_ids(1, 4), do_sample=True, top_p=1.5, max_new_tokens=2), E, ("top_p", "1.5"))
    case("generate.cache_too_small", "model_inputs", "generate with max_cache_len below prompt + new tokens",
         gen(lambda: lm_ids(1, 8), max_new_tokens=8, max_cache_len=10), E, ("max_cache_len", "16"))
    def past_max_seq_len(ctx):
        out = ctx.model("decoder_tiny_moe").generate(lm_ids(1, 120), max_new_tokens=20)
        assert out.shape == (1, 140)

    case("generate.past_max_seq_len", "model_inputs", "generate past max_seq_len (120 + 20 > 128): the cache is "
         "sized for it, 140 tokens come back", past_max_seq_len)
    case("generate.empty_prompt", "model_inputs", "generate from an empty prompt [1, 0]",
         gen(lambda: lm_ids(1, 0), max_new_tokens=2), E, ("prompt", "empty"))
    case("generate.ids_out_of_range", "model_inputs", "generate from a prompt with id >= vocab_size",
         gen(lambda: torch.tensor([[1, 2, 600]]), max_new_tokens=2), E, ("600", "vocab_size"))

    def left_padding(ctx):
        model = ctx.model("decoder_tiny_moe")
        torch.manual_seed(1)
        prompt = torch.randint(0, 512, (1, 5))
        alone = model.generate(prompt, max_new_tokens=6)
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
        mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 5)], 1).long()
        out = model.generate(padded, attention_mask=mask, max_new_tokens=6)
        assert torch.equal(out[:, -6:], alone[:, -6:]), f"left-padded {out[:, -6:].tolist()} vs alone " \
                                                         f"{alone[:, -6:].tolist()}"

    case("generate.left_padding", "model_inputs", "left-padded prompt generates the unpadded prompt's tokens",
         left_padding)

    def batch_vs_single(ctx):
        model = ctx.model("decoder_tiny_moe")
        torch.manual_seed(2)
        a, b = torch.randint(0, 512, (1, 6)), torch.randint(0, 512, (1, 4))
        batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
        mask = torch.tensor([[1] * 6, [0, 0] + [1] * 4])
        out = model.generate(batch, attention_mask=mask, max_new_tokens=5)
        assert torch.equal(out[0, -5:], model.generate(a, max_new_tokens=5)[0, -5:]), "row 0 differs when batched"
        assert torch.equal(out[1, -5:], model.generate(b, max_new_tokens=5)[0, -5:]), "row 1 differs when batched"

    case("generate.batch_equals_single", "model_inputs", "a batched (left-padded) generation = each prompt alone",
         batch_vs_single)


# ---- create_model / config ----
def _add_factory_cases() -> None:
    import zoo
    from zoo.config import ConfigError

    def cm(*args, **kw):
        return lambda ctx: zoo.create_model(*args, **kw)

    C = ConfigError
    case("factory.unknown_name", "factory", "create_model('vmoe_tiny_tst') (typo)", cm("vmoe_tiny_tst"), C,
         ("vmoe_tiny_tst", "vmoe_tiny_test"))
    case("factory.empty_name", "factory", "create_model('')", cm(""), C, ("''",))
    case("factory.none_name", "factory", "create_model(None)", cm(None), (ConfigError, TypeError), ("None", "str"))
    case("factory.int_name", "factory", "create_model(3)", cm(3), (ConfigError, TypeError), ("3",))
    case("factory.case_name", "factory", "create_model('VMoE_Tiny_Test') (case)", cm("VMoE_Tiny_Test"), C,
         ("VMoE_Tiny_Test", "vmoe_tiny_test"))
    case("factory.unknown_key", "factory", "create_model(..., num_clases=10)", cm("vmoe_tiny_test", num_clases=10), C,
         ("num_clases", "num_classes"))
    case("factory.unknown_nested_key", "factory", "create_model(..., encoder={'deph': 2})",
         cm("vmoe_tiny_test", encoder={"deph": 2}), C, ("deph", "depth"))
    case("factory.unknown_dotted_key", "factory", "create_model(..., **{'encoder.moe.topk': 1})",
         cm("vmoe_tiny_test", **{"encoder.moe.topk": 1}), C, ("topk", "top_k"))
    case("factory.num_classes_str", "factory", "num_classes='10'", cm("vmoe_tiny_test", num_classes="10"), C,
         ("num_classes", "'10'"))
    case("factory.num_classes_float", "factory", "num_classes=10.5", cm("vmoe_tiny_test", num_classes=10.5), C,
         ("num_classes", "10.5"))
    case("factory.num_classes_bool", "factory", "num_classes=True", cm("vmoe_tiny_test", num_classes=True), C,
         ("num_classes", "True"))
    case("factory.num_classes_0", "factory", "num_classes=0", cm("vmoe_tiny_test", num_classes=0), C,
         ("num_classes", "0"))
    case("factory.in_chans_0", "factory", "in_chans=0", cm("vmoe_tiny_test", in_chans=0), C, ("in_chans", "0"))
    case("factory.encoder_not_mapping", "factory", "encoder='big'", cm("vmoe_tiny_test", encoder="big"), C,
         ("encoder", "mapping"))
    case("factory.patch_not_divisor", "factory", "image_size=16, patch_size=5", cm("vmoe_tiny_test", patch_size=5), C,
         ("patch_size=5", "16"))
    case("factory.patch_0", "factory", "patch_size=0", cm("vmoe_tiny_test", patch_size=0), C, ("patch_size", "0"))
    case("factory.image_size_negative", "factory", "image_size=-16", cm("vmoe_tiny_test", image_size=-16), C,
         ("image_size", "-16"))
    case("factory.heads_not_divisor", "factory", "dim 32 with num_heads=5",
         cm("vmoe_tiny_test", encoder={"num_heads": 5}), C, ("num_heads=5", "32"))
    case("factory.depth_0", "factory", "encoder depth 0", cm("vmoe_tiny_test", encoder={"depth": 0}), C,
         ("depth", "0"))
    case("factory.moe_layers_out_of_range", "factory", "moe_layers [7] in a depth-4 encoder",
         cm("vmoe_tiny_test", encoder={"moe_every": None, "moe_layers": [7]}), C, ("7", "depth"))
    case("factory.moe_every_and_layers", "factory", "moe_every and moe_layers together",
         cm("vmoe_tiny_test", encoder={"moe_layers": [1]}), C, ("moe_every", "moe_layers"))
    case("factory.dropout_2", "factory", "encoder dropout 2.0", cm("vmoe_tiny_test", encoder={"dropout": 2.0}), C,
         ("dropout", "2.0"))
    case("factory.dropout_negative", "factory", "encoder dropout -0.1",
         cm("vmoe_tiny_test", encoder={"dropout": -0.1}), C, ("dropout", "-0.1"))
    case("factory.classifier_bogus", "factory", "classifier='bogus'", cm("vmoe_tiny_test", classifier="bogus"), C,
         ("classifier", "bogus"))
    case("factory.limoe_one_modality", "factory", "LIMoE with num_modalities=1",
         cm("limoe_tiny_test", **{"encoder.moe.num_modalities": 1}), C, ("num_modalities",))
    case("factory.limoe_causal", "factory", "LIMoE with a causal encoder",
         cm("limoe_tiny_test", **{"encoder.causal": True}), C, ("causal",))
    case("factory.limoe_context_0", "factory", "LIMoE context_length=0", cm("limoe_tiny_test", context_length=0), C,
         ("context_length", "0"))
    case("factory.decoder_expert_choice", "factory", "decoder with expert-choice MoE",
         cm("decoder_tiny_moe", **{"moe.router": "expert_choice"}), C, ("expert_choice", "causal"))
    case("factory.decoder_heads", "factory", "decoder num_heads not a multiple of num_kv_heads",
         cm("decoder_tiny_moe", num_kv_heads=3), C, ("num_kv_heads", "3"))
    case("factory.decoder_placement", "factory", "decoder moe_placement='bogus'",
         cm("decoder_tiny_moe", moe_placement="bogus"), C, ("bogus", "placement"))
    case("factory.decoder_vocab_0", "factory", "decoder vocab_size=0", cm("decoder_tiny_moe", vocab_size=0), C,
         ("vocab_size", "0"))
    case("factory.decoder_no_moe", "factory", "decoder with MoE placement but moe: null",
         cm("decoder_tiny_moe", moe=None), C, ("moe",))
    case("factory.name_tag_unknown", "factory", "create_model('vmoe_tiny_digits.digts') (tag typo)",
         cm("vmoe_tiny_digits.digts"), C, ("digts", "digits"))
    case("factory.pretrained_unknown_tag", "factory", "create_model('vmoe_tiny_digits', pretrained='digts')",
         cm("vmoe_tiny_digits", pretrained="digts"), C, ("digts", "digits"))
    case("factory.pretrained_int", "factory", "pretrained=3", cm("vmoe_tiny_digits", pretrained=3), C, ("3",))
    case("factory.pretrained_no_tags", "factory", "pretrained=True for a preset without weights",
         cm("vmoe_tiny_test", pretrained=True), (ConfigError, zoo.errors.PretrainedError), ("vmoe_tiny_test",))
    case("factory.name_tag_contradiction", "factory", "create_model('vmoe_tiny_digits.digits', pretrained='other')",
         cm("vmoe_tiny_digits.digits", pretrained="other"), C, ("digits", "other"))
    case("factory.bad_source", "factory", "create_model('hf-hub:') (no repo)", cm("hf-hub:"), C, ("hf-hub:org/repo",))
    case("factory.model_config_unknown", "factory", "model_config('nope')",
         lambda ctx: zoo.model_config("nope"), C, ("nope",))

    def every_pretrained_name(ctx):
        for name in zoo.list_pretrained():
            model = zoo.create_model(name)  # name.tag without pretrained=True: built as the weights need
            assert model is not None

    case("factory.list_pretrained_names", "factory", "every list_pretrained() name works in create_model",
         every_pretrained_name)

    def name_tag_loads(ctx):
        a = zoo.create_model("vmoe_tiny_digits.digits", pretrained=True)
        b = zoo.create_model("vmoe_tiny_digits", pretrained="digits")
        for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(v, w), f"{k} differs between name.tag and pretrained=tag"

    case("factory.name_tag_same_weights", "factory", "'preset.tag' loads the same weights as pretrained='tag'",
         name_tag_loads)

    def tiny_presets(ctx):
        for name in ("vmoe_tiny_test", "limoe_tiny_test", "decoder_tiny", "decoder_tiny_moe", "vmoe_tiny_digits"):
            zoo.create_model(name)

    case("factory.tiny_presets_build", "factory", "the tiny presets build", tiny_presets)


# ---- hub: published folders damaged in every way ----
def _add_hub_cases() -> None:
    import zoo
    from zoo.config import ConfigError
    from zoo.errors import (CheckpointMismatchError, ChecksumError, CorruptCheckpointError, PretrainedError,
                            WeightsNotFoundError)

    def load(name: str, damage: Callable[[Path], Any], via: str = "create"):
        def run(ctx):
            folder = ctx.damaged_copy(name)
            damage(folder)
            if via == "create":
                return zoo.create_model(f"local-dir:{folder}")
            model = zoo.create_model("vmoe_tiny_test")
            return zoo.load_pretrained(model, f"local-dir:{folder}")
        return run

    W = "model.safetensors"

    def flip(n: int, where: float = 0.5):
        def damage(folder):
            data = bytearray((folder / W).read_bytes())
            start = int(len(data) * where)
            for i in range(n):
                data[start + i] ^= 0xFF
            (folder / W).write_bytes(bytes(data))
        return damage

    def truncate(keep: float):
        def damage(folder):
            data = (folder / W).read_bytes()
            (folder / W).write_bytes(data[:int(len(data) * keep)])
        return damage

    def drop_sha(folder):
        meta = folder / "pretrained.json"
        if meta.is_file():
            data = json.loads(meta.read_text())
            data.pop("sha256", None)
            meta.write_text(json.dumps(data))

    def both(*fns):
        return lambda folder: [f(folder) for f in fns]

    def write(name, text):
        return lambda folder: (folder / name).write_text(text)

    def write_bytes(name, data):
        return lambda folder: (folder / name).write_bytes(data)

    def delete(name):
        return lambda folder: (folder / name).unlink()

    def config_edit(fn):
        def damage(folder):
            data = json.loads((folder / "config.json").read_text())
            fn(data)
            (folder / "config.json").write_text(json.dumps(data))
        return damage

    def foreign_weights(folder):
        # another model's weights (other width) with a matching sha256, so only the shape check can catch it
        from zoo.hub import save_pretrained
        other = zoo.create_model("vmoe_tiny_test", encoder={"dim": 16, "mlp_dim": 32})
        tmp = folder.parent / (folder.name + "_other")
        save_pretrained(other, tmp)
        shutil.copy(tmp / W, folder / W)
        drop_sha(folder)

    def missing_tensor(folder):
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(folder / W))
        tensors.pop(sorted(tensors)[0])
        save_file(tensors, str(folder / W))
        drop_sha(folder)

    def nan_weights(folder):
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(folder / W))
        key = sorted(tensors)[0]
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, str(folder / W))
        drop_sha(folder)

    for via in ("create", "load"):
        case(f"hub.{via}.flipped_8_bytes", "hub", f"{via}: 8 flipped bytes in model.safetensors",
             load(f"flip8{via}", flip(8), via), ChecksumError, (W, "expected", "sha256"))
        case(f"hub.{via}.flipped_header", "hub", f"{via}: flipped bytes in the safetensors header",
             load(f"fliph{via}", flip(4, 0.001), via), CorruptCheckpointError, (W,))
        case(f"hub.{via}.truncated", "hub", f"{via}: model.safetensors truncated to 60%",
             load(f"trunc{via}", truncate(0.6), via), CorruptCheckpointError, (W,))
        case(f"hub.{via}.truncated_no_sha", "hub", f"{via}: truncated, pretrained.json without sha256",
             load(f"truncns{via}", both(truncate(0.6), drop_sha), via), CorruptCheckpointError, (W, "truncated"))
        case(f"hub.{via}.empty_weights", "hub", f"{via}: empty model.safetensors",
             load(f"empty{via}", both(write_bytes(W, b""), drop_sha), via), CorruptCheckpointError, (W, "0 bytes"))
        case(f"hub.{via}.random_weights", "hub", f"{via}: random bytes as model.safetensors",
             load(f"rand{via}", both(write_bytes(W, os.urandom(4096)), drop_sha), via), CorruptCheckpointError,
             (W, "safetensors"))
        case(f"hub.{via}.missing_weights", "hub", f"{via}: no model.safetensors",
             load(f"nowts{via}", delete(W), via), WeightsNotFoundError, (W,))
        case(f"hub.{via}.wrong_sha", "hub", f"{via}: pretrained.json records another sha256",
             load(f"wsha{via}", config_edit_meta(lambda d: d.update(sha256="0" * 64)), via), ChecksumError,
             (W, "0" * 64))
        case(f"hub.{via}.foreign_weights", "hub", f"{via}: another width's weights",
             load(f"foreign{via}", foreign_weights, via), CheckpointMismatchError, ("shape",))
        case(f"hub.{via}.missing_tensor", "hub", f"{via}: a tensor missing from the weights",
             load(f"misst{via}", missing_tensor, via), CheckpointMismatchError, ("missing",))
        case(f"hub.{via}.nan_weights", "hub", f"{via}: NaN weights (sha256 consistent)",
             load(f"nan{via}", nan_weights, via), (PretrainedError, ValueError), ("NaN",))
        case(f"hub.{via}.config_bad_json", "hub", f"{via}: config.json not JSON",
             load(f"cjson{via}", write("config.json", "{not json"), via), CorruptCheckpointError, ("config.json",))
        case(f"hub.{via}.config_no_family", "hub", f"{via}: config.json without 'family'",
             load(f"cfam{via}", config_edit(lambda d: d.pop("family")), via), CheckpointMismatchError,
             ("config.json", "family"))
        case(f"hub.{via}.config_foreign_family", "hub", f"{via}: config.json says family limoe",
             load(f"cforeign{via}", config_edit(lambda d: d.update(family="limoe")), via),
             (CheckpointMismatchError, ConfigError), ("pub_cforeign",))
        case(f"hub.{via}.config_unknown_family", "hub", f"{via}: config.json family 'vmoee'",
             load(f"cunk{via}", config_edit(lambda d: d.update(family="vmoee")), via),
             (CheckpointMismatchError, ConfigError), ("vmoee",))
        case(f"hub.{via}.config_list", "hub", f"{via}: config.json holds a list",
             load(f"clist{via}", write("config.json", "[1, 2]"), via),
             (CorruptCheckpointError, CheckpointMismatchError),
             ("config.json",))
        case(f"hub.{via}.config_empty", "hub", f"{via}: empty config.json",
             load(f"cempty{via}", write("config.json", ""), via), CorruptCheckpointError, ("config.json",))
        case(f"hub.{via}.pretrained_json_bad", "hub", f"{via}: pretrained.json not JSON",
             load(f"pjson{via}", write("pretrained.json", "{oops"), via), CorruptCheckpointError, ("pretrained.json",))
    case("hub.create.config_unknown_key", "hub", "config.json with an unknown config key",
         load("ckey", config_edit(lambda d: d.update(num_clases=3))), ConfigError,
         ("num_clases",))
    case("hub.create.config_wrong_type", "hub", "config.json num_classes='ten'",
         load("ctype", config_edit(lambda d: d.update(num_classes="ten"))), ConfigError,
         ("num_classes", "'ten'"))
    case("hub.create.missing_config", "hub", "create_model('local-dir:') on a folder without config.json",
         load("nocfg", delete("config.json")), WeightsNotFoundError, ("config.json",))
    case("hub.missing_folder", "hub", "local-dir: a folder that does not exist",
         lambda ctx: zoo.create_model(f"local-dir:{ctx.path('nowhere')}"), WeightsNotFoundError, ("nowhere",))
    case("hub.file_not_folder", "hub", "local-dir: a file, not a folder",
         lambda ctx: zoo.create_model(f"local-dir:{ctx.published() / 'config.json'}"), WeightsNotFoundError,
         ("config.json", "folder"))
    case("hub.local_dir_empty", "hub", "create_model('local-dir:')", lambda ctx: zoo.create_model("local-dir:"),
         ConfigError, ("local-dir:PATH",))
    case("hub.hf_hub_malformed", "hub", "create_model('hf-hub:just-a-name/')",
         lambda ctx: zoo.create_model("hf-hub:/"), ConfigError, ("hf-hub:org/repo",))

    def offline_missing(ctx):
        old = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            zoo.create_model("hf-hub:zoo-sweep-nonexistent/repo", cache_dir=str(ctx.path("hfcache")))
        finally:
            if old is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = old

    case("hub.hf_hub_offline_missing", "hub", "hf-hub: repo not in the offline cache", offline_missing,
         WeightsNotFoundError, ("zoo-sweep-nonexistent/repo",))

    def load_path_missing(ctx):
        zoo.load_pretrained(zoo.create_model("vmoe_tiny_test"), ctx.path("nope.safetensors"))

    case("hub.load_missing_file", "hub", "load_pretrained(model, 'nope.safetensors')", load_path_missing,
         WeightsNotFoundError, ("nope.safetensors",))

    def load_wrong_sha_arg(ctx):
        zoo.load_pretrained(zoo.create_model("vmoe_tiny_test"), ctx.published() / W, sha256="ab" * 32)

    case("hub.load_sha_argument", "hub", "load_pretrained(..., sha256=<another hash>)", load_wrong_sha_arg,
         ChecksumError, ("ab" * 32, W))

    def pickle_plain(ctx):
        path = ctx.path("plain.bin")
        torch.save({"not": "a state dict"}, path)
        zoo.load_pretrained(zoo.create_model("vmoe_tiny_test"), path)

    case("hub.load_pickle_not_state_dict", "hub", "load_pretrained on a torch.save of a non-tensor dict", pickle_plain,
         CorruptCheckpointError, ("plain.bin",))

    def wrong_family_model(ctx):
        zoo.load_pretrained(zoo.create_model("limoe_tiny_test"), f"local-dir:{ctx.published()}")

    case("hub.load_into_other_family", "hub", "load V-MoE weights into a LIMoE model", wrong_family_model,
         CheckpointMismatchError, ("vmoe", "limoe"))

    def roundtrip(ctx):
        model = ctx.model("vmoe_tiny_test")
        loaded = zoo.create_model(f"local-dir:{ctx.published()}").eval()
        x = torch.randn(4, 3, 16, 16)
        assert torch.equal(model(x).logits, loaded(x).logits), "save_pretrained -> local-dir: changes the outputs"

    case("hub.roundtrip_exact", "hub", "save_pretrained then local-dir: gives bit-identical outputs", roundtrip)

    def save_over_file(ctx):
        target = ctx.path("a_file")
        target.write_text("x")
        zoo.save_pretrained(ctx.model("vmoe_tiny_test"), target)

    case("hub.save_into_file", "hub", "save_pretrained into a path that is a file", save_over_file,
         (ValueError, FileExistsError, NotADirectoryError, PretrainedError), ("a_file",))

    def save_non_zoo(ctx):
        zoo.save_pretrained(torch.nn.Linear(2, 2), ctx.path("lin"))

    case("hub.save_non_zoo_model", "hub", "save_pretrained(nn.Linear)", save_non_zoo, TypeError, ("Linear", "config"))


def config_edit_meta(fn):
    def damage(folder):
        path = folder / "pretrained.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        fn(data)
        path.write_text(json.dumps(data))
    return damage


# ---- converters ----
def _add_convert_cases() -> None:
    from zoo.convert.__main__ import main as convert_main

    def conv(*argv_fn):
        def run(ctx):
            argv = [a(ctx) if callable(a) else a for a in argv_fn]
            return convert_main(argv)
        return run

    out = lambda ctx: str(ctx.path("convert_out"))  # noqa: E731

    def hf_folder(name, config=None, weights=None):
        def make(ctx):
            folder = ctx.path(name)
            folder.mkdir(exist_ok=True)
            if config is not None:
                (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
            if weights is not None:
                weights(folder)
            return str(folder)
        return make

    llama = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 32, "rms_norm_eps": 1e-5,
             "max_position_embeddings": 32, "hidden_act": "silu", "rope_theta": 10000.0, "tie_word_embeddings": False}

    def llama_weights(drop: Optional[str] = None, wrong_shape: bool = False, truncate: bool = False):
        def write(folder):
            from safetensors.torch import save_file
            d, v, h = 16, 64, 32
            t = {"model.embed_tokens.weight": torch.randn(v, d), "model.norm.weight": torch.ones(d),
                 "lm_head.weight": torch.randn(v, d)}
            p = "model.layers.0."
            for n, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)), ("self_attn.v_proj", (d, d)),
                             ("self_attn.o_proj", (d, d)), ("mlp.gate_proj", (h, d)), ("mlp.up_proj", (h, d)),
                             ("mlp.down_proj", (d, h))):
                t[f"{p}{n}.weight"] = torch.randn(*shape)
            t[f"{p}input_layernorm.weight"] = torch.ones(d)
            t[f"{p}post_attention_layernorm.weight"] = torch.ones(d)
            if drop:
                t.pop(drop)
            if wrong_shape:
                t[f"{p}mlp.up_proj.weight"] = torch.randn(h + 1, d)
            save_file(t, str(folder / "model.safetensors"))
            if truncate:
                data = (folder / "model.safetensors").read_bytes()
                (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        return write

    E = Exception  # the converters' own error types differ; the message and the raising frame are what count
    case("convert.no_subcommand", "convert", "python -m zoo.convert (no subcommand)", conv(), SystemExit,
         ("vmoe", "hf-lm"))
    case("convert.unknown_subcommand", "convert", "python -m zoo.convert bogus", conv("bogus"), SystemExit, ("bogus",))
    case("convert.vmoe_missing_out", "convert", "vmoe without --out", conv("vmoe", "--checkpoint", "x"), SystemExit,
         ("--out",))
    case("convert.hf_bad_dtype", "convert", "hf-lm --dtype float8", conv("hf-lm", "--checkpoint", "x", "--out", "y",
         "--dtype", "float8"), SystemExit, ("float8",))
    case("convert.vmoe_missing_checkpoint", "convert", "vmoe --checkpoint of a prefix that does not exist",
         conv("vmoe", "--checkpoint", lambda ctx: str(ctx.path("nope_ckpt")), "--out", out), E, ("nope_ckpt",))

    def garbage_index(ctx):
        prefix = ctx.path("garbage_ckpt")
        Path(str(prefix) + ".index").write_bytes(os.urandom(256))
        return str(prefix)

    case("convert.vmoe_garbage_index", "convert", "vmoe --checkpoint whose .index is random bytes",
         conv("vmoe", "--checkpoint", garbage_index, "--out", out), E, ("garbage_ckpt",))
    case("convert.vmoe_unknown_preset", "convert", "vmoe --preset bogus",
         conv("vmoe", "--checkpoint", garbage_index, "--out", out, "--preset", "vmoe_bogus"), E, ("vmoe_bogus",))
    case("convert.vmoe_config_missing", "convert", "vmoe --config of a file that does not exist",
         conv("vmoe", "--checkpoint", garbage_index, "--out", out, "--config", lambda ctx: str(ctx.path("no.json"))), E,
         ("no.json",))

    def bad_json(ctx):
        path = ctx.path("bad_config.json")
        path.write_text("{broken")
        return str(path)

    case("convert.vmoe_config_bad_json", "convert", "vmoe --config of a file that is not JSON/YAML",
         conv("vmoe", "--checkpoint", garbage_index, "--out", out, "--config", bad_json), E, ("bad_config.json",))
    case("convert.hf_missing_folder", "convert", "hf-lm --checkpoint of a missing folder",
         conv("hf-lm", "--checkpoint", lambda ctx: str(ctx.path("no_hf")), "--out", out), E, ("no_hf",))
    case("convert.hf_no_config", "convert", "hf-lm folder without config.json",
         conv("hf-lm", "--checkpoint", hf_folder("hf_nocfg", None, llama_weights()), "--out", out), E,
         ("config.json",))
    case("convert.hf_bad_json", "convert", "hf-lm config.json not JSON",
         conv("hf-lm", "--checkpoint", hf_folder("hf_badjson", "{nope", llama_weights()), "--out", out), E,
         ("config.json",))
    case("convert.hf_unknown_model_type", "convert", "hf-lm model_type 'gpt9'",
         conv("hf-lm", "--checkpoint", hf_folder("hf_gpt9", {**llama, "model_type": "gpt9"}, llama_weights()), "--out",
              out), E, ("gpt9", "supported"))
    case("convert.hf_no_model_type", "convert", "hf-lm config.json without model_type",
         conv("hf-lm", "--checkpoint", hf_folder("hf_notype", {k: v for k, v in llama.items() if k != "model_type"},
                                                 llama_weights()), "--out", out), E, ("model_type",))
    case("convert.hf_missing_key", "convert", "hf-lm llama config.json without hidden_size",
         conv("hf-lm", "--checkpoint", hf_folder("hf_nohidden", {k: v for k, v in llama.items() if k != "hidden_size"},
                                                 llama_weights()), "--out", out), E, ("hidden_size",))
    case("convert.hf_no_weights", "convert", "hf-lm folder without weights",
         conv("hf-lm", "--checkpoint", hf_folder("hf_nowts", llama), "--out", out), E, ("model.safetensors",))
    case("convert.hf_missing_tensor", "convert", "hf-lm weights lacking a tensor the config implies",
         conv("hf-lm", "--checkpoint", hf_folder("hf_misst", llama, llama_weights(drop="model.norm.weight")), "--out",
              out), E, ("model.norm.weight",))
    case("convert.hf_wrong_shape", "convert", "hf-lm weights with a tensor of another shape than config.json says",
         conv("hf-lm", "--checkpoint", hf_folder("hf_shape", llama, llama_weights(wrong_shape=True)), "--out", out), E,
         ("(65, 16)", "config.json"))
    case("convert.hf_truncated", "convert", "hf-lm truncated model.safetensors",
         conv("hf-lm", "--checkpoint", hf_folder("hf_trunc", llama, llama_weights(truncate=True)), "--out", out), E,
         ("model.safetensors",))
    case("convert.hf_rope_scaling", "convert", "hf-lm with unsupported rope_scaling",
         conv("hf-lm", "--checkpoint", hf_folder("hf_rope", {**llama, "rope_scaling": {"type": "yarn", "factor": 2}},
                                                 llama_weights()), "--out", out), E, ("yarn",))

    def hf_ok(ctx):
        import zoo
        folder = hf_folder("hf_ok", llama, llama_weights())(ctx)
        target = ctx.path("hf_ok_out")
        assert convert_main(["hf-lm", "--checkpoint", folder, "--out", str(target)]) == 0
        model = zoo.create_model(f"local-dir:{target}")
        assert model.config.vocab_size == 64

    case("convert.hf_ok", "convert", "hf-lm on a good tiny llama folder converts and loads", hf_ok)


# ---- numerics ----
def _add_numerics_cases() -> None:
    import zoo

    def nan_weight_forward(ctx):
        model = zoo.create_model("vmoe_tiny_test").eval()
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        logits = model(torch.randn(2, 3, 16, 16)).logits
        assert not _finite(logits), "NaN weights gave finite logits (the NaN was hidden)"

    case("numerics.nan_weights_visible", "numerics", "NaN weights give non-finite logits (not hidden)",
         nan_weight_forward)

    def big_inputs(ctx):
        model = ctx.model("vmoe_tiny_test")
        logits = model(torch.randn(2, 3, 16, 16) * 1e4).logits
        assert _finite(logits), "finite (large) inputs gave non-finite logits"

    case("numerics.large_inputs_finite", "numerics", "inputs scaled by 1e4 still give finite logits", big_inputs)

    def bf16(ctx):
        model = zoo.create_model("vmoe_tiny_test").eval().to(torch.bfloat16)
        logits = model(torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)).logits
        ref = ctx.model("vmoe_tiny_test")
        assert logits.dtype == torch.bfloat16 and _finite(logits)
        del ref

    case("numerics.bf16_model", "numerics", "a bf16 model on bf16 inputs runs and stays finite", bf16)

    def router_saturation(ctx):
        layer = _moe_layer().train(True)
        with torch.no_grad():
            layer.router.proj.weight.mul_(1e6)
        y = layer(torch.randn(2, 5, 8))
        assert _finite(y) and _finite(layer.aux.loss), "saturated router logits gave non-finite output / loss"

    case("numerics.router_saturation", "numerics", "router logits of 1e6 scale: finite output and aux loss",
         router_saturation)

    def z_loss_big(ctx):
        layer = _moe_layer(z_loss_weight=1.0).train(True)
        with torch.no_grad():
            layer.router.proj.weight.mul_(1e3)
        layer(torch.randn(2, 5, 8))
        assert _finite(layer.aux.loss), f"aux loss {layer.aux.loss}"

    case("numerics.z_loss_large_logits", "numerics", "z-loss with large router logits stays finite", z_loss_big)

    def lm_loss_all_ignored(ctx):
        model = ctx.model("decoder_tiny_moe")
        out = model(torch.randint(0, 512, (2, 8)), attention_mask=torch.ones(2, 8, dtype=torch.long))
        assert _finite(out.logits)

    case("numerics.decoder_finite", "numerics", "decoder logits finite on a plain batch", lm_loss_all_ignored)


# ---- determinism ----
def _add_determinism_cases() -> None:
    import zoo

    def same_bits(fn):
        def run(ctx):
            a, b = fn(ctx), fn(ctx)
            assert torch.equal(a, b), "two identical calls gave different bits"
        return run

    case("determinism.vmoe_eval", "determinism", "V-MoE eval twice on the same input: same bits",
         same_bits(lambda ctx: ctx.model("vmoe_tiny_test")(torch.ones(4, 3, 16, 16)).logits))
    case("determinism.limoe_eval", "determinism", "LIMoE eval twice: same bits",
         same_bits(lambda ctx: ctx.model("limoe_tiny_test").encode_text(torch.arange(1, 17).repeat(2, 1))))
    case("determinism.generate_greedy", "determinism", "greedy generate twice: same tokens",
         same_bits(lambda ctx: ctx.model("decoder_tiny_moe").generate(torch.arange(1, 9)[None], max_new_tokens=8)))

    def sampled(ctx):
        torch.manual_seed(5)
        return ctx.model("decoder_tiny_moe").generate(torch.arange(1, 9)[None], max_new_tokens=8, do_sample=True,
                                                      top_k=20)

    case("determinism.generate_sampled_seeded", "determinism", "sampled generate with the same seed: same tokens",
         same_bits(sampled))

    def created(ctx):
        torch.manual_seed(11)
        return torch.cat([p.flatten() for p in zoo.create_model("vmoe_tiny_test").parameters()])

    case("determinism.create_model_seeded", "determinism", "create_model with the same seed: same weights",
         same_bits(created))

    def train_forward(ctx):
        torch.manual_seed(3)
        layer = _moe_layer().train(True)
        torch.manual_seed(4)
        return layer(torch.randn(4, 6, 8))

    case("determinism.moe_train_seeded", "determinism", "MoE layer in training (router noise), same seed: same bits",
         same_bits(train_forward))

    def batch_invariance(ctx):
        model = ctx.model("decoder_tiny_moe")
        ids = torch.randint(0, 512, (3, 8), generator=torch.Generator().manual_seed(0))
        full = model(ids).logits
        for i in range(3):
            torch.testing.assert_close(model(ids[i:i + 1]).logits, full[i:i + 1], atol=1e-5, rtol=1e-5)

    case("determinism.decoder_batch_invariant", "determinism", "a causal decoder row does not depend on its batch",
         batch_invariance)

    def eval_mode_deterministic(ctx):
        model = zoo.create_model("vmoe_tiny_test", encoder={"dropout": 0.5}).eval()
        x = torch.randn(2, 3, 16, 16)
        assert torch.equal(model(x).logits, model(x).logits), "eval with dropout configured is not deterministic"

    case("determinism.eval_ignores_dropout", "determinism", "eval mode with dropout 0.5 configured: same bits",
         eval_mode_deterministic)


# ---- CLI (subprocesses; few and cheap) ----
def _add_cli_cases() -> None:
    def cli(script: str, args: Callable[[Context], list[str]], mentions: Sequence[str], timeout: int = 240):
        def run(ctx):
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, str(REPO / script), *args(ctx)], cwd=ctx.tmp, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            err = proc.stderr.strip()
            if proc.returncode < 0:
                raise CliCrash(f"killed by signal {-proc.returncode}: {err[-300:]}")
            if proc.returncode == 0:
                raise CliNoError(f"exit 0: {proc.stdout.strip()[-200:]}")
            if "Traceback (most recent call last)" in err:
                raise CliTraceback(f"exit {proc.returncode} with a traceback: ...{err[-400:]}")
            last = err.splitlines()[-1] if err else ""
            missing = [m for m in mentions if m.lower() not in err.lower()]
            if missing:
                raise CliUnclear(f"exit {proc.returncode}: {last[:300]} [lacks {missing}]")
            raise CliClear(f"exit {proc.returncode}: {last[:300]}")
        return run

    def yaml_file(name: str, text: str):
        def make(ctx):
            path = ctx.path(name)
            path.write_text(text)
            return str(path)
        return make

    digits = str(REPO / "configs" / "train" / "vmoe_digits.yaml")
    base = ["--trainer.max_steps=2", "--test=false", "--trainer.enable_progress_bar=false"]

    def root(ctx):
        return f"--trainer.default_root_dir={ctx.path('runs_root')}"

    case("cli.train_bad_yaml", "cli", "train.py --config of a file with a YAML syntax error",
         cli("train.py", lambda ctx: ["--config", yaml_file("bad.yaml", "model: [unclosed\n")(ctx)], ("bad.yaml",)),
         CliClear, cli=True)
    case("cli.train_empty_yaml", "cli", "train.py --config of an empty file",
         cli("train.py", lambda ctx: ["--config", yaml_file("empty.yaml", "")(ctx)], ("empty.yaml",)), CliClear,
         cli=True)
    case("cli.train_missing_config", "cli", "train.py --config of a missing file",
         cli("train.py", lambda ctx: ["--config", str(ctx.path("missing.yaml"))], ("missing.yaml",)), CliClear,
         cli=True)
    case("cli.train_unknown_key", "cli", "train.py --model.lrr=0.1 (typo)",
         cli("train.py", lambda ctx: ["--config", digits, "--model.lrr=0.1", root(ctx), *base], ("lrr",)), CliClear,
         cli=True)
    case("cli.train_negative_lr", "cli", "train.py --model.lr=-1",
         cli("train.py", lambda ctx: ["--config", digits, "--model.lr=-1", root(ctx), *base], ("lr", "-1")), CliClear,
         cli=True)
    case("cli.train_batch_0", "cli", "train.py --data.init_args.batch_size=0",
         cli("train.py", lambda ctx: ["--config", digits, "--data.init_args.batch_size=0", root(ctx), *base],
             ("batch_size", "0")), CliClear, cli=True)
    case("cli.train_unknown_model", "cli", "train.py --model.model=vmoe_tiny_digts (typo)",
         cli("train.py", lambda ctx: ["--config", digits, "--model.model=vmoe_tiny_digts", root(ctx), *base],
             ("vmoe_tiny_digts",)), CliClear, cli=True)
    case("cli.train_missing_data_dir", "cli", "ImageFolder recipe with a missing data root",
         cli("train.py", lambda ctx: ["--config", str(REPO / "configs" / "train" / "vmoe_imagefolder.yaml"),
                                      f"--data.init_args.root={ctx.path('no_images')}", root(ctx), *base],
             ("no_images",)), CliClear, cli=True)
    case("cli.eval_missing_checkpoint", "cli", "eval.py --checkpoint of a missing file",
         cli("eval.py", lambda ctx: ["--checkpoint", str(ctx.path("none.ckpt"))], ("none.ckpt",)), CliClear, cli=True)

    def random_ckpt(ctx):
        path = ctx.path("random.ckpt")
        path.write_bytes(os.urandom(1000))
        return ["--checkpoint", str(path)]

    case("cli.eval_random_checkpoint", "cli", "eval.py --checkpoint of random bytes",
         cli("eval.py", random_ckpt, ("random.ckpt",)), CliClear, cli=True)
    case("cli.eval_unknown_model", "cli", "eval.py --model bogus --pretrained",
         cli("eval.py", lambda ctx: ["--model", "vmoe_bogus", "--pretrained"], ("vmoe_bogus",)), CliClear, cli=True)
    case("cli.eval_name_tag", "cli", "eval.py --model vmoe_tiny_digits.digits --pretrained (name.tag)",
         cli("eval.py", lambda ctx: ["--model", "vmoe_tiny_digits.digits", "--pretrained", "--no-plots",
                                     "--no-progress-bar"], ()), CliNoError, cli=True)
    case("cli.train_diverging_lr", "cli", "train.py --model.lr=1e6 without clipping: NaN loss stops the run",
         cli("train.py", lambda ctx: ["--config", digits, "--model.lr=1e6", "--trainer.gradient_clip_val=null",
                                      "--trainer.max_steps=40", "--test=false", root(ctx),
                                      "--trainer.enable_progress_bar=false"], ("non-finite",), timeout=400),
         CliClear, cli=True)


class CliClear(Exception):
    """A CLI run failed with a one-line error naming what the case requires (raised by the case to report it)."""


class CliUnclear(Exception):
    """A CLI run failed without a traceback, but its message lacks what the case requires."""


class CliTraceback(Exception):
    """A CLI run failed with a Python traceback."""


class CliCrash(Exception):
    """A CLI process was killed by a signal."""


class CliNoError(Exception):
    """A CLI run exited 0."""


def classify_cli(case: Case, ctx: Context) -> Result:
    """CLI cases report their outcome through the exception they raise (the subprocess decides)."""
    start = time.perf_counter()
    try:
        case.run(ctx)
        outcome, detail = "crash", "the case returned without reporting"
    except CliClear as err:
        outcome, detail = ("clear" if case.error is CliClear else "silent"), str(err)
    except CliNoError as err:
        outcome, detail = ("ok" if case.error is CliNoError else "silent"), str(err)
    except CliUnclear as err:
        outcome, detail = "unclear", str(err)
    except CliTraceback as err:
        outcome, detail = "raw", str(err)
    except CliCrash as err:
        outcome, detail = "crash", str(err)
    except subprocess.TimeoutExpired as err:
        outcome, detail = "crash", f"timed out after {err.timeout} s"
    return Result(case.id, case.group, case.what, outcome, detail, time.perf_counter() - start)


def build_cases(cli: bool = True) -> list[Case]:
    CASES.clear()
    _add_moe_config_cases()
    _add_moe_layer_cases()
    _add_model_input_cases()
    _add_factory_cases()
    _add_hub_cases()
    _add_convert_cases()
    _add_numerics_cases()
    _add_determinism_cases()
    if cli:
        _add_cli_cases()
    return list(CASES)


def run_cases(cases: Sequence[Case], ctx: Optional[Context] = None) -> list[Result]:
    own_ctx = ctx is None
    ctx = ctx or Context()
    try:
        results = []
        for c in cases:
            torch.manual_seed(0)
            results.append(classify_cli(c, ctx) if c.cli else classify(c, ctx))
        return results
    finally:
        if own_ctx:
            ctx.close()


def counts(results: Sequence[Result]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for r in results:
        row = table.setdefault(r.group, {o: 0 for o in OUTCOMES})
        row[r.outcome] += 1
    table["total"] = {o: sum(row[o] for g, row in table.items() if g != "total") for o in OUTCOMES}
    return table


def versions() -> dict[str, str]:
    import zoo
    out = {"python": platform.python_version(), "torch": torch.__version__, "zoo": zoo.__version__}
    for name in ("lightning", "numpy", "safetensors", "huggingface_hub"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip()
    except OSError:
        pass
    return out


def write_reports(results: Sequence[Result], out: Path, command: str, before: Optional[dict] = None) -> None:
    table = counts(results)
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command, "versions": versions(),
            "counts": table, "cases": [r.__dict__ for r in results]}
    if before is not None:
        info["before"] = before
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    lines = [
        "# Reliability sweep (issue 17)",
        "",
        f"`{command}` on {info['date']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
        "Generated by `benchmarks/reliability_sweep.py` (outcome classes in its docstring: clear / ok = pass; "
        "unclear = an error whose message lacks the bad value or the fix; raw = a library's exception, not a zoo "
        "check; silent = no error where one was due, or a wrong result; crash).",
        "",
        "## Counts",
        "",
        "| Group | " + " | ".join(OUTCOMES) + " | cases |",
        "|---|" + "---|" * (len(OUTCOMES) + 1),
    ]
    for group, row in table.items():
        name = f"**{group}**" if group == "total" else group
        lines.append(f"| {name} | " + " | ".join(str(row[o]) for o in OUTCOMES) + f" | {sum(row.values())} |")
    if before is not None:
        lines += ["", "Before the fixes of this sweep (same cases, first run): "
                  + ", ".join(f"{o} {before.get(o, 0)}" for o in OUTCOMES) + "."]
    lines += ["", "## Cases", "", "| # | Case | Outcome | Detail | s |", "|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        detail = r.detail.replace("|", "\\|").replace("\n", " ")[:240]
        what = r.what.replace("|", "\\|")
        lines.append(f"| {i} | `{r.id}`: {what} | {r.outcome} | {detail} | {r.seconds:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-cli", action="store_true", help="skip the subprocess (train.py / eval.py) cases")
    parser.add_argument("--only", help="run only cases whose id or group starts with this")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reliability_sweep"),
                        help="report path without suffix (.json and .md are written); '' = no report")
    parser.add_argument("--before", help="a previous sweep JSON whose total counts are recorded as 'before'")
    parser.add_argument("--print", action="store_true", help="print every case, not only the failing ones")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = build_cases(cli=not args.no_cli)
    if args.only:
        cases = [c for c in cases if c.id.startswith(args.only) or c.group.startswith(args.only)]
    results = run_cases(cases)
    for r in results:
        if args.print or r.outcome not in ("clear", "ok"):
            print(f"{r.outcome:8s} {r.id}: {r.detail[:200]}")
    table = counts(results)
    print(json.dumps(table["total"]), f"({len(results)} cases)")
    if args.out:
        before = None
        if args.before:
            before = json.loads(Path(args.before).read_text())["counts"]["total"]
        command = "python benchmarks/reliability_sweep.py" + (" " + " ".join(argv if argv is not None else
                                                                              sys.argv[1:])).rstrip()
        write_reports(results, Path(args.out), command, before)
    return 1 if any(table["total"][o] for o in BAD_OUTCOMES) else 0


if __name__ == "__main__":
    sys.exit(main())
