"""Official V-MoE checkpoint conversion: parity with the official logits (tests/fixtures/vmoe_official, written by
google-research/vmoe itself), the CLI, another resolution, and loud failures on bad checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

import zoo
from zoo.config import ConfigError, to_dict
from zoo.convert import VMoECheckpointError, config_from_official, convert_vmoe, read_vmoe_checkpoint
from zoo.convert.vmoe_checkpoint import flatten_tree

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "vmoe_official"
PREFIX = FIXTURE / "vmoe_tiny"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURE / "images.npy")).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW


@pytest.fixture(scope="module")
def official_params() -> dict[str, np.ndarray]:
    return read_vmoe_checkpoint(PREFIX)


def _logits(model, images):
    with torch.no_grad():
        return model.eval()(images).logits.numpy()


def test_reader_matches_param_listing(official_params):
    listing = json.loads((FIXTURE / "params.json").read_text())
    assert set(official_params) == set(listing)
    for name, info in listing.items():
        assert list(official_params[name].shape) == info["shape"]
        assert official_params[name].dtype == np.dtype(info["dtype"])
    # leaf ids follow jax's sorted-key flattening
    assert [n for n, _ in flatten_tree({k: None for k in listing})] == sorted(listing, key=lambda k: listing[k]["index"])


@pytest.mark.parametrize("capacity_factor,logits_file", [(2.0, "logits.npy"), (1.0, "logits_cf1.npy")])
def test_parity_with_official_logits(images, capacity_factor, logits_file):
    """fp32, max abs diff <= 1e-4; cf=1.0 drops tokens, so batch-priority order and capacity rounding count."""
    model = convert_vmoe(PREFIX, config=FIXTURE / "config.json", capacity_factor=capacity_factor)
    cfg = model.config
    assert (cfg.encoder.moe.group_size, cfg.encoder.moe.top_k, cfg.encoder.moe.batch_priority) == (2, 2, True)
    assert cfg.encoder.moe_layer_indices == (1, 3) and cfg.encoder.norm_eps == 1e-6
    ref = np.load(FIXTURE / logits_file)
    diff = np.abs(_logits(model, images) - ref).max()
    assert diff <= 1e-4, f"max abs diff to the official logits {diff:.3g}"


def test_config_inferred_from_checkpoint_alone(images):
    model = convert_vmoe(PREFIX, capacity_factor=1.0, group_size=2, batch_priority=True)
    assert np.abs(_logits(model, images) - np.load(FIXTURE / "logits_cf1.npy")).max() <= 1e-4
    official = config_from_official(json.loads((FIXTURE / "config.json").read_text()), in_chans=3)
    inferred = to_dict(model.config)
    official = to_dict(official)
    for key in ("image_size", "patch_size", "num_classes", "classifier", "representation_size"):
        assert inferred[key] == official[key]
    for key in ("dim", "depth", "num_heads", "mlp_dim", "moe_layers"):
        assert inferred["encoder"][key] == official["encoder"][key]


def test_cli_writes_folder_that_create_model_loads(tmp_path, images):
    out = tmp_path / "vmoe_tiny_converted"
    proc = subprocess.run([sys.executable, "-m", "zoo.convert", "vmoe", "--checkpoint", str(PREFIX),
                           "--config", str(FIXTURE / "config.json"), "--capacity-factor", "1.0",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    model = zoo.create_model(f"local-dir:{out}")
    assert np.abs(_logits(model, images) - np.load(FIXTURE / "logits_cf1.npy")).max() <= 1e-4
    assert model.pretrained_cfg["input"]["mean"] == [0.5, 0.5, 0.5]  # official value_range(-1, 1)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["family"] == "vmoe" and cfg["encoder"]["moe"]["capacity_factor"] == 1.0


def _native_weights_with_pos_embed(native, cfg, pos_embed: torch.Tensor):
    """A model of config ``cfg`` with the native-resolution converted weights and ``pos_embed`` swapped in: the
    reference for a conversion at another resolution (everything but the position embedding is resolution-free)."""
    from zoo.models.vmoe import VMoE

    ref = VMoE(cfg).eval()
    state = {k: v for k, v in native.state_dict().items() if k != "pos_embed"}
    ref.load_state_dict({**state, "pos_embed": pos_embed}, strict=True)
    return ref


@pytest.mark.parametrize("rule", ["zoo", "vmoe"])
def test_other_resolution_resizes_position_embeddings(images, rule):
    """Converted at 64 px (8x8 grid from the checkpoint's 4x4): the logits equal those of the native conversion
    with only its position embedding resized, by :func:`zoo.layers.resize_pos_embed` ("zoo") or by the official
    ``vit_zoom`` rule, ``scipy.ndimage.zoom(order=1)`` on the grid ("vmoe")."""
    model = convert_vmoe(PREFIX, config=FIXTURE / "config.json", image_size=64, pos_embed_resize=rule)
    assert model.pos_embed.shape == (1, 1 + 64, 32) and model.config.encoder.moe.group_size == 2
    native = convert_vmoe(PREFIX, config=FIXTURE / "config.json")
    pos = native.pos_embed.detach()
    if rule == "zoo":
        from zoo.layers.embeddings import resize_pos_embed

        resized = resize_pos_embed(pos, 8)
    else:
        scipy_ndimage = pytest.importorskip("scipy.ndimage")
        grid = scipy_ndimage.zoom(pos[:, 1:].numpy().reshape(1, 4, 4, 32), (1, 2, 2, 1), order=1)
        resized = torch.cat([pos[:, :1], torch.from_numpy(grid.reshape(1, 64, 32))], dim=1)
    reference = _native_weights_with_pos_embed(native, model.config, resized)
    x = torch.nn.functional.interpolate(images, size=64, mode="bilinear", align_corners=False)
    ours, ref = _logits(model, x), _logits(reference, x)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    # and the resize matters: the two rules give different logits at this resolution
    assert np.abs(ours - _logits(convert_vmoe(PREFIX, config=FIXTURE / "config.json", image_size=64,
                                              pos_embed_resize="vmoe" if rule == "zoo" else "zoo"), x)).max() > 1e-3
    # the CLS position is kept as is
    torch.testing.assert_close(model.pos_embed[:, 0], native.pos_embed[:, 0])


def test_official_vit_zoom_resize_matches_scipy(official_params):
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    from zoo.convert.vmoe import vit_zoom_pos_embed

    pos = official_params["Encoder/posembed_input/pos_embedding"]  # [1, 17, 32]: CLS + 4x4
    ours = vit_zoom_pos_embed(pos, 8)
    grid = pos[:, 1:].reshape(1, 4, 4, 32)
    ref = scipy_ndimage.zoom(grid, (1, 2, 2, 1), order=1).reshape(1, 64, 32)
    np.testing.assert_allclose(ours[:, 1:], ref, atol=1e-6)
    np.testing.assert_array_equal(ours[:, :1], pos[:, :1])
    model = convert_vmoe(PREFIX, config=FIXTURE / "config.json", image_size=64, pos_embed_resize="vmoe")
    np.testing.assert_allclose(model.pos_embed.detach().numpy(), ours, atol=1e-6)


# --------------------------------------------------------------------------- bad checkpoints fail loudly
def _write_checkpoint(prefix: Path, flat: dict[str, np.ndarray], num_shards: int = 1) -> None:
    """Our own writer of the vmoe partitioned format (see zoo/convert/vmoe_checkpoint.py for the layout); big
    leaves are split into two chunks in different shards."""
    pack = lambda obj: msgpack.packb(obj, use_bin_type=True)  # noqa: E731
    sl = lambda a, b: pack((a, b, None))  # noqa: E731
    tree: dict = {}
    for name, arr in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr
    names = [n for n, _ in flatten_tree(tree)]
    shards: list[dict] = [{"__msgpack_array_chunk_a87ca2__": True} for _ in range(num_shards)]
    infos = {}
    for i, name in enumerate(names):
        arr = np.ascontiguousarray(flat[name])
        shaped = pack((list(arr.shape), arr.dtype.name, False, {}))
        if arr.ndim and arr.shape[0] >= 2 and num_shards > 1:
            half = arr.shape[0] // 2
            pieces = [(0, half), (half, arr.shape[0])]
        else:
            pieces = [(0, arr.shape[0])] if arr.ndim else [None]
        slices, shard_ids = [], []
        for j, piece in enumerate(pieces):
            if piece is None:
                nd_slice, block = pack(()), arr
            else:
                a, b = piece
                nd_slice = pack(tuple([sl(a, b)] + [sl(0, n) for n in arr.shape[1:]]))
                block = arr[a:b]
            shard = (i + j) % num_shards
            data = msgpack.ExtType(1, pack((list(block.reshape(-1).shape), block.dtype.name, block.tobytes())))
            shards[shard].setdefault(str(i), []).append([[data], msgpack.ExtType(6, nd_slice)])
            slices.append(nd_slice)
            shard_ids.append(shard)
        infos[name] = msgpack.ExtType(8, pack((shaped, tuple(slices), tuple(shard_ids))))
    index_tree: dict = {}
    for name, info in infos.items():
        node = index_tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = info
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.index").write_bytes(pack({"shard_count": num_shards, "index": index_tree,
                                              "version": "20220622"}))
    for s, content in enumerate(shards):
        Path(f"{prefix}.data-{s:05d}-of-{num_shards:05d}").write_bytes(pack(content))


def test_own_writer_multi_shard_roundtrip(tmp_path, official_params, images):
    prefix = tmp_path / "two_shards" / "ckpt"
    _write_checkpoint(prefix, official_params, num_shards=2)
    again = read_vmoe_checkpoint(prefix)
    assert set(again) == set(official_params)
    for k in again:
        np.testing.assert_array_equal(again[k], official_params[k])
    model = convert_vmoe(prefix, config=FIXTURE / "config.json")
    assert np.abs(_logits(model, images) - np.load(FIXTURE / "logits.npy")).max() <= 1e-4


def test_missing_index_and_shard(tmp_path, official_params):
    with pytest.raises(VMoECheckpointError, match=r"index .*nope.index not found"):
        read_vmoe_checkpoint(tmp_path / "nope")
    prefix = tmp_path / "c" / "ckpt"
    _write_checkpoint(prefix, official_params, num_shards=2)
    Path(f"{prefix}.data-00001-of-00002").unlink()
    with pytest.raises(VMoECheckpointError, match=r"missing checkpoint shard.*data-00001-of-00002.*shard_count=2"):
        read_vmoe_checkpoint(prefix)


def test_truncated_shard_and_foreign_file(tmp_path, official_params):
    prefix = tmp_path / "c" / "ckpt"
    _write_checkpoint(prefix, official_params)
    shard = Path(f"{prefix}.data-00000-of-00001")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(VMoECheckpointError, match="not a readable msgpack file"):
        read_vmoe_checkpoint(prefix)
    Path(f"{prefix}.index").write_bytes(msgpack.packb({"step": 3, "params": {}}))
    with pytest.raises(VMoECheckpointError, match=r"not a vmoe checkpoint index.*found \['params', 'step'\]"):
        read_vmoe_checkpoint(prefix)
    Path(f"{prefix}.index").write_bytes(b"\x89PNG not msgpack at all")
    with pytest.raises(VMoECheckpointError):
        read_vmoe_checkpoint(prefix)


def test_incomplete_chunk_coverage(tmp_path, official_params):
    prefix = tmp_path / "c" / "ckpt"
    _write_checkpoint(prefix, official_params, num_shards=2)
    # drop one of the two chunks of a split leaf from its shard
    shard = Path(f"{prefix}.data-00000-of-00002")
    content = msgpack.unpackb(shard.read_bytes(), raw=False, strict_map_key=False)
    leaf_id = next(k for k, v in content.items() if k != "__msgpack_array_chunk_a87ca2__" and len(v) == 1
                   and int(k) in range(0, 74, 2))
    del content[leaf_id]
    shard.write_bytes(msgpack.packb(content, use_bin_type=True))
    with pytest.raises(VMoECheckpointError, match="incomplete checkpoint"):
        read_vmoe_checkpoint(prefix)


def test_unknown_and_missing_parameters(tmp_path, official_params):
    extra = dict(official_params)
    extra["Encoder/encoderblock_0/SelfAttention/query_norm/scale"] = np.ones(16, np.float32)
    prefix = tmp_path / "extra" / "ckpt"
    _write_checkpoint(prefix, extra)
    with pytest.raises(VMoECheckpointError, match=r"1 checkpoint parameter\(s\) have no place.*query_norm"):
        convert_vmoe(prefix, config=FIXTURE / "config.json")
    fewer = {k: v for k, v in official_params.items() if k != "Encoder/encoderblock_3/Moe/Mlp/Dense_1/bias"}
    prefix = tmp_path / "fewer" / "ckpt"
    _write_checkpoint(prefix, fewer)
    with pytest.raises(VMoECheckpointError, match=r"missing 'Encoder/encoderblock_3/Moe/Mlp/Dense_1/bias'"):
        convert_vmoe(prefix, config=FIXTURE / "config.json")
    # a config that disagrees with the weights: pre-logits the checkpoint does not have
    raw = json.loads((FIXTURE / "config.json").read_text())
    raw["model_kwargs"]["representation_size"] = 32
    with pytest.raises(VMoECheckpointError, match=r"missing 'pre_logits/kernel'"):
        convert_vmoe(PREFIX, config=raw)
    # ... and one whose MoE placement / sizes differ: shape errors say expected vs found
    raw = json.loads((FIXTURE / "config.json").read_text())
    raw["model_kwargs"]["encoder"]["mlp_dim"] = 128
    with pytest.raises(zoo.hub.CheckpointMismatchError, match=r"expected \[128, 32\] \(model\), found \[64, 32\]"):
        convert_vmoe(PREFIX, config=raw)


def test_official_config_mapping_errors():
    raw = json.loads((FIXTURE / "config.json").read_text())
    kw = raw["model_kwargs"]
    with pytest.raises(ConfigError, match="whole number of images"):
        config_from_official({**kw, "encoder": {**kw["encoder"], "moe": {**kw["encoder"]["moe"], "group_size": 30}}},
                             image_size=32)
    with pytest.raises(ConfigError, match="classifier 'map'"):
        config_from_official({**kw, "classifier": "map"}, image_size=32)
    bad_router = {**kw["encoder"]["moe"]["router"], "name": "NoisyTopItemsPerExpertRouter"}
    with pytest.raises(ConfigError, match="NoisyTopItemsPerExpertRouter"):
        config_from_official({**kw, "encoder": {**kw["encoder"], "moe": {**kw["encoder"]["moe"],
                                                                         "router": bad_router}}}, image_size=32)
    with pytest.raises(ConfigError, match=r"unsupported key\(s\) \['frobnicate'\]"):
        config_from_official({**kw, "frobnicate": 1}, image_size=32)
    with pytest.raises(ConfigError, match="image size"):
        config_from_official(kw)


def test_published_list_and_unsupported(capsys):
    from zoo.convert.__main__ import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("vmoe_s32_last2_ilsvrc2012_randaug_light1", "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",
                 "eee_s32_last2_ilsvrc2012"):
        assert name in out
    with pytest.raises(ConfigError, match="E\\^3"):
        convert_vmoe(Path("/nonexistent/eee_s32_last2_ilsvrc2012"))


@pytest.mark.parametrize("payload", [
    bytes([0x81, 0x81, 0x01, 0x02, 0x03]),  # a map whose key is a map (unhashable once decoded)
    bytes([0xd4, 118, 0x00]),  # an extension type vmoe / flax never write
    bytes([0x91, 0x81]),  # truncated
], ids=["unhashable-key", "unknown-extension", "truncated"])
def test_an_unreadable_index_is_named_in_the_error(tmp_path, payload):
    """Whatever garbage the index holds, the error is a VMoECheckpointError naming the file (the reliability sweep
    feeds random bytes; some decoded to unhashable map keys and escaped as TypeError)."""
    from zoo.convert.vmoe_checkpoint import VMoECheckpointError, read_checkpoint

    prefix = tmp_path / "garbage_ckpt"
    (tmp_path / "garbage_ckpt.index").write_bytes(payload)
    with pytest.raises(VMoECheckpointError, match="garbage_ckpt"):
        read_checkpoint(prefix)
