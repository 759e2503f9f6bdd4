"""Pretrained weights: save, push and load zoo models; preset tags; the project's ``weights/`` folder.

A *published folder* (a local directory or a Hugging Face hub model repo) holds:

    config.json         {"family": ..., **zoo.config.to_dict(model.config)}: exactly a preset's ``config:``
                        section plus its family, so the same file builds the model
    model.safetensors   the state dict (``pytorch_model.bin`` is read as a fallback)
    pretrained.json     optional: preset, tag, input size/mean/std, metrics, recipe, license, sha256
    README.md           generated model card (preset, recipe, metrics, routing statistics)

API (models are plain ``nn.Module``; saving is a function, not a method):

    save_pretrained(model, dir, ...)                 -> Path
    push_to_hub(model, "org/repo", ...)              -> huggingface_hub.CommitInfo
    from_pretrained("hf-hub:org/repo" | "local-dir:PATH", **overrides) -> nn.Module
    load_pretrained(model, "hf-hub:..." | "local-dir:..." | path/to/file.safetensors)
    zoo.create_model(name, pretrained=True | "tag" | "hf-hub:org/repo" | "local-dir:PATH", **overrides)

Tags live in the preset YAML's ``pretrained:`` mapping (``tag -> {hf_hub_id, file, sha256, local_dir, license,
input, metrics, recipe, overrides, default}``). A tag loads from ``weights/<local_dir>/`` when that folder exists
(``ZOO_WEIGHTS`` moves the weights root), else from ``hf_hub_id`` through ``hf_hub_download`` (hub cache,
progress bars, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` all honoured at call time). The sha256 is always checked.

CLI: ``python -m zoo.hub export --checkpoint CKPT --preset NAME --tag TAG --out weights/NAME.TAG
--metrics metrics.json`` turns a Lightning checkpoint into a published folder and updates
``weights/manifest.json`` and the preset's ``pretrained:`` section; ``python -m zoo.hub push DIR org/repo``
uploads a folder; ``python -m zoo.hub verify`` checks every manifest entry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import struct
import sys
import tempfile
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from zoo.config import ConfigError, close_matches, from_dict, merge, to_dict
from zoo.registry import build_model, configs_dir, family_of, get_family, list_models, load_preset, model_config

logger = logging.getLogger("zoo.hub")

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
WEIGHTS_NAME = "model.safetensors"
PT_WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
META_NAME = "pretrained.json"
CARD_NAME = "README.md"
MANIFEST_NAME = "manifest.json"
LIBRARY_NAME = "moe-zoo"
DEFAULT_HUB_ORG = os.environ.get("ZOO_HUB_ORG", "moe-zoo")
TAG_KEYS = {"hf_hub_id", "revision", "file", "sha256", "size", "local_dir", "license", "input", "metrics",
            "recipe", "overrides", "data", "check", "weights_dtype", "default", "description"}

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------------------- errors
class PretrainedError(RuntimeError):
    """Pretrained weights could not be found, verified or loaded."""


class WeightsNotFoundError(PretrainedError, FileNotFoundError):
    """A weights/config file is missing (locally, in the hub repo, or in the offline cache)."""


class ChecksumError(PretrainedError):
    """A weights file does not have the sha256 the registry / manifest records."""


class CorruptCheckpointError(PretrainedError):
    """A weights file is truncated or not in the expected format."""


class CheckpointMismatchError(PretrainedError):
    """The weights do not fit the model: foreign checkpoint, missing/unexpected keys or shape mismatch."""


# ---------------------------------------------------------------------------------------- environment
def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` read at call time (huggingface_hub itself reads it once, at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _truthy(os.environ.get(var)):
            return True
    if "HF_HUB_OFFLINE" in os.environ:
        return False
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint(endpoint: Optional[str] = None) -> Optional[str]:
    """``endpoint`` or ``HF_ENDPOINT`` at call time (None = huggingface_hub's default)."""
    endpoint = endpoint or os.environ.get("HF_ENDPOINT")
    return endpoint.rstrip("/") if endpoint else None


def hub_cache_dir(cache_dir: Optional[PathLike] = None) -> Optional[str]:
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def weights_dir() -> Path:
    """The project's ``weights/`` folder (``ZOO_WEIGHTS`` overrides it)."""
    env = os.environ.get("ZOO_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "weights"


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- sources
def parse_source(source: str) -> tuple[str, str, Optional[str]]:
    """``"hf-hub:org/repo[@rev]"`` -> ("hub", "org/repo", rev); ``"local-dir:PATH"`` -> ("local", PATH, None)."""
    if source.startswith(HF_HUB_PREFIX):
        repo = source[len(HF_HUB_PREFIX):]
        revision = None
        if "@" in repo:
            repo, revision = repo.split("@", 1)
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ConfigError(f"{source!r}: expected 'hf-hub:org/repo' (optionally '@revision')")
        return "hub", repo, revision
    if source.startswith(LOCAL_DIR_PREFIX):
        path = source[len(LOCAL_DIR_PREFIX):]
        if not path:
            raise ConfigError(f"{source!r}: expected 'local-dir:PATH'")
        return "local", os.path.expanduser(path), None
    raise ConfigError(f"{source!r} is not a weights source; use 'hf-hub:org/repo' or 'local-dir:PATH'")


def is_source(value: Any) -> bool:
    return isinstance(value, str) and value.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX))


