"""Named model presets: ``list_models()`` and ``create_model(name, **overrides)``.

A preset is a data file, ``configs/models/<family>/<name>.yaml``:

    family: vmoe            # which registered family builds it
    config: {...}           # the family's typed config (exactly what a hub config.json holds)

Families register their config class and model class with :func:`register_family`; nothing is parsed
out of preset names.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from torch import nn

from zoo.config import ConfigError, close_matches, from_dict, merge


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, config_cls: type, build: Callable[[Any], nn.Module]) -> None:
    _FAMILIES[name] = Family(name, config_cls, build)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def configs_dir() -> Path:
    """``configs/`` of the project (``ZOO_CONFIGS`` overrides it)."""
    env = os.environ.get("ZOO_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


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
    files = _preset_files(str(configs_dir()))
    if name not in files:
        hint = close_matches(name, files)
        msg = f"unknown model {name!r}"
        msg += f"; did you mean {', '.join(repr(h) for h in hint)}?" if hint else "."
        raise ConfigError(msg + " See zoo.list_models() for all presets.")
    with open(files[name]) as f:
        preset = yaml.safe_load(f) or {}
    unknown = set(preset) - {"family", "config", "pretrained", "description"}
    if unknown or "family" not in preset:
        raise ConfigError(f"preset file {files[name]} must have keys family/config[/pretrained/description], "
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


def family_of(config: Any) -> str:
    """Reverse lookup: the registered family whose config class ``config`` is (used to save models)."""
    for fam in _FAMILIES.values():
        if type(config) is fam.config_cls:
            return fam.name
    raise ConfigError(f"no registered model family uses config class {type(config).__name__}; "
                      f"known: {sorted(f'{f.name} ({f.config_cls.__name__})' for f in _FAMILIES.values())}")


def create_model(name: str, pretrained: Any = None, **overrides: Any) -> nn.Module:
    """Build preset ``name``; keyword overrides change its config, e.g.
    ``create_model("vmoe_s32", num_classes=10, encoder={"moe": {"num_experts": 4}})`` or
    ``create_model("vmoe_s32", **{"encoder.moe.top_k": 1})``. Unknown names or keys raise a
    :class:`ConfigError` that lists close matches.

    ``pretrained`` (see :mod:`zoo.hub`): ``True`` = the preset's default tag, ``"tag"`` = a tag of the preset's
    ``pretrained:`` section (from ``weights/`` if present, else the Hugging Face hub), ``"hf-hub:org/repo"`` or
    ``"local-dir:PATH"`` = weights from there. ``name`` itself may be ``"hf-hub:org/repo"`` or
    ``"local-dir:PATH"``: the config comes from that folder's ``config.json`` and its weights are loaded unless
    ``pretrained=False``.
    """
    if pretrained not in (None, False) or name.startswith(("hf-hub:", "local-dir:")):
        from zoo.hub import create_pretrained

        return create_pretrained(name, pretrained, **overrides)
    preset = load_preset(name)
    return build_model(preset["family"], model_config(name, **overrides))
