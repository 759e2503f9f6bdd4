"""Model creation: ``create_model(name, pretrained=..., **overrides)`` -> a built model with its weights loaded.

Names: a preset (``"vmoe_tiny_digits"``), a preset with a weights tag (``"vmoe_tiny_digits.digits"``, as
:func:`zoo.list_pretrained` lists them; timm's ``name.tag``), or a published folder (``"hf-hub:org/repo[@rev]"``,
``"local-dir:PATH"``). Tags live in the preset YAML's ``pretrained:`` mapping (``tag -> {hf_hub_id, file, sha256,
local_dir, ...}``); a tag loads from ``weights/<local_dir>/`` when that folder exists (``ZOO_WEIGHTS`` moves the
weights root; an installed wheel carries the project's weights), else from ``hf_hub_id`` through the hub cache.
Every recorded sha256 is checked (:func:`zoo.hub.verify_sha256`).

Imports the registry (data), the hub (file I/O) and the checked loader; none of them imports this module.
"""

from __future__ import annotations

from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from torch import nn

from zoo.checkpoint import load_state_dict_checked
from zoo.config import ConfigError, close_matches, from_dict, merge
from zoo.errors import CheckpointMismatchError, WeightsNotFoundError
from zoo.hub import (CONFIG_NAME, HF_HUB_PREFIX, LOCAL_DIR_PREFIX, WEIGHTS_NAME, PathLike, fetch_file, fetch_weights,
                     hub_download, is_source, read_config_file, read_meta, read_weights)
from zoo.registry import (build_model, default_tag, family_of, get_family, load_preset, model_config,
                          pretrained_tags, preset_file, weights_dir)

__all__ = ["create_model", "from_pretrained", "load_pretrained", "parse_model_name", "tag_weights_path"]


def parse_model_name(name: str) -> tuple[str, Optional[str]]:
    """``"vmoe_tiny_digits.digits"`` -> ("vmoe_tiny_digits", "digits"); a plain preset name -> (name, None).

    A dot is a tag separator only when the text before it is a preset and the name itself is not one, so preset
    names keep working whatever they hold."""
    if is_source(name) or "." not in name:
        return name, None
    try:
        preset_file(name)
        return name, None
    except ConfigError:
        pass
    preset, tag = name.rsplit(".", 1)
    try:
        preset_file(preset)
    except ConfigError:
        return name, None  # let the caller's lookup report the unknown name with its close matches
    return preset, tag


def _unknown_tag_message(name: str, tag: str, tags: Mapping[str, Any]) -> str:
    hint = close_matches(tag, tags)
    return (f"preset {name!r} has no pretrained tag {tag!r}"
            + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else "")
            + f" Tags: {sorted(tags) or 'none'}. Or pass 'hf-hub:org/repo' / 'local-dir:PATH'.")


def _overrides_num_classes(overrides: Mapping[str, Any]) -> bool:
    return "num_classes" in overrides


def _attach(model: nn.Module, info: dict[str, Any]) -> nn.Module:
    model.pretrained_cfg = info  # like timm: where the weights came from, input size/mean/std, metrics
    return model


def _recorded_sha256(meta: Mapping[str, Any], path: Path) -> Optional[str]:
    """The sha256 ``pretrained.json`` records for weights file ``path`` (None if it records none for that file)."""
    if meta.get("sha256") and meta.get("file", WEIGHTS_NAME) == path.name:
        return str(meta["sha256"])
    return None