def hub_download(repo_id: str, filename: str, *, revision: Optional[str] = None,
                 cache_dir: Optional[PathLike] = None, endpoint: Optional[str] = None,
                 required: bool = True) -> Optional[Path]:
    """``hf_hub_download`` with the hub cache and progress bars, ``HF_HUB_OFFLINE`` / ``HF_ENDPOINT`` read now.

    Returns None for a file the repo does not have when ``required`` is False; otherwise raises a
    :class:`WeightsNotFoundError` that says what was looked for and where.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    import zoo

    offline = is_offline()
    where = f"hub repo {repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=hub_cache_dir(cache_dir),
                               endpoint=hub_endpoint(endpoint), local_files_only=offline,
                               library_name=LIBRARY_NAME, library_version=zoo.__version__)
        return Path(path)
    except LocalEntryNotFoundError as err:
        if offline and not required:
            return None
        cache = hub_cache_dir(cache_dir) or "the default hub cache"
        if offline:
            msg = (f"HF_HUB_OFFLINE is set and {filename!r} of {where} is not in {cache}; "
                   "download it once online (or unset HF_HUB_OFFLINE)")
        else:
            msg = (f"could not reach {hub_endpoint(endpoint) or 'the Hugging Face hub'} for {filename!r} of {where} "
                   f"and it is not in {cache}: {err}")
        raise WeightsNotFoundError(msg) from err
    except (EntryNotFoundError, RevisionNotFoundError) as err:
        if not required:
            return None
        raise WeightsNotFoundError(f"{where} has no file {filename!r} ({type(err).__name__})") from err
    except RepositoryNotFoundError as err:
        raise WeightsNotFoundError(f"{where} not found at {hub_endpoint(endpoint) or 'https://huggingface.co'} "
                                   "(wrong name, private repo without a token, or not published yet)") from err


def fetch_file(source: str, filename: str, *, cache_dir: Optional[PathLike] = None,
               required: bool = True) -> Optional[Path]:
    """One file of a published folder (local or hub)."""
    kind, where, revision = parse_source(source)
    if kind == "local":
        folder = Path(where)
        if not folder.is_dir():
            raise WeightsNotFoundError(f"{source}: folder {folder} does not exist")
        path = folder / filename
        if path.is_file():
            return path
        if required:
            found = sorted(p.name for p in folder.iterdir())
            raise WeightsNotFoundError(f"{source}: expected {filename!r} in {folder}, found {found}")
        return None
    return hub_download(where, filename, revision=revision, cache_dir=cache_dir, required=required)


def fetch_weights(source: str, *, filename: Optional[str] = None, cache_dir: Optional[PathLike] = None) -> Path:
    """The weights file of ``source``: ``filename`` if given, else safetensors first, then pytorch_model.bin."""
    if filename:
        return fetch_file(source, filename, cache_dir=cache_dir)  # type: ignore[return-value]
    for name in (WEIGHTS_NAME, PT_WEIGHTS_NAME):
        path = fetch_file(source, name, cache_dir=cache_dir, required=False)
        if path is not None:
            return path
    kind, where, _ = parse_source(source)
    if kind == "local":
        extra = f"; found {sorted(p.name for p in Path(where).iterdir())}"
    else:
        extra = " (HF_HUB_OFFLINE is set: only the hub cache was searched)" if is_offline() else ""
    raise WeightsNotFoundError(f"{source}: no weights file; expected {WEIGHTS_NAME!r} or {PT_WEIGHTS_NAME!r}{extra}")


def read_config_file(path: PathLike, where: str = "") -> tuple[str, dict[str, Any]]:
    """``config.json`` -> (family, config dict). Raises on a missing family or an unreadable file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CorruptCheckpointError(f"{where or path}: config.json is not valid JSON: {err}") from err
    if not isinstance(data, dict) or "family" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointMismatchError(f"{where or path}: config.json must hold 'family' plus the family's config "
                                      f"(as written by zoo.hub.save_pretrained); found {keys}")
    data = dict(data)
    family = data.pop("family")
    get_family(family)  # unknown family -> ConfigError listing the known ones
    return family, data


# ------------------------------------------------------------------------------------- reading weights
def check_safetensors(path: PathLike) -> None:
    """Raise :class:`CorruptCheckpointError` if ``path`` is truncated or not a safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CorruptCheckpointError(f"{path} is not a safetensors file: {size} bytes, expected at least an "
                                     "8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000 or 8 + n > size:
            raise CorruptCheckpointError(
                f"{path} is truncated or not a safetensors file: header length field says {n} bytes but the file "
                f"has {size} bytes in all")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"{path} is not a safetensors file: its header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} is not a safetensors file: header is {type(header).__name__}")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    expected = 8 + n + end
    if size != expected:
        raise CorruptCheckpointError(f"{path} is truncated or damaged: its header describes {expected} bytes, "
                                     f"the file has {size} bytes; delete it and download / export it again")


def safetensors_metadata(path: PathLike) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__") or {}


def read_weights(path: PathLike, expected_sha256: Optional[str] = None) -> dict[str, Tensor]:
    """Load a state dict from ``.safetensors`` (or a torch ``.bin``/``.pt``), verifying ``expected_sha256``."""
    path = Path(path)
    if not path.is_file():
        found = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else "no such folder"
        raise WeightsNotFoundError(f"weights file {path} not found; {path.parent} holds {found}")
    if expected_sha256:
        actual = sha256_file(path)
        if actual.lower() != expected_sha256.lower():
            raise ChecksumError(
                f"sha256 of {path} is {actual}, expected {expected_sha256} (as recorded in the preset / manifest): "
                "the file is corrupt, truncated or another version; delete it (or its hub cache entry) and fetch "
                "it again, or update the recorded sha256 if the weights were re-exported on purpose")
    if path.suffix == ".safetensors":
        check_safetensors(path)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise CorruptCheckpointError(f"{path} could not be read as safetensors: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad pickles / zip files
        raise CorruptCheckpointError(f"{path} could not be read as a torch checkpoint "
                                     f"(truncated or not a checkpoint?): {type(err).__name__}: {err}") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CorruptCheckpointError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return dict(obj)


# ------------------------------------------------------------------------------------- loading weights
def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_diff(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """``["encoder.dim: model 64, checkpoint 128", ...]`` for every dotted key whose value differs."""
    a, b = _flat(expected), _flat(found)
    return [f"{k}: model {a.get(k, '<absent>')!r}, checkpoint {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _shape(t: Any) -> list[int]:
    return list(t.shape)


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str,
                            checkpoint_config: Optional[Mapping[str, Any]] = None, reset_head: bool = False,
                            resize_pos_embed: bool = True) -> list[str]:
    """Strictly load ``state_dict`` into ``model`` with errors that say what was expected and found.

    Position embeddings of another grid are bilinearly resized (another resolution). ``reset_head`` keeps the
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
        family = family_of(model.config) if model_cfg is not None else type(model).__name__
        head = (f"{source} does not look like a {family} checkpoint: none of its {len(sd)} tensors has a name the "
                f"model expects" if not common else f"{source} does not match the model's parameter names")
        raise CheckpointMismatchError(
            f"{head}\n  missing ({len(missing)}, expected by the model): {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}\n  unexpected ({len(unexpected)}, found in the checkpoint): "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}{diff_msg}")
    bad = []
    for k, v in sd.items():
        want = own[k]
        if v.shape == want.shape:
            continue
        if resize_pos_embed and k.endswith("pos_embed") and v.ndim == 3 and v.shape[-1] == want.shape[-1]:
            from zoo.layers import resize_pos_embed as _resize

            prefix = 1
            grid = math.isqrt(want.shape[1] - prefix)
            if grid * grid == want.shape[1] - prefix and math.isqrt(v.shape[1] - prefix) ** 2 == v.shape[1] - prefix:
                sd[k] = _resize(v, grid, prefix)
                notes.append(f"{k} resized from {_shape(v)} to {_shape(want)}")
                continue
        bad.append(f"{k}: expected {_shape(want)} (model), found {_shape(v)} (checkpoint)")
    if bad:
        shown = bad[:12] + ([f"... and {len(bad) - 12} more"] if len(bad) > 12 else [])
        raise CheckpointMismatchError(f"{source}: config/weights mismatch, {len(bad)} tensor(s) have other "
                                      "shapes:\n  " + "\n  ".join(shown) + diff_msg)
    with torch.no_grad():
        for k, v in sd.items():
            if v.dtype != own[k].dtype and own[k].is_floating_point():
                sd[k] = v.to(own[k].dtype)
    model.load_state_dict(sd, strict=not reset_head)
    if diff and not bad:
        logger.info("%s: config.json differs from the model config in non-shape settings:\n  %s", source,
                    "\n  ".join(diff))
    return notes


