"""Reading Hugging Face checkpoint folders without transformers: every converter (decoder LMs, vision and audio
towers, multimodal checkpoints) uses these, so errors read alike and ``.bin`` / sharded / safetensors layouts are
handled once.

- :func:`read_hf_folder` -> ``(config.json dict, {tensor name: tensor})`` from ``model.safetensors``, sharded
  safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin`` (also sharded with its index; read
  with ``torch.load(weights_only=True)``, so a pickle cannot run code).
- :func:`read_weight_file` one ``.safetensors`` / ``.bin`` file (MoE-LLaVA's ``mm_projector.bin``, Uni-MoE's expert
  files).
- :func:`find_hf_folder` resolves a hub name (``openai/clip-vit-large-patch14-336``) to a local folder OFFLINE: the
  folder itself, a folder of that name, or the newest snapshot in the Hugging Face cache. Never downloads.
- :class:`TensorPool` hands each checkpoint tensor out once, so a converter can say which tensors it never used.
- :func:`open_hf_weights` the same tensors as :func:`read_hf_weights`, read lazily (:class:`LazyWeights`): each
  safetensors tensor is read from its shard when asked for and not kept, so a converter holds only what it built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor

PathLike = Union[str, Path]


class HFCheckpointError(ValueError):
    """A checkpoint folder that cannot be converted (unknown model type, missing or extra tensors, a config that
    does not match the weights)."""


def read_json(path: PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFCheckpointError(f"{path} is not valid JSON ({err}); re-download the checkpoint folder") from err


def read_weight_file(path: PathLike) -> dict[str, Tensor]:
    """Tensors of one ``.safetensors`` file or one PyTorch ``.bin`` / ``.pt`` state dict (``weights_only`` load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from zoo.hub import check_safetensors

        check_safetensors(path)  # names the file and what is wrong (truncated, not safetensors) before reading it
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors come in many types; all mean the same to the user
        raise HFCheckpointError(f"{path} is not a readable PyTorch state dict ({type(err).__name__}: {err}); "
                                "re-download it") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise HFCheckpointError(f"{path} does not hold a flat {{name: tensor}} state dict")
    return dict(state)


def _weight_files(folder: PathLike) -> tuple[list[Path], Optional[tuple[Path, dict[str, str]]]]:
    """The weight files of a checkpoint folder and, when sharded, ``(index file, its weight_map)``: safetensors
    (single or sharded) first, else ``pytorch_model.bin``."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map") or {}
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index.name} lists shard(s) {missing} that are not in {folder}; download the "
                                        "whole checkpoint folder")
            return [folder / s for s in shards], (index, weight_map)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single], None
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"{folder} has no model.safetensors, pytorch_model.bin or a shard index (found {found})")


def _check_index(index: Optional[tuple[Path, dict[str, str]]], names: Iterable[str]) -> None:
    if index is None:
        return
    absent = sorted(set(index[1]) - set(names))
    if absent:
        raise HFCheckpointError(f"{index[0].name} maps {len(absent)} tensor(s) (e.g. {absent[:3]}) to shards that do "
                                "not hold them: the folder is from mixed versions")


def read_hf_weights(folder: PathLike) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder: safetensors (single or sharded) first, else ``pytorch_model.bin``."""
    files, index = _weight_files(folder)
    tensors: dict[str, Tensor] = {}
    for path in files:
        tensors.update(read_weight_file(path))
    _check_index(index, tensors)
    return tensors


_ST_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                    "BOOL": torch.bool}


class LazyWeights(Mapping):
    """``{name: tensor}`` of checkpoint files, read on access: a safetensors tensor is read from its file into a fresh
    tensor each time it is asked for (plain ``readinto``, no memory map, nothing cached), so memory holds only the
    tensors the caller keeps. ``.bin`` files are loaded whole (memory-mapped where torch can). ``dtype(name)`` /
    ``nbytes(name)`` come from the headers without reading data."""

    def __init__(self, files: Iterable[PathLike]) -> None:
        from zoo.hub import check_safetensors

        self._entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        self._eager: dict[str, Tensor] = {}
        for path in map(Path, files):
            if path.suffix != ".safetensors":
                self._eager.update(_load_bin(path))
                continue
            if not path.is_file():
                raise FileNotFoundError(f"weight file {path} does not exist")
            check_safetensors(path)  # names the file and what is wrong (truncated, not safetensors) before reading it
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info.get("dtype") not in _ST_TORCH_DTYPES:
                    raise HFCheckpointError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which this "
                                            f"reader does not support ({sorted(_ST_TORCH_DTYPES)})")
                start, end = info["data_offsets"]
                self._entries[name] = (path, _ST_TORCH_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + start,
                                       end - start)

    def __getitem__(self, name: str) -> Tensor:
        if name in self._eager:
            return self._eager[name]
        path, dtype, shape, offset, size = self._entries[name]
        out = torch.empty(shape, dtype=dtype)
        if out.numel() * out.element_size() != size:
            raise HFCheckpointError(f"{path}: tensor {name!r} has {size} bytes, its shape {list(shape)} and dtype "
                                    f"need {out.numel() * out.element_size()}")
        if size:
            with open(path, "rb") as f:
                f.seek(offset)
                got = f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
            if got != size:
                raise HFCheckpointError(f"{path} ended inside tensor {name!r}: re-download it")
        return out

    def __iter__(self) -> Iterator[str]:
        yield from self._entries
        yield from self._eager

    def __len__(self) -> int:
        return len(self._entries) + len(self._eager)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._eager

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][1] if name in self._entries else self._eager[name].dtype

    def nbytes(self, name: str) -> int:
        if name in self._entries:
            return self._entries[name][4]
        t = self._eager[name]
        return t.numel() * t.element_size()


