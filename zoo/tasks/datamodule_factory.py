"""Datamodules rebuilt from what a checkpoint or a published tag recorded (class path + init args), with the
command line's changes: the one place ``eval.py``, few-shot evaluation and ``publish`` build them."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Optional

import yaml

from zoo.data.base import init_parameters
from zoo.tasks.base import DATAMODULE_KEY


def import_datamodule_class(path: str) -> type:
    """A datamodule class from a short name (``zoo.data.IMAGE_CLASSIFICATION_DATAMODULES``), a ``zoo.data`` name
    or a full class path."""
    from zoo.data import IMAGE_CLASSIFICATION_DATAMODULES

    if path in IMAGE_CLASSIFICATION_DATAMODULES:
        return IMAGE_CLASSIFICATION_DATAMODULES[path]
    module, _, name = path.rpartition(".")
    if not module:
        import zoo.data

        if hasattr(zoo.data, name):
            return getattr(zoo.data, name)
        raise ValueError(f"unknown datamodule {path!r}; use one of {sorted(IMAGE_CLASSIFICATION_DATAMODULES)} "
                         "or a class path such as zoo.data.MNISTDataModule")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import datamodule {path!r}: {err}") from err


def saved_datamodule(checkpoint: dict[str, Any]) -> tuple[Optional[str], dict[str, Any]]:
    """``(class path, init args)`` of the datamodule a checkpoint was trained with (None if not recorded)."""
    info = checkpoint.get(DATAMODULE_KEY)
    if info:
        return info.get("class_path"), dict(info.get("init_args") or {})
    hp = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    cls = hp.pop("_class_path", None)
    return cls, {k: v for k, v in hp.items() if not k.startswith("_")}


def build_datamodule(recorded_class: Optional[str], recorded_args: Optional[Mapping[str, Any]] = None,
                     data: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> Any:
    """The recorded datamodule (or ``data``, another one), ``overrides`` applied. Recorded arguments the class no
    longer takes are dropped (they came from another zoo version) and are not carried to another class; an
    override the class does not take is an error naming what it takes."""
    cls_path = data or recorded_class
    if not cls_path:
        raise ValueError("the checkpoint does not record its datamodule; pass --data (e.g. --data digits)")
    cls = import_datamodule_class(cls_path)
    same = recorded_class is not None and import_datamodule_class(recorded_class) is cls
    params = init_parameters(cls)  # the loader arguments too, which a datamodule passes on as **loader
    args = {k: v for k, v in dict(recorded_args or {}).items() if k in params} if same else {}
    args.update(overrides or {})
    unknown = [k for k in args if k not in params]
    if unknown:
        raise ValueError(f"{cls.__name__} has no argument(s) {unknown}; it takes {sorted(set(params) - {'self'})}")
    return cls(**args)


def datamodule_of_checkpoint(checkpoint: dict[str, Any], data: Optional[str] = None,
                             overrides: Optional[Mapping[str, Any]] = None) -> Any:
    """The checkpoint's datamodule (or ``data``), with ``overrides`` applied to its init args."""
    return build_datamodule(*saved_datamodule(checkpoint), data=data, overrides=overrides)


def parse_data_args(items: list[str]) -> dict[str, Any]:
    """``--data-arg KEY=VALUE`` items -> ``{key: YAML value}``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--data-arg expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out