def _overrides_num_classes(overrides: Mapping[str, Any]) -> bool:
    return "num_classes" in overrides


def _attach(model: nn.Module, info: dict[str, Any]) -> nn.Module:
    model.pretrained_cfg = info  # like timm: where the weights came from, input size/mean/std, metrics
    return model


def _read_meta(source: str) -> dict[str, Any]:
    try:
        path = fetch_file(source, META_NAME, required=False)
    except WeightsNotFoundError:
        return {}
    if path is None:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        logger.warning("%s: ignoring unreadable %s", source, META_NAME)
        return {}


def load_pretrained(model: nn.Module, source: Union[str, PathLike], *, sha256: Optional[str] = None,
                    filename: Optional[str] = None, reset_head: bool = False,
                    cache_dir: Optional[PathLike] = None) -> nn.Module:
    """Load weights into ``model`` from ``"hf-hub:org/repo"``, ``"local-dir:PATH"`` or a weights file path.

    The source's ``config.json`` (if any) must name the model's family; its differences from the model's config are
    listed in any mismatch error.
    """
    source = str(source)
    if is_source(source):
        ckpt_config = None
        cfg_path = fetch_file(source, CONFIG_NAME, cache_dir=cache_dir, required=False)
        if cfg_path is not None:
            family, ckpt_config = read_config_file(cfg_path, source)
            own = family_of(model.config) if is_dataclass(getattr(model, "config", None)) else None
            if own is not None and family != own:
                raise CheckpointMismatchError(f"{source} holds a {family!r} model, expected a {own!r} model")
        path = fetch_weights(source, filename=filename, cache_dir=cache_dir)
        meta = _read_meta(source)
    else:
        path, ckpt_config, meta = Path(source), None, {}
    state_dict = read_weights(path, sha256 or None)
    notes = load_state_dict_checked(model, state_dict, source=source, checkpoint_config=ckpt_config,
                                    reset_head=reset_head)
    info = {k: meta[k] for k in ("preset", "tag", "input", "metrics", "license") if k in meta}
    info.update(source=source, file=str(path), notes=notes)
    return _attach(model, info)


def from_pretrained(source: str, pretrained: Any = True, *, cache_dir: Optional[PathLike] = None,
                    **overrides: Any) -> nn.Module:
    """Build the model described by ``source``'s ``config.json`` (with ``overrides``) and load its weights
    (unless ``pretrained=False``)."""
    if pretrained not in (None, True, False):
        raise ConfigError(f"pretrained={pretrained!r} cannot be combined with {source!r}: the name already says "
                          "where the weights are; use pretrained=True/False")
    cfg_path = fetch_file(source, CONFIG_NAME, cache_dir=cache_dir)
    family, data = read_config_file(cfg_path, source)  # type: ignore[arg-type]
    fam = get_family(family)
    config = from_dict(fam.config_cls, merge(data, overrides), where=f"{source} config")
    model = fam.build(config)
    if pretrained is False:
        return model
    return load_pretrained(model, source, reset_head=_overrides_num_classes(overrides), cache_dir=cache_dir)


# ------------------------------------------------------------------------------------------ preset tags
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
    """``["vmoe_tiny_digits.digits", ...]``: every preset tag with weights."""
    out = []
    for name in list_models(pattern):
        for tag in pretrained_tags(name):
            out.append(f"{name}.{tag}")
    return out


def tag_weights_path(name: str, tag: str, entry: Mapping[str, Any], *,
                     cache_dir: Optional[PathLike] = None) -> tuple[Path, str]:
    """Where the weights of ``name``/``tag`` are: ``weights/<local_dir>/<file>`` if present, else the hub."""
    filename = entry.get("file") or WEIGHTS_NAME
    local = entry.get("local_dir")
    if local:
        folder = weights_dir() / local
        if (folder / filename).is_file():
            return folder / filename, f"{LOCAL_DIR_PREFIX}{folder}"
    hub_id = entry.get("hf_hub_id")
    if not hub_id:
        raise WeightsNotFoundError(
            f"{name}.{tag}: no weights at {weights_dir() / (local or '?') / filename} and no hf_hub_id to download "
            "them from")
    revision = entry.get("revision")
    source = f"{HF_HUB_PREFIX}{hub_id}" + (f"@{revision}" if revision else "")
    try:
        path = hub_download(hub_id, filename, revision=revision, cache_dir=cache_dir)
    except WeightsNotFoundError as err:
        hint = f" (and not in {weights_dir() / local})" if local else ""
        raise WeightsNotFoundError(f"{name}.{tag}: {err}{hint}") from err
    return path, source  # type: ignore[return-value]