def _load_bin(path: Path) -> dict[str, Tensor]:
    """A ``.bin`` state dict, memory-mapped when it is a zip checkpoint, else read whole."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) or damaged files: read_weight_file reads the one and names the other
        return read_weight_file(path)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise HFCheckpointError(f"{path} does not hold a flat {{name: tensor}} state dict")
    return dict(state)


def open_hf_weights(folder: PathLike) -> LazyWeights:
    """The tensors of a checkpoint folder like :func:`read_hf_weights`, but read lazily (see :class:`LazyWeights`)."""
    files, index = _weight_files(folder)
    weights = LazyWeights(files)
    _check_index(index, weights)
    return weights


def main_dtype(tensors: Mapping[str, Tensor]) -> Optional[torch.dtype]:
    """The floating-point dtype holding most of the bytes of ``tensors`` (a checkpoint's precision), or None."""
    sizes: dict[torch.dtype, int] = {}
    for name in tensors:
        if isinstance(tensors, LazyWeights):
            dtype, size = tensors.dtype(name), tensors.nbytes(name)
        else:
            t = tensors[name]
            dtype, size = t.dtype, t.numel() * t.element_size()
        if dtype.is_floating_point:
            sizes[dtype] = sizes.get(dtype, 0) + size
    return max(sizes, key=sizes.get) if sizes else None


def read_hf_config(folder: PathLike) -> dict[str, Any]:
    """``config.json`` of a Hugging Face checkpoint folder, as a dict."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a Hugging Face checkpoint folder "
                                "(config.json + model.safetensors, shards with an index, or pytorch_model.bin)")
    config = read_json(cfg_path)
    if not isinstance(config, dict):
        raise HFCheckpointError(f"{cfg_path} must hold a JSON object, found {type(config).__name__}")
    return config


def read_hf_folder(folder: PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json as a dict, {tensor name: tensor})`` of a Hugging Face checkpoint folder."""
    return read_hf_config(folder), read_hf_weights(folder)


def _hf_cache_roots(cache_dir: Optional[PathLike]) -> list[Path]:
    from zoo.hub import hub_cache_dir

    roots = [cache_dir] if cache_dir is not None else [hub_cache_dir(),
                                                      Path.home() / ".cache" / "huggingface" / "hub"]
    return [Path(r) for r in roots if r]


def find_hf_folder(name_or_dir: PathLike, *, cache_dir: Optional[PathLike] = None,
                   search_dirs: Iterable[PathLike] = ()) -> Path:
    """A local folder for ``name_or_dir``, offline: the path itself if it is a folder; else ``<dir>/<name>`` or
    ``<dir>/<name's last part>`` for each of ``search_dirs``; else the newest snapshot of ``models--org--name`` in the
    Hugging Face cache (``cache_dir``, ``HF_HUB_CACHE``, ``HF_HOME/hub``, ``~/.cache/huggingface/hub``). Raises
    FileNotFoundError saying where it looked and how to provide the folder; never downloads."""
    path = Path(os.path.expanduser(str(name_or_dir)))
    if path.is_dir():
        return path
    name = str(name_or_dir)
    looked = [str(path)]
    for d in search_dirs:
        for cand in (Path(d) / name, Path(d) / name.split("/")[-1]):
            looked.append(str(cand))
            if cand.is_dir():
                return cand
    for root in _hf_cache_roots(cache_dir):
        snaps = root / ("models--" + name.replace("/", "--")) / "snapshots"
        looked.append(str(snaps))
        if snaps.is_dir():
            found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1]
    raise FileNotFoundError(f"no local folder for {name!r} (looked in {looked}); download it first (e.g. "
                            f"`huggingface-cli download {name}`) or pass the folder's path")


class TensorPool:
    """A checkpoint's tensors; ``take`` hands each out once and ``left`` lists what was never taken (so a converter
    fails on tensors it does not understand instead of silently dropping them)."""

    def __init__(self, tensors: Mapping[str, Tensor], ignored_suffixes: tuple[str, ...] = (),
                 dtype: Optional[torch.dtype] = None) -> None:
        """``tensors``: a dict or a :class:`LazyWeights` (then each tensor is read when taken and the pool keeps no
        reference). ``dtype``: floating-point tensors are handed out in this precision (one at a time, so a
        checkpoint is never held twice)."""
        self.tensors, self.taken, self.ignored, self.dtype = tensors, set(), ignored_suffixes, dtype

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise HFCheckpointError(f"the checkpoint lacks tensor {name!r} that its config.json implies; the "
                                    "config and the weights do not belong together (or a shard is incomplete)")
        self.taken.add(name)
        t = self.tensors[name]
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def take_linear(self, out: dict[str, Tensor], zoo_name: str, hf_name: str, bias: Optional[bool] = None) -> None:
        """``out[zoo_name.weight] (and .bias)`` from ``hf_name``; ``bias=None``: the bias if the checkpoint has it."""
        out[f"{zoo_name}.weight"] = self.take(f"{hf_name}.weight")
        if bias or (bias is None and f"{hf_name}.bias" in self):
            out[f"{zoo_name}.bias"] = self.take(f"{hf_name}.bias")

    def left(self) -> list[str]:
        return sorted(n for n in self.tensors if n not in self.taken and not n.endswith(self.ignored))
