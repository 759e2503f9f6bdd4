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
"""

from __future__ import annotations

import json
import os
from pathlib import Path
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


def _read_sharded(folder: Path, index: Path) -> dict[str, Tensor]:
    weight_map = read_json(index).get("weight_map") or {}
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index.name} lists shard(s) {missing} that are not in {folder}; download the "
                                "whole checkpoint folder")
    tensors: dict[str, Tensor] = {}
    for shard in shards:
        tensors.update(read_weight_file(folder / shard))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise HFCheckpointError(f"{index.name} maps {len(absent)} tensor(s) (e.g. {absent[:3]}) to shards that do "
                                "not hold them: the folder is from mixed versions")
    return tensors


def read_hf_weights(folder: PathLike) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder: safetensors (single or sharded) first, else ``pytorch_model.bin``."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            return _read_sharded(folder, folder / index_name)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return read_weight_file(folder / single)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"{folder} has no model.safetensors, pytorch_model.bin or a shard index (found {found})")


def read_hf_folder(folder: PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json as a dict, {tensor name: tensor})`` of a Hugging Face checkpoint folder."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a Hugging Face checkpoint folder "
                                "(config.json + model.safetensors, shards with an index, or pytorch_model.bin)")
    config = read_json(cfg_path)
    if not isinstance(config, dict):
        raise HFCheckpointError(f"{cfg_path} must hold a JSON object, found {type(config).__name__}")
    return config, read_hf_weights(folder)


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

    def __init__(self, tensors: dict[str, Tensor], ignored_suffixes: tuple[str, ...] = ()) -> None:
        self.tensors, self.taken, self.ignored = tensors, set(), ignored_suffixes

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise HFCheckpointError(f"the checkpoint lacks tensor {name!r} that its config.json implies; the "
                                    "config and the weights do not belong together (or a shard is incomplete)")
        self.taken.add(name)
        return self.tensors[name]

    def take_linear(self, out: dict[str, Tensor], zoo_name: str, hf_name: str, bias: Optional[bool] = None) -> None:
        """``out[zoo_name.weight] (and .bias)`` from ``hf_name``; ``bias=None``: the bias if the checkpoint has it."""
        out[f"{zoo_name}.weight"] = self.take(f"{hf_name}.weight")
        if bias or (bias is None and f"{hf_name}.bias" in self):
            out[f"{zoo_name}.bias"] = self.take(f"{hf_name}.bias")

    def left(self) -> list[str]:
        return sorted(n for n in self.tensors if n not in self.taken and not n.endswith(self.ignored))
