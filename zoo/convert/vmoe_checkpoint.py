"""Reader for Google's V-MoE checkpoints (``google-research/vmoe``, ``vmoe/checkpoints``) with msgpack + numpy
only: no JAX, Flax or TensorFlow.

Format (written by ``vmoe.checkpoints.partitioned.save_checkpoint``; both files are msgpack):

* ``PREFIX.index``: ``{"shard_count": N, "version": "20220622" (absent in pre-2022-06 checkpoints),
  "index": <nested dict of the saved tree with IndexInfo leaves>}``.
* ``PREFIX.data-0000i-of-0000N``: ``{"__msgpack_array_chunk_a87ca2__": True, "<leaf id>": [[[1-D sub-chunk
  ndarray, ...], SliceNd], ...]}``; the sub-chunks of one entry concatenate to the block of the global array that
  the SliceNd selects.
* A leaf id is the position of the leaf when the index tree is flattened the way ``jax.tree_util`` flattens nested
  dicts: sorted keys at every level.
* msgpack ext types: 1 ndarray ``(shape, dtype name, C-order bytes)``, 2 complex, 3 numpy scalar, 4 ShapedArray
  ``(shape, dtype name, weak_type, {})``, 5 Slice ``(start, stop, step)``, 6 SliceNd (tuple of Slice payloads),
  8 IndexInfo ``(ShapedArray payload, tuple of SliceNd payloads, shard ids)``.

A single-file Flax msgpack state dict (``flax.serialization.to_bytes``) is read too (``read_flax_msgpack``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

import msgpack
import numpy as np

CHUNKS_MAGIC = "__msgpack_array_chunk_a87ca2__"
FLAX_CHUNKED = "__msgpack_chunked_array__"
SUPPORTED_VERSIONS = (None, "20220622")

PathLike = Union[str, os.PathLike]


class VMoECheckpointError(ValueError):
    """The files are not a (complete, readable) V-MoE checkpoint."""


@dataclass(frozen=True)
class ShapedArray:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class IndexInfo:
    global_shape: ShapedArray
    global_slices: tuple[tuple[tuple[Any, Any, Any], ...], ...]
    shards: tuple[int, ...]


def _dtype(name: Union[bytes, str]) -> str:
    return name.decode() if isinstance(name, bytes) else name


def _ndarray(data: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    name = _dtype(dtype_name)
    if name == "bfloat16":  # no numpy bfloat16 without ml_dtypes: widen the 16 bits to float32 exactly
        bits = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    try:
        dtype = np.dtype(name)
    except TypeError as err:
        raise VMoECheckpointError(f"unsupported array dtype {name!r} in the checkpoint") from err
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _slice(data: bytes) -> tuple[Any, Any, Any]:
    start, stop, step = msgpack.unpackb(data, raw=True)
    return (start, stop, step)


def _slice_nd(data: bytes) -> tuple[tuple[Any, Any, Any], ...]:
    return tuple(_slice(s) for s in msgpack.unpackb(data, raw=True))


def _shaped_array(data: bytes) -> ShapedArray:
    shape, dtype_name, _weak, _ = msgpack.unpackb(data, raw=True)
    return ShapedArray(tuple(int(s) for s in shape), _dtype(dtype_name))


def _ext_hook(code: int, data: bytes) -> Any:
    if code == 1:
        return _ndarray(data)
    if code == 2:
        re_, im = msgpack.unpackb(data)
        return complex(re_, im)
    if code == 3:
        return _ndarray(data)[()]
    if code == 4:
        return _shaped_array(data)
    if code == 5:
        return _slice(data)
    if code == 6:
        return _slice_nd(data)
    if code == 8:
        shaped, slices, shards = msgpack.unpackb(data, raw=True)
        return IndexInfo(_shaped_array(shaped), tuple(_slice_nd(s) for s in slices), tuple(int(s) for s in shards))
    raise VMoECheckpointError(f"unsupported msgpack extension type {code} (not written by vmoe/flax)")


def _unpack(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return msgpack.unpackb(f.read(), raw=False, ext_hook=_ext_hook, strict_map_key=False)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException, ValueError, TypeError,
            OverflowError) as err:  # random bytes can decode to unhashable map keys or out-of-range ints
        if isinstance(err, VMoECheckpointError):  # raised inside the unpacking (an extension's payload): name the file
            raise VMoECheckpointError(f"{path}: {err}") from err
        raise VMoECheckpointError(f"{path} is not a readable msgpack file (truncated or another format?): "
                                  f"{type(err).__name__}: {err}") from err


def flatten_tree(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """``("Encoder/encoderblock_0/...", leaf)`` in jax.tree_util order for nested dicts (sorted keys)."""
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from flatten_tree(tree[key], prefix + (str(key),))
    elif isinstance(tree, (list, tuple)) and not isinstance(tree, IndexInfo):
        for i, v in enumerate(tree):
            yield from flatten_tree(v, prefix + (str(i),))
    else:
        yield "/".join(prefix), tree


def _unchunk_flax(tree: Any) -> Any:
    if isinstance(tree, dict):
        if tree.get(FLAX_CHUNKED):
            shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
            flat = np.concatenate([tree["chunks"][str(i)] for i in range(len(tree["chunks"]))])
            return flat.reshape(shape)
        return {k: _unchunk_flax(v) for k, v in tree.items()}
    return tree


def shard_paths(prefix: PathLike, shard_count: int) -> list[Path]:
    return [Path(f"{prefix}.data-{i:05d}-of-{shard_count:05d}") for i in range(shard_count)]


def read_index(prefix: PathLike) -> dict[str, Any]:
    path = Path(f"{prefix}.index")
    if not path.is_file():
        folder = path.parent
        found = sorted(p.name for p in folder.iterdir())[:20] if folder.is_dir() else "no such folder"
        raise VMoECheckpointError(f"V-MoE checkpoint index {path} not found (give the prefix without "
                                  f"'.index'); {folder} holds {found}")
    index = _unpack(path)
    if not isinstance(index, dict) or "index" not in index or "shard_count" not in index:
        keys = sorted(index) if isinstance(index, dict) else type(index).__name__
        raise VMoECheckpointError(f"{path} is not a vmoe checkpoint index: expected keys 'index', 'shard_count' "
                                  f"(and 'version'), found {keys}")
    if index.get("version") not in SUPPORTED_VERSIONS:
        raise VMoECheckpointError(f"{path}: unsupported checkpoint version {index.get('version')!r}; "
                                  f"supported: {SUPPORTED_VERSIONS}")
    return index


def read_vmoe_checkpoint(prefix: PathLike) -> dict[str, np.ndarray]:
    """``{"Encoder/encoderblock_0/LayerNorm_0/scale": array, ...}`` from ``PREFIX.index`` + data shards.

    Raises :class:`VMoECheckpointError` naming what is wrong: a missing index or shard, an unreadable file, a chunk
    that does not fit its array, or an array not fully covered by the shards (truncated / incomplete checkpoint).
    """
    index = read_index(prefix)
    shard_count = int(index["shard_count"])
    leaves = list(flatten_tree(index["index"]))
    infos = []
    for name, info in leaves:
        if not isinstance(info, IndexInfo):
            raise VMoECheckpointError(f"{prefix}.index: leaf {name!r} is {type(info).__name__}, not IndexInfo")
        infos.append(info)
    arrays = [np.zeros(i.global_shape.shape, dtype=np.float32 if i.global_shape.dtype == "bfloat16"
                       else np.dtype(i.global_shape.dtype)) for i in infos]
    covered = [0] * len(arrays)
    missing = [p for p in shard_paths(prefix, shard_count) if not p.is_file()]
    if missing:
        raise VMoECheckpointError(f"missing checkpoint shard(s) {[str(p) for p in missing]} "
                                  f"(the index says shard_count={shard_count})")
    for path in shard_paths(prefix, shard_count):
        data = _unpack(path)
        if not isinstance(data, dict) or data.get(CHUNKS_MAGIC) is not True:
            raise VMoECheckpointError(f"{path} is not a vmoe checkpoint data shard (no {CHUNKS_MAGIC} marker)")
        for key, chunks in data.items():
            if key == CHUNKS_MAGIC:
                continue
            i = int(key)
            if not 0 <= i < len(arrays):
                raise VMoECheckpointError(f"{path}: chunk for leaf id {i}, but the index has {len(arrays)} leaves")
            name = leaves[i][0]
            for subchunks, gslice in chunks:
                flat = np.concatenate([np.asarray(s).reshape(-1) for s in subchunks]) if subchunks else np.zeros(0)
                shape = arrays[i].shape
                if len(gslice) != len(shape):
                    raise VMoECheckpointError(f"{path}: {name}: slice {gslice} does not fit shape {shape}")
                sl = tuple(slice(int(a or 0), int(b if b is not None else n)) for (a, b, _), n in zip(gslice, shape))
                extent = tuple(s.stop - s.start for s in sl)
                if any(s.start < 0 or s.stop > n for s, n in zip(sl, shape)) or flat.size != int(np.prod(extent)):
                    raise VMoECheckpointError(f"{path}: {name}: chunk of {flat.size} values for slice {gslice} of "
                                              f"an array of shape {shape} (truncated or damaged shard)")
                arrays[i][sl] = flat.reshape(extent)
                covered[i] += flat.size
    for (name, info), arr, n in zip(leaves, arrays, covered):
        if n != arr.size:
            raise VMoECheckpointError(f"{name}: the data shards hold {n} of its {arr.size} values "
                                      f"(shape {arr.shape}): incomplete checkpoint")
    return {name: arr for (name, _), arr in zip(leaves, arrays)}


def read_flax_msgpack(path: PathLike) -> dict[str, np.ndarray]:
    """A single-file Flax msgpack state dict -> flat ``{"a/b/c": array}``."""
    tree = _unchunk_flax(_unpack(Path(path)))
    out = {}
    for name, leaf in flatten_tree(tree):
        if isinstance(leaf, np.ndarray) or np.isscalar(leaf):
            out[name] = np.asarray(leaf)
    return out


def read_checkpoint(prefix: PathLike) -> dict[str, np.ndarray]:
    """A vmoe partitioned checkpoint (``PREFIX.index`` exists) or a single Flax msgpack file (``PREFIX``)."""
    if Path(f"{prefix}.index").is_file() or not Path(prefix).is_file():
        return read_vmoe_checkpoint(prefix)
    return read_flax_msgpack(prefix)