def create_pretrained(name: str, pretrained: Any = True, **overrides: Any) -> nn.Module:
    """Back end of ``zoo.create_model(name, pretrained=..., **overrides)``."""
    if is_source(name):
        return from_pretrained(name, pretrained, **overrides)
    preset = load_preset(name)
    if pretrained in (None, False):
        return build_model(preset["family"], model_config(name, **overrides))
    if is_source(pretrained):
        model = build_model(preset["family"], model_config(name, **overrides))
        return load_pretrained(model, pretrained, reset_head=_overrides_num_classes(overrides))
    tags = pretrained_tags(name)
    if pretrained is True:
        tag = default_tag(name)
    elif isinstance(pretrained, str):
        tag = pretrained
        if tag not in tags:
            hint = close_matches(tag, tags)
            raise ConfigError(f"preset {name!r} has no pretrained tag {tag!r}"
                              + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else "")
                              + f" Tags: {sorted(tags) or 'none'}. Or pass 'hf-hub:org/repo' / 'local-dir:PATH'.")
    else:
        raise ConfigError(f"pretrained must be True/False, a tag, 'hf-hub:org/repo' or 'local-dir:PATH'; "
                          f"got {pretrained!r}")
    entry = tags[tag]
    merged = merge(entry.get("overrides") or {}, overrides)
    model = build_model(preset["family"], model_config(name, **merged))
    path, source = tag_weights_path(name, tag, entry)
    ckpt_config = None
    cfg_file = path.parent / CONFIG_NAME
    if cfg_file.is_file():
        family, ckpt_config = read_config_file(cfg_file, source)
        if family != preset["family"]:
            raise CheckpointMismatchError(f"{name}.{tag}: {source} holds a {family!r} model, expected "
                                          f"{preset['family']!r}")
    state_dict = read_weights(path, entry.get("sha256"))
    notes = load_state_dict_checked(model, state_dict, source=f"{name}.{tag} ({path})",
                                    checkpoint_config=ckpt_config, reset_head=_overrides_num_classes(overrides))
    info = {"preset": name, "tag": tag, "source": source, "file": str(path), "notes": notes}
    info.update({k: entry[k] for k in ("input", "metrics", "data", "license", "hf_hub_id", "sha256") if k in entry})
    return _attach(model, info)


