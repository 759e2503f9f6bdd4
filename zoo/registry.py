"""The registry is data: model families, named presets and their pretrained tags. It builds nothing from a name
(that is :mod:`zoo.factory`) and reads no weights (that is :mod:`zoo.hub`).

A preset is a data file, ``configs/models/<family>/<name>.yaml``:

    family: vmoe            # which registered family builds it
    config: {...}           # the family's typed config (exactly what a hub config.json holds)
    pretrained: {tag: {...}}  # optional: published weights of this preset (see TAG_KEYS)

Families register what differs between them with :func:`register_family` (config class, model class, the checkpoint
filter that adapts weights to the model, model-card fields, input size, predictions for the export check): shared
code asks the family, it never tests a family's name. Nothing is parsed out of preset names.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml
from torch import Tensor, nn

from zoo.config import ConfigError, close_matches, from_dict, merge

# checkpoint_filter(state_dict, model) -> (state_dict adapted to the model, notes saying what was adapted)
CheckpointFilter = Callable[[dict[str, Tensor], nn.Module], tuple[dict[str, Tensor], list[str]]]


@dataclass(frozen=True)
class CardInfo:
    """What a family's model card says beyond the generic settings: the hub ``pipeline_tag``, usage lines after
    the model is created, and a BibTeX citation."""

    pipeline_tag: Optional[str] = None
    usage: tuple[str, ...] = ()
    citation: Optional[str] = None


@dataclass(frozen=True)
class Family:
    """A model family. ``checkpoint_filter`` adapts a checkpoint to a model of another geometry (timm's
    ``checkpoint_filter_fn``: which tensors are image grids, how many prefix tokens they have, what a text length
    change means), None = shapes must match. ``input_size(config)`` -> ``[C, H, W]`` recorded with published
    weights; ``predict(model, images)`` -> class ids ``[B]`` for the export's prediction check (None: the family
    has no single-input classifier, the check is skipped)."""

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    checkpoint_filter: Optional[CheckpointFilter] = None
    card: CardInfo = field(default_factory=CardInfo)
    input_size: Optional[Callable[[Any], list[int]]] = None
    predict: Optional[Callable[[nn.Module, Tensor], Tensor]] = None


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, config_cls: type, build: Callable[[Any], nn.Module], **hooks: Any) -> None:
    """Register a family; ``hooks`` are the optional :class:`Family` fields (``checkpoint_filter``, ``card``,
    ``input_size``, ``predict``)."""
    _FAMILIES[name] = Family(name, config_cls, build, **hooks)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def family_of(config: Any) -> str:
    """Reverse lookup: the registered family whose config class ``config`` is (used to save models)."""
    for fam in _FAMILIES.values():
        if type(config) is fam.config_cls:
            return fam.name
    raise ConfigError(f"no registered model family uses config class {type(config).__name__}; "
                      f"known: {sorted(f'{f.name} ({f.config_cls.__name__})' for f in _FAMILIES.values())}")


def family_of_model(model: nn.Module) -> Optional[Family]:
    """The family of a zoo model (None for a model without a registered ``.config``)."""
    config = getattr(model, "config", None)
    for fam in _FAMILIES.values():
        if type(config) is fam.config_cls:
            return fam
    return None


# ------------------------------------------------------------------------------------------------ data roots
_PACKAGE = Path(__file__).resolve().parent


def _data_root(env: str, packaged: str, checkout: str) -> Path:
    """``$env`` if set; else the copy installed with the package (``zoo/<packaged>`` in a wheel, mapped from the
    checkout's folder by pyproject.toml: one source, no second copy in the tree); else the checkout's folder."""
    value = os.environ.get(env)
    if value:
        return Path(value)
    installed = _PACKAGE / packaged
    return installed if installed.is_dir() else _PACKAGE.parent / checkout


def configs_dir() -> Path:
    """``configs/`` of the project (``ZOO_CONFIGS`` overrides it; an installed wheel carries it as ``zoo/_configs``)."""
    return _data_root("ZOO_CONFIGS", "_configs", "configs")


def weights_dir() -> Path:
    """The project's ``weights/`` folder (``ZOO_WEIGHTS`` overrides it; a wheel carries it as ``zoo/_weights``)."""
    return _data_root("ZOO_WEIGHTS", "_weights", "weights")


# --------------------------------------------------------------------------------------------------- presets
@lru_cache(maxsize=None)
def _preset_files(root: str) -> dict[str, Path]:
    base = Path(root) / "models"
    if not base.is_dir():
        raise FileNotFoundError(f"model presets folder {base} not found; set ZOO_CONFIGS to the project's configs/")
    files = {}
    for path in sorted(base.glob("*/*.yaml")):
        if path.stem in files:
            raise ConfigError(f"preset name {path.stem!r} is defined twice: {files[path.stem]} and {path}")
        files[path.stem] = path
    return files


def preset_file(name: str) -> Path:
    """The YAML file of preset ``name`` (unknown names raise a :class:`ConfigError` with close matches)."""
    files = _preset_files(str(configs_dir()))
    if name not in files:
        hint = close_matches(name, files)
        msg = f"unknown model {name!r}"
        msg += f"; did you mean {', '.join(repr(h) for h in hint)}?" if hint else "."
        raise ConfigError(msg + " See zoo.list_models() for all presets.")
    return files[name]


def list_models(pattern: Optional[str] = None, family: Optional[str] = None) -> list[str]:
    """Sorted preset names, optionally filtered by a glob ``pattern`` (``"vmoe_b*"``) and ``family``."""
    names = []
    for name, path in _preset_files(str(configs_dir())).items():
        if pattern and not fnmatch.fnmatch(name, pattern):
            continue
        if family and path.parent.name != family:
            continue
        names.append(name)
    return sorted(names)


def load_preset(name: str) -> dict[str, Any]:
    """The raw preset file of ``name`` (``family``, ``config`` and optional ``pretrained``)."""
    path = preset_file(name)
    with open(path) as f:
        preset = yaml.safe_load(f) or {}
    unknown = set(preset) - {"family", "config", "pretrained", "description"}
    if unknown or "family" not in preset:
        raise ConfigError(f"preset file {path} must have keys family/config[/pretrained/description], "
                          f"got {sorted(preset)}")
    return preset


def model_config(name: str, **overrides: Any) -> Any:
    """The typed config of preset ``name`` with ``overrides`` (nested dicts or dotted keys) applied."""
    preset = load_preset(name)
    family = get_family(preset["family"])
    data = merge(preset.get("config") or {}, overrides)
    return from_dict(family.config_cls, data, where=f"{name} config")


def build_model(family: str, config: Any) -> nn.Module:
    fam = get_family(family)
    if isinstance(config, dict):
        config = from_dict(fam.config_cls, config, where=f"{family} config")
    return fam.build(config)


# ----------------------------------------------------------------------------------------------- preset tags
TAG_KEYS = {"hf_hub_id", "revision", "file", "sha256", "size", "local_dir", "license", "input", "metrics",
            "recipe", "overrides", "data", "check", "weights_dtype", "default", "description"}


def pretrained_tags(name: str) -> dict[str, dict[str, Any]]:
    """The ``pretrained:`` mapping of preset ``name`` (tag -> entry)."""
    tags = load_preset(name).get("pretrained") or {}
    if not isinstance(tags, Mapping):
        raise ConfigError(f"preset {name!r}: 'pretrained' must map tags to entries, got {type(tags).__name__}")
    for tag, entry in tags.items():
        unknown = set(entry or {}) - TAG_KEYS
        if unknown:
            raise ConfigError(f"preset {name!r} pretrained tag {tag!r}: unknown key(s) {sorted(unknown)}; "
                              f"valid keys: {sorted(TAG_KEYS)}")
    return {str(k): dict(v or {}) for k, v in tags.items()}


def default_tag(name: str) -> str:
    tags = pretrained_tags(name)
    if not tags:
        raise ConfigError(f"preset {name!r} has no pretrained weights (no 'pretrained:' section); presets with "
                          f"weights: {list_pretrained()}")
    defaults = [t for t, e in tags.items() if e.get("default")]
    if len(defaults) > 1:
        raise ConfigError(f"preset {name!r} marks several tags as default: {defaults}")
    if defaults:
        return defaults[0]
    if len(tags) == 1:
        return next(iter(tags))
    raise ConfigError(f"preset {name!r} has tags {sorted(tags)} and none is 'default: true'; pass pretrained='TAG'")


def list_pretrained(pattern: Optional[str] = None) -> list[str]:
    """``["vmoe_tiny_digits.digits", ...]``: every preset tag with weights (each name is accepted by
    ``zoo.create_model``)."""
    out = []
    for name in list_models(pattern):
        for tag in pretrained_tags(name):
            out.append(f"{name}.{tag}")
    return out