def load_pretrained(model: nn.Module, source: Union[str, PathLike], *, sha256: Optional[str] = None,
                    filename: Optional[str] = None, reset_head: bool = False,
                    cache_dir: Optional[PathLike] = None) -> nn.Module:
    """Load weights into ``model`` from ``"hf-hub:org/repo"``, ``"local-dir:PATH"`` or a weights file path.

    The source's ``config.json`` (if any) must name the model's family; its differences from the model's config are
    listed in any mismatch error. The weights file's sha256 is checked against ``sha256`` or, for a published
    folder, the one its ``pretrained.json`` records.
    """
    source = str(source)
    recorded_in = "the sha256 argument"
    if is_source(source):
        ckpt_config = None
        cfg_path = fetch_file(source, CONFIG_NAME, cache_dir=cache_dir, required=False)
        if cfg_path is not None:
            family, ckpt_config = read_config_file(cfg_path, source)
            own = family_of(model.config) if is_dataclass(getattr(model, "config", None)) else None
            if own is not None and family != own:
                raise CheckpointMismatchError(f"{source} holds a {family!r} model, expected a {own!r} model")
        path = fetch_weights(source, filename=filename, cache_dir=cache_dir)
        meta = read_meta(source, cache_dir=cache_dir)
        if not sha256:
            sha256, recorded_in = _recorded_sha256(meta, path), f"{source} pretrained.json"
    else:
        path, ckpt_config, meta = Path(source), None, {}
    state_dict = read_weights(path, sha256 or None, recorded_in)
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


def create_model(name: str, pretrained: Any = None, **overrides: Any) -> nn.Module:
    """Build preset ``name``; keyword overrides change its config, e.g.
    ``create_model("vmoe_s32", num_classes=10, encoder={"moe": {"num_experts": 4}})`` or
    ``create_model("vmoe_s32", **{"encoder.moe.top_k": 1})``. Unknown names or keys raise a
    :class:`ConfigError` that lists close matches.

    ``pretrained``: ``True`` = the preset's default tag, ``"tag"`` = a tag of the preset's ``pretrained:`` section
    (from ``weights/`` if present, else the Hugging Face hub), ``"hf-hub:org/repo"`` or ``"local-dir:PATH"`` =
    weights from there. ``name`` may be ``"preset.tag"`` (as :func:`zoo.list_pretrained` lists them; as in timm,
    ``pretrained=True`` loads that tag, without it the model is built as the tag's weights need), or ``"hf-hub:org/repo"`` / ``"local-dir:PATH"``: the config comes from that
    folder's ``config.json`` and its weights are loaded unless ``pretrained=False``.
    """
    if not isinstance(name, str):
        raise ConfigError(f"the model name must be a str (a preset such as 'vmoe_tiny_digits', 'preset.tag', "
                          f"'hf-hub:org/repo' or 'local-dir:PATH'), got {name!r}; zoo.list_models() lists the presets")
    if is_source(name):
        return from_pretrained(name, True if pretrained is None else pretrained, **overrides)
    name, name_tag = parse_model_name(name)
    if name_tag is not None:
        if pretrained not in (None, True, False, name_tag):
            raise ConfigError(f"{name}.{name_tag} already names the weights tag {name_tag!r}; pretrained="
                              f"{pretrained!r} contradicts it (use pretrained=True/False or the plain preset name)")
        tags = pretrained_tags(name)
        if name_tag not in tags:
            raise ConfigError(_unknown_tag_message(name, name_tag, tags))
        if pretrained in (None, False):  # as timm: the tag picks the weights, pretrained=True loads them
            merged = merge(tags[name_tag].get("overrides") or {}, overrides)
            return build_model(load_preset(name)["family"], model_config(name, **merged))
        pretrained = name_tag
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
            raise ConfigError(_unknown_tag_message(name, tag, tags))
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
    state_dict = read_weights(path, entry.get("sha256"), f"preset {name!r} tag {tag!r}")
    notes = load_state_dict_checked(model, state_dict, source=f"{name}.{tag} ({path})",
                                    checkpoint_config=ckpt_config, reset_head=_overrides_num_classes(overrides))
    info = {"preset": name, "tag": tag, "source": source, "file": str(path), "notes": notes}
    info.update({k: entry[k] for k in ("input", "metrics", "data", "license", "hf_hub_id", "sha256") if k in entry})
    return _attach(model, info)