# -------------------------------------------------------------------------------------------- saving
def find_preset(model: nn.Module) -> Optional[str]:
    """The preset whose config equals ``model.config`` (None if the model was built with overrides)."""
    family = family_of(model.config)
    want = to_dict(model.config)
    for name in list_models(family=family):
        try:
            if to_dict(model_config(name)) == want:
                return name
        except ConfigError:
            continue
    return None


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if is_dataclass(obj) and not isinstance(obj, type):
        return _json_safe(to_dict(obj))
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item"):
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    return str(obj)


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """``{"family": ..., **to_dict(model.config)}``: the content of ``config.json``."""
    config = getattr(model, "config", None)
    if config is None or not is_dataclass(config):
        raise TypeError(f"{type(model).__name__} has no typed .config dataclass; only zoo models "
                        "(zoo.create_model) can be saved with zoo.hub.save_pretrained")
    return {"family": family_of(config), **to_dict(config)}


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(tensors: Mapping[str, Tensor], path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> None:
    """A deterministic safetensors file (sorted names, sorted metadata): the same weights always give the same bytes
    and sha256 (``safetensors.torch.save_file`` orders its metadata differently from run to run)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors here")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in blobs:
            f.write(data)


def save_pretrained(model: nn.Module, save_directory: PathLike, *, preset: Optional[str] = None,
                    tag: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None,
                    recipe: Optional[Mapping[str, Any]] = None, routing: Optional[Any] = None,
                    license: Optional[str] = None, input: Optional[Mapping[str, Any]] = None,
                    hf_hub_id: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                    model_card: bool = True) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``pretrained.json`` and ``README.md`` to ``save_directory``.

    ``preset`` defaults to the preset whose config equals the model's; ``dtype`` (e.g. ``torch.float16``)
    stores floating-point tensors in another precision (they are cast back to the model's dtype on load).
    ``routing``: routing statistics for the card (e.g. from :func:`routing_statistics`).
    """
    config = model_config_dict(model)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    preset = preset or find_preset(model)
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.clone().contiguous()
    import zoo

    metadata = {"format": "pt", "zoo_family": config["family"], "zoo_version": zoo.__version__}
    if preset:
        metadata["zoo_preset"] = preset
    if tag:
        metadata["zoo_tag"] = tag
    tmp = out / (WEIGHTS_NAME + ".tmp")
    write_safetensors(tensors, tmp, metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(dumps_json(config))
    meta = {"preset": preset, "tag": tag, "family": config["family"], "file": WEIGHTS_NAME,
            "sha256": sha256_file(out / WEIGHTS_NAME), "size": (out / WEIGHTS_NAME).stat().st_size,
            "license": license, "input": _json_safe(input) if input else None,
            "metrics": _json_safe(metrics) if metrics else None, "recipe": _json_safe(recipe) if recipe else None,
            "routing": _json_safe(routing) if routing else None, "hf_hub_id": hf_hub_id,
            "num_params": sum(t.numel() for t in tensors.values()), "zoo_version": zoo.__version__}
    meta = {k: v for k, v in meta.items() if v is not None}
    (out / META_NAME).write_text(dumps_json(meta))
    if model_card:
        (out / CARD_NAME).write_text(model_card_text(config, meta))
    return out


def _md_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return f"`{json.dumps(v)}`"
    return str(v)


def model_card_text(config: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """The generated README.md: YAML front matter for the hub, then preset, usage, recipe, metrics, routing."""
    import yaml

    family, preset, tag = config["family"], meta.get("preset"), meta.get("tag")
    title = preset + (f".{tag}" if tag else "") if preset else f"{family} model"
    task = {"vmoe": "image-classification", "limoe": "zero-shot-image-classification"}.get(family)
    front = {"library_name": LIBRARY_NAME, "license": meta.get("license") or "apache-2.0",
             "tags": [t for t in (task, "mixture-of-experts", family, "moe-zoo") if t]}
    if task:
        front["pipeline_tag"] = task
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    desc = None
    if preset:
        try:
            desc = load_preset(preset).get("description")
        except ConfigError:
            desc = None
    lines += [f"A `{family}` model from MoE Zoo" + (f", preset `{preset}`" if preset else "")
              + (f", weights tag `{tag}`" if tag else "") + "."]
    if desc:
        lines += ["", str(desc)]
    hub_id = meta.get("hf_hub_id")
    lines += ["", "## Usage", "", "```python", "import zoo", ""]
    if preset and tag:
        lines += [f"model = zoo.create_model({preset!r}, pretrained={tag!r})"]
    if hub_id:
        lines += [f"model = zoo.create_model('hf-hub:{hub_id}')"]
    lines += ["model = zoo.create_model('local-dir:path/to/this/folder')", "model.eval()"]
    if family == "vmoe":
        lines += ["logits = model(images).logits  # images [B, C, H, W], normalised as below"]
    lines += ["```", ""]
    inp = meta.get("input")
    if inp:
        lines += ["## Input", ""] + [f"- {k}: {_md_value(v)}" for k, v in inp.items()] + [""]
    enc = config.get("encoder", {}) or {}
    moe = enc.get("moe", {}) or {}
    lines += ["## Model", "", "| setting | value |", "|---|---|"]
    for k in ("image_size", "patch_size", "in_chans", "num_classes", "classifier", "representation_size"):
        if k in config:
            lines.append(f"| {k} | {_md_value(config[k])} |")
    for k in ("dim", "depth", "num_heads", "mlp_dim", "moe_every", "moe_last", "moe_layers"):
        if enc.get(k) is not None:
            lines.append(f"| encoder.{k} | {_md_value(enc[k])} |")
    for k in ("num_experts", "top_k", "router", "capacity_factor", "group_size", "batch_priority"):
        if k in moe:
            lines.append(f"| moe.{k} | {_md_value(moe[k])} |")
    if "num_params" in meta:
        lines.append(f"| parameters | {meta['num_params']:,} |")
    lines += ["", "The full config is `config.json` (`zoo.create_model('local-dir:...')` rebuilds the model from it).", ""]
    if meta.get("recipe"):
        lines += ["## Training recipe", ""] + [f"- {k}: {_md_value(v)}" for k, v in _flat(meta["recipe"]).items()]
        lines += [""]
    if meta.get("metrics"):
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_md_value(v)} |" for k, v in _flat(meta["metrics"]).items()] + [""]
    routing = meta.get("routing")
    if routing:
        lines += ["## Routing statistics", ""]
        if isinstance(routing, list) and all(isinstance(r, Mapping) for r in routing):
            keys = sorted({k for r in routing for k in r}, key=lambda k: (k != "layer", k))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_md_value(r.get(k, "")) for k in keys) + " |" for r in routing]
        elif isinstance(routing, Mapping):
            lines += [f"- {k}: {_md_value(v)}" for k, v in routing.items()]
        else:
            lines += [_md_value(routing)]
        lines += [""]
    if meta.get("sha256"):
        lines += ["## Files", "", f"- `{meta.get('file', WEIGHTS_NAME)}` sha256 `{meta['sha256']}`", ""]
    if family == "vmoe":
        lines += ["## Citation", "", "```bibtex", "@inproceedings{riquelme2021scaling,",
                  "  title={Scaling Vision with Sparse Mixture of Experts},",
                  "  author={Riquelme, Carlos and Puigcerver, Joan and Mustafa, Basil and Neumann, Maxim and",
                  "          Jenatton, Rodolphe and Susano Pinto, Andr{\\'e} and Keysers, Daniel and Houlsby, Neil},",
                  "  booktitle={NeurIPS}, year={2021}}", "```", ""]
    return "\n".join(lines)


@torch.no_grad()
def routing_statistics(model: nn.Module, batches: Any, max_batches: Optional[int] = None) -> list[dict[str, Any]]:
    """Per MoE layer: fraction of kept assignments per expert and the dropped fraction, averaged over ``batches``
    (an iterable of image tensors or (images, labels) pairs), for the model card."""
    model.eval()
    tokens, dropped, n = None, None, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        out = model(images)
        per_layer = [s.tokens_per_expert.float().cpu() for s in out.routing]
        drops = [float(s.dropped_fraction) for s in out.routing]
        tokens = per_layer if tokens is None else [a + b for a, b in zip(tokens, per_layer)]
        dropped = drops if dropped is None else [a + b for a, b in zip(dropped, drops)]
        n += 1
    if not n or not tokens:
        return []
    from zoo.moe.layer import moe_layers

    names = [name for name, m in model.named_modules() if m in set(moe_layers(model))]
    rows = []
    for j, t in enumerate(tokens):
        frac = (t / t.sum().clamp_min(1)).tolist()
        rows.append({"layer": names[j] if j < len(names) else j,
                     "expert_load": [round(x, 4) for x in frac],
                     "dropped_fraction": round(dropped[j] / n, 4)})
    return rows


# ----------------------------------------------------------------------------------------------- push
def upload_folder(folder: PathLike, repo_id: str, *, token: Optional[str] = None, private: Optional[bool] = None,
                  revision: Optional[str] = None, commit_message: str = "Upload MoE Zoo model",
                  endpoint: Optional[str] = None, create_repo: bool = True) -> Any:
    """Create ``repo_id`` (if needed) and commit every file of ``folder`` with huggingface_hub's commit API."""
    from huggingface_hub import CommitOperationAdd, HfApi

    import zoo

    if is_offline():
        raise PretrainedError("HF_HUB_OFFLINE is set: cannot push to the hub")
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    if not files:
        raise WeightsNotFoundError(f"{folder} holds no files to upload")
    api = HfApi(endpoint=hub_endpoint(endpoint), token=token, library_name=LIBRARY_NAME,
                library_version=zoo.__version__)
    if create_repo:
        api.create_repo(repo_id, private=private, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
           for p in files]
    return api.create_commit(repo_id, operations=ops, commit_message=commit_message, revision=revision)


