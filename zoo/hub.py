"""Hub I/O: where weights files are and what is in them. Download (Hugging Face hub cache, offline mode), local
folders, sha256 verification, safetensors read/write, and writing / uploading a published folder.

A *published folder* (a local directory or a Hugging Face hub model repo) holds:

    config.json         {"family": ..., **zoo.config.to_dict(model.config)}: exactly a preset's ``config:``
                        section plus its family, so the same file builds the model
    model.safetensors   the state dict (``pytorch_model.bin`` is read as a fallback)
    pretrained.json     optional: preset, tag, input size/mean/std, metrics, recipe, license, sha256
    README.md           generated model card (:mod:`zoo.card`)

API (models are plain ``nn.Module``; saving is a function, not a method):

    save_pretrained(model, dir, ...)                 -> Path
    push_to_hub(model, "org/repo", ...)              -> huggingface_hub.CommitInfo
    read_weights(path, expected_sha256)              -> state dict (sha256 checked once per file and process)

Building a model from a name or a source and loading weights into it is :mod:`zoo.factory`; turning a training
checkpoint into a published folder is :mod:`zoo.tasks.publish`. Every sha256 recorded with weights (a preset tag,
``pretrained.json``) is checked on load, at most once per file per process; ``ZOO_SKIP_SHA256=1`` skips the check
(for huge files you trust).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import tempfile
import threading
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from zoo._version import __version__
from zoo.card import CARD_NAME, LIBRARY_NAME, model_card_text
from zoo.config import ConfigError, to_dict
from zoo.errors import (ChecksumError, CheckpointMismatchError, CorruptCheckpointError, PretrainedError,
                        WeightsNotFoundError)
from zoo.registry import family_of, get_family, list_models, model_config, weights_dir

logger = logging.getLogger("zoo.hub")

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
WEIGHTS_NAME = "model.safetensors"
PT_WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
META_NAME = "pretrained.json"
SKIP_SHA256_ENV = "ZOO_SKIP_SHA256"

PathLike = Union[str, os.PathLike]

__all__ = [
    "PretrainedError", "WeightsNotFoundError", "ChecksumError", "CorruptCheckpointError", "CheckpointMismatchError",
    "weights_dir", "save_pretrained", "push_to_hub", "upload_folder", "read_weights", "write_safetensors",
    "sha256_file", "verify_sha256", "fetch_file", "fetch_weights", "read_config_file", "read_meta", "parse_source",
    "is_source", "hub_download", "model_config_dict", "dumps_json", "json_safe",
]


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


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

_VERIFIED: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) -> sha256 seen this process
_VERIFIED_LOCK = threading.Lock()


def verify_sha256(path: PathLike, expected: Optional[str], recorded_in: str = "the preset / manifest") -> None:
    """Raise :class:`ChecksumError` naming the file, the expected and the found sha256 if they differ.

    Each file is hashed at most once per process (keyed by path, size and modification time, so a replaced file
    is hashed again). ``ZOO_SKIP_SHA256=1`` skips the check (huge files you trust); no ``expected`` = nothing to
    check."""
    if not expected or _truthy(os.environ.get(SKIP_SHA256_ENV)):
        return
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _VERIFIED_LOCK:
        actual = _VERIFIED.get(key)
    if actual is None:
        actual = sha256_file(path)
        with _VERIFIED_LOCK:
            _VERIFIED[key] = actual
    if actual.lower() != expected.lower():
        raise ChecksumError(
            f"sha256 of {path} is {actual}, expected {expected} (as recorded in {recorded_in}): the file is corrupt, "
            "truncated or another version; delete it (or its hub cache entry) and fetch it again, or update the "
            f"recorded sha256 if the weights were re-exported on purpose ({SKIP_SHA256_ENV}=1 skips this check)")


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

    offline = is_offline()
    where = f"hub repo {repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=hub_cache_dir(cache_dir),
                               endpoint=hub_endpoint(endpoint), local_files_only=offline,
                               library_name=LIBRARY_NAME, library_version=__version__)
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


def read_meta(source: str, *, cache_dir: Optional[PathLike] = None) -> dict[str, Any]:
    """``pretrained.json`` of a published folder ({} if it has none).

    Raises:
        CorruptCheckpointError: the file is not a JSON object (it records the weights' sha256, so ignoring it would
            switch verification off).
    """
    try:
        path = fetch_file(source, META_NAME, cache_dir=cache_dir, required=False)
    except WeightsNotFoundError:
        return {}
    if path is None:
        return {}
    try:
        meta = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise CorruptCheckpointError(f"{source}: {META_NAME} is not valid JSON ({err}); it records the weights' "
                                     f"sha256: restore it from the original folder") from err
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{source}: {META_NAME} must hold a JSON object, found {type(meta).__name__}")
    return meta


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


def read_weights(path: PathLike, expected_sha256: Optional[str] = None,
                 recorded_in: str = "the preset / manifest") -> dict[str, Tensor]:
    """Load a state dict from ``.safetensors`` (or a torch ``.bin``/``.pt``), verifying ``expected_sha256``."""
    path = Path(path)
    if not path.is_file():
        found = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else "no such folder"
        raise WeightsNotFoundError(f"weights file {path} not found; {path.parent} holds {found}")
    verify_sha256(path, expected_sha256, recorded_in)
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


def json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(to_dict(obj))
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


def write_safetensors(tensors: Mapping[str, Tensor], path: PathLike, metadata: Optional[Mapping[str, str]] = None,
                      dtype: Optional[torch.dtype] = None) -> None:
    """A deterministic safetensors file (sorted names, sorted metadata): the same weights always give the same bytes
    and sha256 (``safetensors.torch.save_file`` orders its metadata differently from run to run). ``dtype``: store
    floating-point tensors in this precision. Tensors are written one at a time (a cast or contiguous copy lives only
    while its tensor is written), so saving never holds a second copy of the weights."""
    def stored(t: Tensor) -> Tensor:
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.is_meta:
            raise ValueError(f"{name} is on the meta device (never loaded): nothing to save")
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if out_dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {out_dtype} cannot be stored in safetensors here")
        size = t.numel() * torch.empty((), dtype=out_dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[out_dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = stored(tensors[name]).to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


_SCALAR_LIST = re.compile(r"\[\s*((?:-?[\d.eE+-]+|true|false|null)(?:,\s*(?:-?[\d.eE+-]+|true|false|null))*)\s*\]")


def dumps_json(obj: Any) -> str:
    """Indented JSON with lists of numbers on one line (compact manifests and pretrained.json)."""
    text = json.dumps(obj, indent=2)
    return _SCALAR_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def save_pretrained(model: nn.Module, save_directory: PathLike, *, preset: Optional[str] = None,
                    tag: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None,
                    recipe: Optional[Mapping[str, Any]] = None, routing: Optional[Any] = None,
                    license: Optional[str] = None, input: Optional[Mapping[str, Any]] = None,
                    hf_hub_id: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                    model_card: bool = True) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``pretrained.json`` and ``README.md`` to ``save_directory``.

    ``preset`` defaults to the preset whose config equals the model's; ``dtype`` (e.g. ``torch.float16``)
    stores floating-point tensors in another precision (they are cast back to the model's dtype on load).
    ``routing``: per-layer routing statistics for the card (e.g. the routing rows of ``eval.py``'s JSON).
    """
    config = model_config_dict(model)
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"save_pretrained needs a folder, but {out} is a file; choose another save_directory")
    out.mkdir(parents=True, exist_ok=True)
    preset = preset or find_preset(model)
    tensors = model.state_dict()  # no copies: write_safetensors casts / moves one tensor at a time
    metadata = {"format": "pt", "zoo_family": config["family"], "zoo_version": __version__}
    if preset:
        metadata["zoo_preset"] = preset
    if tag:
        metadata["zoo_tag"] = tag
    tmp = out / (WEIGHTS_NAME + ".tmp")
    write_safetensors(tensors, tmp, metadata, dtype=dtype)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(dumps_json(config))
    meta = {"preset": preset, "tag": tag, "family": config["family"], "file": WEIGHTS_NAME,
            "sha256": sha256_file(out / WEIGHTS_NAME), "size": (out / WEIGHTS_NAME).stat().st_size,
            "license": license, "input": json_safe(input) if input else None,
            "metrics": json_safe(metrics) if metrics else None, "recipe": json_safe(recipe) if recipe else None,
            "routing": json_safe(routing) if routing else None, "hf_hub_id": hf_hub_id,
            "num_params": sum(t.numel() for t in tensors.values()), "zoo_version": __version__}
    meta = {k: v for k, v in meta.items() if v is not None}
    (out / META_NAME).write_text(dumps_json(meta))
    if model_card:
        (out / CARD_NAME).write_text(model_card_text(config, meta))
    return out


# ----------------------------------------------------------------------------------------------- push
def upload_folder(folder: PathLike, repo_id: str, *, token: Optional[str] = None, private: Optional[bool] = None,
                  revision: Optional[str] = None, commit_message: str = "Upload MoE Zoo model",
                  endpoint: Optional[str] = None, create_repo: bool = True) -> Any:
    """Create ``repo_id`` (if needed) and commit every file of ``folder`` with huggingface_hub's commit API."""
    from huggingface_hub import CommitOperationAdd, HfApi


    if is_offline():
        raise PretrainedError("HF_HUB_OFFLINE is set: cannot push to the hub")
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    if not files:
        raise WeightsNotFoundError(f"{folder} holds no files to upload")
    api = HfApi(endpoint=hub_endpoint(endpoint), token=token, library_name=LIBRARY_NAME,
                library_version=__version__)
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