def push_to_hub(model: nn.Module, repo_id: str, *, token: Optional[str] = None, private: Optional[bool] = None,
                revision: Optional[str] = None, commit_message: str = "Upload MoE Zoo model",
                endpoint: Optional[str] = None, **save_kwargs: Any) -> Any:
    """``save_pretrained`` into a temporary folder, then :func:`upload_folder`; returns the ``CommitInfo``."""
    save_kwargs.setdefault("hf_hub_id", repo_id)
    with tempfile.TemporaryDirectory(prefix="zoo-push-") as tmp:
        save_pretrained(model, tmp, **save_kwargs)
        return upload_folder(tmp, repo_id, token=token, private=private, revision=revision,
                             commit_message=commit_message, endpoint=endpoint)


# ------------------------------------------------------------------------------------- manifest, export
_SCALAR_LIST = re.compile(r"\[\s*((?:-?[\d.eE+-]+|true|false|null)(?:,\s*(?:-?[\d.eE+-]+|true|false|null))*)\s*\]")


def dumps_json(obj: Any) -> str:
    """Indented JSON with lists of numbers on one line (compact manifests and pretrained.json)."""
    text = json.dumps(obj, indent=2)
    return _SCALAR_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def manifest_path() -> Path:
    return weights_dir() / MANIFEST_NAME


def read_manifest(path: Optional[PathLike] = None) -> dict[str, Any]:
    path = Path(path) if path else manifest_path()
    if not path.is_file():
        return {"version": 1, "weights": []}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("weights"), list):
        raise CorruptCheckpointError(f"{path}: expected {{'version': 1, 'weights': [...]}}")
    return data


def update_manifest(entry: Mapping[str, Any], path: Optional[PathLike] = None) -> Path:
    """Insert or replace the entry with the same (name, tag); entries stay sorted."""
    path = Path(path) if path else manifest_path()
    data = read_manifest(path)
    rows = [w for w in data["weights"] if (w.get("name"), w.get("tag")) != (entry["name"], entry["tag"])]
    rows.append(dict(entry))
    data["weights"] = sorted(rows, key=lambda w: (w["name"], w["tag"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_json(data))
    return path


def preset_file(name: str) -> Path:
    load_preset(name)  # raises with close matches for an unknown name
    for path in sorted((configs_dir() / "models").glob(f"*/{name}.yaml")):
        return path
    raise ConfigError(f"preset file of {name!r} not found under {configs_dir()}")


def _top_level_blocks(text: str) -> list[tuple[str, int, int]]:
    """(key, start, end) character spans of the top-level keys of a YAML mapping file."""
    lines = text.splitlines(keepends=True)
    starts = []
    pos = 0
    for line in lines:
        if line and not line[0].isspace() and not line.startswith("#") and ":" in line and line.strip() != "---":
            starts.append((line.split(":", 1)[0].strip(), pos))
        pos += len(line)
    return [(k, s, starts[i + 1][1] if i + 1 < len(starts) else len(text)) for i, (k, s) in enumerate(starts)]


def write_preset_tag(name: str, tag: str, entry: Mapping[str, Any], *, make_default: Optional[bool] = None) -> Path:
    """Set ``pretrained.<tag>`` in preset ``name``'s YAML, rewriting only the ``pretrained:`` block (the
    ``config:`` text is left byte for byte as it was)."""
    import yaml

    path = preset_file(name)
    text = path.read_text()
    tags = dict(load_preset(name).get("pretrained") or {})
    new = {k: v for k, v in dict(entry).items() if v is not None}
    if make_default is None:
        make_default = not any(e.get("default") for t, e in tags.items() if t != tag)
    if make_default:
        for t in tags:
            if t != tag and tags[t].get("default"):
                tags[t] = {**tags[t], "default": False}
    new["default"] = bool(make_default)
    tags[tag] = new
    block = yaml.safe_dump({"pretrained": _json_safe(tags)}, sort_keys=False, width=110, default_flow_style=None)
    spans = _top_level_blocks(text)
    old = [(s, e) for k, s, e in spans if k == "pretrained"]
    if old:
        s, e = old[0]
        text = text[:s] + block + text[e:]
    else:
        text = text + ("" if text.endswith("\n") else "\n") + block
    check = yaml.safe_load(text)
    before = yaml.safe_load(path.read_text())
    if check.get("config") != before.get("config") or check.get("family") != before.get("family"):
        raise RuntimeError(f"internal error: rewriting {path} would change its config; left untouched")
    path.write_text(text)
    return path


def _lightning_state_dict(ckpt: Any, where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(model state dict, extra info) of a Lightning checkpoint of ``ImageClassificationTask`` (model in
    ``.model``), or of a plain state dict."""
    if not isinstance(ckpt, Mapping):
        raise CorruptCheckpointError(f"{where}: expected a checkpoint dict, found {type(ckpt).__name__}")
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, Mapping) or not sd:
        raise CorruptCheckpointError(f"{where}: no 'state_dict' in the checkpoint (keys: {sorted(ckpt)[:10]})")
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    prefixed = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    info = {k: ckpt[k] for k in ("epoch", "global_step", "hyper_parameters", "datamodule_hyper_parameters")
            if k in ckpt}
    return (prefixed or tensors), info


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--override expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


_EVAL_HPARAMS = {"eval_capacity_factor": "encoder.moe.eval_capacity_factor", "eval_top_k": "encoder.moe.eval_top_k",
                 "eval_dropless": "encoder.moe.eval_dropless"}


def _config_from_hparams(hparams: Any, preset: str) -> dict[str, Any]:
    """Config overrides recorded in ``ImageClassificationTask``'s hyper-parameters: ``model_overrides``, the data
    geometry (``num_classes`` / ``in_chans`` / ``image_size``) and eval-time routing (``eval_capacity_factor``,
    ``eval_top_k``, ``eval_dropless``, which the task applies to the MoE layers), so that the exported config
    evaluates exactly as the checkpoint did."""
    if not isinstance(hparams, Mapping):
        return {}
    trained = hparams.get("model")
    if isinstance(trained, str) and trained != preset:
        raise ConfigError(f"the checkpoint was trained with model {trained!r}, not --preset {preset!r}")
    out: dict[str, Any] = {}
    for key in ("model_overrides", "overrides", "model_kwargs"):
        if isinstance(hparams.get(key), Mapping):
            out = merge(out, hparams[key])
    for key in ("num_classes", "in_chans", "image_size"):
        if hparams.get(key) is not None:
            out[key] = hparams[key]
    for key, dotted in _EVAL_HPARAMS.items():
        if hparams.get(key) is not None:
            out = merge(out, {dotted: hparams[key]})
    cfg = hparams.get("model_config")
    if is_dataclass(cfg):
        cfg = to_dict(cfg)
    if isinstance(cfg, Mapping):
        out = merge(out, cfg)
    return out


def minimal_overrides(preset: str, config: Any) -> dict[str, Any]:
    """Dotted-key overrides that turn preset ``preset``'s config into ``config`` (empty if they are equal)."""
    base, want = _flat(to_dict(model_config(preset))), _flat(to_dict(config))
    return {k: v for k, v in want.items() if base.get(k, object()) != v}


def _datamodule_input(data: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """mean / std of the recorded datamodule class (``zoo.data`` modules carry them as class attributes)."""
    if not data or not data.get("class_path"):
        return {}
    import importlib

    module, _, name = str(data["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return {}
    out = {}
    for key in ("mean", "std"):
        value = getattr(cls, key, None)
        if isinstance(value, (list, tuple)):
            out[key] = [float(v) for v in value]
    return out


def split_eval_metrics(metrics: Optional[Mapping[str, Any]]) -> tuple[dict[str, Any], Optional[list[dict]]]:
    """(scalar metrics, routing rows for the card) from ``eval.py``'s JSON, a Lightning test dict, or a list with
    one of those. Paths and plot lists are dropped."""
    if isinstance(metrics, list):
        metrics = metrics[0] if len(metrics) == 1 and isinstance(metrics[0], Mapping) else {"values": metrics}
    metrics = dict(metrics or {})
    routing = metrics.pop("routing", None)
    layers = metrics.pop("layers", None)
    if routing is None and isinstance(layers, Mapping):
        routing = []
        for name, row in layers.items():
            row = dict(row or {})
            routing.append({"layer": name, "dropped_fraction": row.get("dropped_fraction"),
                            "expert_load": [round(float(x), 4) for x in row.get("tokens_per_expert_share") or []],
                            "capacity": row.get("capacity")})
    for key in ("checkpoint", "plots", "datamodule", "model"):
        metrics.pop(key, None)
    scalars = {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float, str, bool))}
    return {k: v for k, v in scalars.items() if v is not None}, routing


def build_datamodule(data: Mapping[str, Any]) -> Any:
    """The datamodule recorded in a tag's ``data`` (``class_path`` + ``init_args``), unknown arguments dropped."""
    import importlib
    import inspect

    module, _, name = str(data["class_path"]).rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in dict(data.get("init_args") or {}).items() if k in params})


@torch.no_grad()
def prediction_check(model: nn.Module, data: Mapping[str, Any], max_images: int = 256) -> dict[str, Any]:
    """Predictions on the first ``max_images`` test images (recorded datamodule, batch size and threads, fp32, CPU):
    a fast reproducibility check stored with the weights, next to the full-split metrics."""
    dm = build_datamodule(data)
    dm.setup("test")
    threads = torch.get_num_threads()
    if data.get("num_threads"):
        torch.set_num_threads(int(data["num_threads"]))
    preds: list[int] = []
    correct = 0
    try:
        model.eval()
        for images, labels in dm.test_dataloader():
            p = model(images).logits.argmax(-1)
            preds += p.tolist()
            correct += int((p == labels).sum())
            if len(preds) >= max_images:
                break
    finally:
        torch.set_num_threads(threads)
    return {"split": "test", "first_n": len(preds), "correct": correct, "predictions": preds}


def export_checkpoint(checkpoint: PathLike, preset: str, tag: str, out: PathLike, *,
                      metrics: Optional[Mapping[str, Any]] = None, recipe: Optional[Mapping[str, Any]] = None,
                      routing: Optional[Any] = None, hf_hub_id: Optional[str] = None,
                      license: str = "apache-2.0", input: Optional[Mapping[str, Any]] = None,
                      overrides: Optional[Mapping[str, Any]] = None, dtype: Optional[torch.dtype] = None,
                      make_default: Optional[bool] = None, update_registry: bool = True,
                      manifest: Optional[PathLike] = None) -> dict[str, Any]:
    """Lightning checkpoint -> published folder ``out`` (+ manifest entry + preset ``pretrained.<tag>``)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise WeightsNotFoundError(f"checkpoint {checkpoint} not found")
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - Lightning hparams may hold objects: the project's own file, trusted
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    sd, info = _lightning_state_dict(ckpt, str(checkpoint))
    hparams = info.get("hyper_parameters") or {}
    ov = merge(_config_from_hparams(hparams, preset), dict(overrides or {}))
    family = load_preset(preset)["family"]
    model = build_model(family, model_config(preset, **ov))
    load_state_dict_checked(model, sd, source=str(checkpoint))
    ov = minimal_overrides(preset, model.config)
    given = dict(recipe or {})
    recipe = {k: v for k, v in _json_safe(hparams).items()
              if k != "model_config" and not k.startswith("_") and v is not None}
    recipe.update(given)
    for k in ("epoch", "global_step"):
        if k in info:
            recipe.setdefault(k, int(info[k]))
    data = None
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("zoo_datamodule"), Mapping):
        data = {k: v for k, v in _json_safe(ckpt["zoo_datamodule"]).items() if k in ("class_path", "init_args")}
        trained = ckpt.get("zoo_trainer") or {}
        if trained.get("num_threads"):
            data["num_threads"] = int(trained["num_threads"])
    cfg = model.config
    input = dict(input or {})
    input.setdefault("size", [cfg.in_chans, cfg.image_size, cfg.image_size])
    for k, v in _datamodule_input(data).items():
        input.setdefault(k, v)
    if dtype is not None and dtype != torch.float32:
        # round the weights to the stored precision now, so the check below sees exactly what loading gives
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.to(dtype).to(t.dtype))
    check = None
    if data:
        try:
            check = prediction_check(model, data)
        except Exception as err:  # noqa: BLE001 - data not available here: the check is optional
            logger.warning("no prediction check recorded (%s: %s)", type(err).__name__, err)
    metrics, eval_routing = split_eval_metrics(metrics)
    routing = routing if routing is not None else eval_routing
    hf_hub_id = hf_hub_id or f"{DEFAULT_HUB_ORG}/{preset}.{tag}"
    out = Path(out)
    save_pretrained(model, out, preset=preset, tag=tag, metrics=metrics, recipe=recipe, routing=routing,
                    license=license, input=input, hf_hub_id=hf_hub_id, dtype=dtype)
    weights = out / WEIGHTS_NAME
    try:
        local_dir = out.resolve().relative_to(weights_dir().resolve()).as_posix()
    except ValueError:
        local_dir = None
        logger.warning("%s is not inside %s: the registry entry will only point at the hub", out, weights_dir())
    entry = {"hf_hub_id": hf_hub_id, "file": WEIGHTS_NAME, "sha256": sha256_file(weights),
             "size": weights.stat().st_size, "local_dir": local_dir, "license": license,
             "input": _json_safe(input), "metrics": _json_safe(metrics) or None, "data": data,
             "recipe": _json_safe(recipe) or None, "overrides": _json_safe(ov) or None, "check": check,
             "weights_dtype": str(dtype).replace("torch.", "") if dtype not in (None, torch.float32) else None}
    entry = {k: v for k, v in entry.items() if v is not None}
    if update_registry:
        update_manifest({"name": preset, "tag": tag, **entry}, manifest)
        write_preset_tag(preset, tag, {k: v for k, v in entry.items() if k != "check"}, make_default=make_default)
    return entry


def verify_manifest(manifest: Optional[PathLike] = None, *, load: bool = True) -> list[str]:
    """Check every manifest entry: local file present with the recorded sha256, preset entry identical, loads."""
    problems = []
    for w in read_manifest(manifest)["weights"]:
        name, tag = w["name"], w["tag"]
        try:
            entry = pretrained_tags(name).get(tag)
            if entry is None:
                problems.append(f"{name}.{tag}: in the manifest but not in the preset's pretrained section")
                continue
            if entry.get("sha256") != w.get("sha256"):
                problems.append(f"{name}.{tag}: sha256 differs between manifest and preset")
            if load:
                create_pretrained(name, tag)
        except (PretrainedError, ConfigError) as err:
            problems.append(f"{name}.{tag}: {err}")
    return problems


# ---------------------------------------------------------------------------------------------------- CLI
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _load_json_or_yaml(path: Optional[str]) -> Optional[dict[str, Any]]:
    if not path:
        return None
    import yaml

    text = Path(path).read_text()
    return json.loads(text) if path.endswith(".json") else yaml.safe_load(text)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.hub", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="Lightning checkpoint -> published weights folder (+ manifest, preset tag)")
    ex.add_argument("--checkpoint", required=True, help="Lightning .ckpt (ImageClassificationTask) or state dict")
    ex.add_argument("--preset", required=True, help="preset name, e.g. vmoe_tiny_digits")
    ex.add_argument("--tag", required=True, help="weights tag, e.g. digits")
    ex.add_argument("--out", required=True, help="output folder, e.g. weights/vmoe_tiny_digits.digits")
    ex.add_argument("--metrics", help="metrics JSON (e.g. written by eval.py); a 'routing' key goes to the card")
    ex.add_argument("--recipe", help="training recipe JSON/YAML, added to the checkpoint's hyper-parameters")
    ex.add_argument("--hf-hub-id", help=f"hub repo it is published as (default {DEFAULT_HUB_ORG}/PRESET.TAG)")
    ex.add_argument("--license", default="apache-2.0")
    ex.add_argument("--mean", type=float, nargs="+", help="input normalisation mean (per channel)")
    ex.add_argument("--std", type=float, nargs="+", help="input normalisation std (per channel)")
    ex.add_argument("--override", action="append", default=[], help="config override key=value (dotted keys)")
    ex.add_argument("--dtype", choices=sorted(_DTYPES), help="store the weights in this precision")
    ex.add_argument("--default", dest="make_default", action="store_true", default=None,
                    help="make this tag the preset's default (default: if no other tag is)")
    ex.add_argument("--no-default", dest="make_default", action="store_false")
    ex.add_argument("--no-registry", action="store_true", help="do not touch the manifest / preset YAML")
    ex.add_argument("--manifest", help=f"manifest path (default {manifest_path()})")
    pu = sub.add_parser("push", help="upload a published folder to a hub repo")
    pu.add_argument("folder")
    pu.add_argument("repo_id")
    pu.add_argument("--private", action="store_true", default=None)
    pu.add_argument("--revision")
    pu.add_argument("--message", default="Upload MoE Zoo model")
    ve = sub.add_parser("verify", help="check every manifest entry (file, sha256, preset entry, loads)")
    ve.add_argument("--manifest")
    sub.add_parser("list", help="list preset tags with weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "export":
        inp = {k: v for k, v in (("mean", args.mean), ("std", args.std)) if v}
        entry = export_checkpoint(args.checkpoint, args.preset, args.tag, args.out,
                                  metrics=_load_json_or_yaml(args.metrics), recipe=_load_json_or_yaml(args.recipe),
                                  hf_hub_id=args.hf_hub_id, license=args.license, input=inp,
                                  overrides=_parse_overrides(args.override),
                                  dtype=_DTYPES[args.dtype] if args.dtype else None,
                                  make_default=args.make_default, update_registry=not args.no_registry,
                                  manifest=args.manifest)
        print(json.dumps(entry, indent=2))
        print(f"wrote {args.out}; load with zoo.create_model({args.preset!r}, pretrained={args.tag!r})")
        return 0
    if args.cmd == "push":
        info = upload_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                             commit_message=args.message)
        print(getattr(info, "commit_url", info))
        return 0
    if args.cmd == "verify":
        problems = verify_manifest(args.manifest)
        for p in problems:
            print("FAIL", p)
        n = len(read_manifest(args.manifest)["weights"])
        print(f"{n - len(problems)}/{n} manifest entries OK" if n else "manifest is empty")
        return 1 if problems else 0
    if args.cmd == "list":
        for item in list_pretrained():
            print(item)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
