"""Splicing media tokens into a text sequence, for vision- and audio-language models (MoE-LLaVA, Uni-MoE).

A prompt holds one PLACEHOLDER id per media item (``IMAGE_TOKEN_ID = -200`` as the official LLaVA / MoE-LLaVA code,
``AUDIO_TOKEN_ID = -300``). :func:`splice_media` replaces each placeholder by that item's feature tokens (already
projected to the LM width), embeds the text tokens, and returns one right-padded batch:

    input_ids [B, L] (with placeholders, any padding)            media {placeholder id: features}
        -> drop padding -> per sample: text | item tokens | text | ...  -> truncate -> pad
        -> inputs_embeds [B, S', D], attention_mask [B, S'], labels [B, S'], modality [B, S'], positions ...

Semantics follow ``prepare_inputs_labels_for_multimodal`` of the official MoE-LLaVA code (``llava_arch.py``):

- padding of ``input_ids`` (``attention_mask`` False) is dropped first, so a left- or right-padded prompt splices
  alike;
- media tokens take ``IGNORE_INDEX`` labels, text tokens keep theirs;
- each sample is truncated to ``max_length`` (the official ``tokenizer_model_max_length``; None = no truncation, as
  the official training script leaves it unset), then all are padded on ``padding_side`` (official default
  "right") with zero embeddings, ``IGNORE_INDEX`` labels, a False mask and position id 0;
- a sample with no placeholder ignores the item given for it (the official code skips one image per such sample).

Where the zoo differs on purpose: the official code hands out images with ONE counter over the whole batch (sample b
with two placeholders takes images b and b + 1 and shifts every later sample's image); here ``features[b]`` always
belongs to sample b, and a sample with more placeholders than items is an error saying so. Unused media features are
kept in the autograd graph with a zero gradient (``features[:0].sum()`` added), as the official empty concatenation
does, so data-parallel training sees the tower and projector used in a text-only batch.

Media for one placeholder id (the ``media`` mapping's values) is either

- a tensor ``[B, N, D]`` (one item per sample, e.g. projected image patches; ``[B, C, Q, D]`` = one item of C
  chunks of Q tokens, concatenated), or
- a sequence of B entries, each ``None`` (no item), one item, or a list of items (consumed by that sample's
  placeholders in order). An item is ``[N, D]``, or ``[C, Q, D]``: C chunks whose tokens are concatenated into one
  placeholder (Uni-MoE's long audio: every 30 s chunk gives Q query tokens).

Modality ids (for MoE routers' per-modality statistics and losses): ``TEXT = 0``, ``IMAGE = 1``, ``VIDEO = 2``,
``AUDIO = 3``; each placeholder id maps to one (``PLACEHOLDER_MODALITY``, overridable per call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.models.output import ModelOutput
from zoo.moe.compiled import compiled_once

IGNORE_INDEX = -100
IMAGE_TOKEN_ID = -200
AUDIO_TOKEN_ID = -300
VIDEO_TOKEN_ID = -400  # the zoo's (zoo.data.templates); official Uni-MoE v1 has no video placeholder

TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3
MODALITY_NAMES = ("text", "image", "video", "audio")
NUM_MODALITIES = len(MODALITY_NAMES)
PLACEHOLDER_MODALITY: dict[int, int] = {IMAGE_TOKEN_ID: IMAGE, AUDIO_TOKEN_ID: AUDIO, VIDEO_TOKEN_ID: VIDEO}
PLACEHOLDER_NAMES: dict[int, str] = {IMAGE_TOKEN_ID: "<image>", AUDIO_TOKEN_ID: "<audio>", VIDEO_TOKEN_ID: "<video>"}

Item = Tensor  # [N, D] or [C, Q, D]
SampleMedia = Union[None, Item, Sequence[Item]]
MediaFeatures = Union[Tensor, Sequence[SampleMedia]]


@dataclass
class SplicedBatch:
    """The output of :func:`splice_media`. S' = the longest spliced (truncated) sample.

    Attributes:
        inputs_embeds: [B, S', D] text embeddings and media tokens, zeros at padding.
        attention_mask: [B, S'] bool, True = real token.
        labels: [B, S'] (IGNORE_INDEX at media tokens and padding) or None when no labels were given.
        modality: [B, S'] long modality ids (TEXT at text tokens and padding).
        position_ids: [B, S'] long, 0..len-1 over each sample's real tokens, 0 at padding (the official layout).
        token_positions: [B, L] long, the position map: where input token (b, i) landed in the spliced sequence; for
            a placeholder, the position of its item's first token; -1 for padding, a truncated token, or an empty
            item.
        lengths: [B] long, real tokens per spliced sample.
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    labels: Optional[Tensor]
    modality: Tensor
    position_ids: Tensor
    token_positions: Tensor
    lengths: Tensor


@dataclass
class MultimodalOutput(ModelOutput):
    """:class:`ModelOutput` of a model that splices media into its text: ``logits [B, S', V]`` over the spliced,
    padded sequence, plus that sequence's ``attention_mask`` / ``labels`` / ``modality`` [B, S'] and ``loss`` (the
    shifted cross-entropy plus ``aux_loss``) when labels were given."""

    loss: Optional[Tensor] = None
    attention_mask: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    modality: Optional[Tensor] = None


def placeholder_name(placeholder: int) -> str:
    name = PLACEHOLDER_NAMES.get(placeholder)
    return f"{name} placeholder (id {placeholder})" if name else f"placeholder id {placeholder}"


def _item(x: object, placeholder: int, where: str, D: int) -> Tensor:
    """One media item as [N, D] (a [C, Q, D] item's chunks concatenated)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"media for the {placeholder_name(placeholder)}, {where}: expected a tensor [N, D] or "
                        f"[C, Q, D], got {type(x).__name__}")
    if x.ndim not in (2, 3) or x.shape[-1] != D:
        raise ValueError(f"media for the {placeholder_name(placeholder)}, {where}: expected features [N, D={D}] "
                         f"(or [C, Q, D={D}] chunks), got shape {tuple(x.shape)}; project the media to the language "
                         "model's width first")
    if not x.is_floating_point():
        raise ValueError(f"media for the {placeholder_name(placeholder)}, {where}: features must be floating point, "
                         f"got {x.dtype}")
    return x.reshape(-1, D)


def _items_per_sample(features: MediaFeatures, placeholder: int, B: int, D: int) -> list[list[Tensor]]:
    """``features`` (see the module docstring) as B lists of [N, D] items."""
    name = placeholder_name(placeholder)
    if isinstance(features, Tensor):
        if features.ndim not in (3, 4) or features.shape[0] != B:
            raise ValueError(f"media for the {name}: a tensor must be [B={B}, N, D] (one item per sample, item b "
                             f"belongs to sample b) or [B={B}, C, Q, D], got shape {tuple(features.shape)}")
        return [[_item(features[b], placeholder, f"sample {b}", D)] for b in range(B)]
    if not isinstance(features, Sequence) or isinstance(features, (str, bytes)):
        raise TypeError(f"media for the {name}: expected a tensor [B, N, D] or a sequence of B per-sample entries, "
                        f"got {type(features).__name__}")
    if len(features) != B:
        raise ValueError(f"media for the {name}: {len(features)} per-sample entries for a batch of {B}; give one "
                         "entry per sample (None for a sample without this media)")
    out = []
    for b, entry in enumerate(features):
        if entry is None:
            out.append([])
        elif isinstance(entry, Tensor):
            out.append([_item(entry, placeholder, f"sample {b}", D)])
        else:
            out.append([_item(x, placeholder, f"sample {b} item {j}", D) for j, x in enumerate(entry)])
    return out


def splice_media(input_ids: Tensor, embed: Callable[[Tensor], Tensor],
                 media: Optional[Mapping[int, Union[MediaFeatures, Callable[[], MediaFeatures]]]] = None,
                 attention_mask: Optional[Tensor] = None,
                 labels: Optional[Tensor] = None, *, modality_of: Optional[Mapping[int, int]] = None,
                 max_length: Optional[int] = None,
                 padding_side: Literal["right", "left"] = "right") -> SplicedBatch:
    """Replace every placeholder of ``input_ids`` by its media item's tokens and pad the batch (module docstring).

    Args:
        input_ids: [B, L] integer ids; text ids >= 0 and placeholder ids (keys of ``media``) where media goes.
        embed: ids [T] -> embeddings [T, D] (the language model's token embedding); called once, with every token
            of the batch (T = B x L), id 0 standing in at placeholders and padding (those rows are not used).
        media: {placeholder id: features} (``{IMAGE_TOKEN_ID: image_features [B, N, D]}``), or {placeholder id: a
            callable returning them} (``functools.partial(model.encode_images, images)``): called after the one
            host read of ``input_ids``, so that read does not wait for the encoder's GPU work; None = text only.
        attention_mask: [B, L], True / 1 = real token (default: all real). Padding may be on either side.
        labels: [B, L] target ids (IGNORE_INDEX = not trained) or None.
        modality_of: placeholder id -> modality id; default :data:`PLACEHOLDER_MODALITY`.
        max_length: truncate each spliced sample to this many tokens (None = no truncation).
        padding_side: "right" (training, the official layout) or "left" (generation: every row ends with a real
            token).

    Raises:
        ValueError: a sample has more placeholders of an id than items for it (one item per placeholder), or items
            although it has placeholders but fewer of them; a placeholder id has no media; an unknown negative id;
            media of the wrong shape or width; masks / labels of the wrong shape.
    """
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be [B, L] token ids with placeholders, got {shape}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer ids, got {input_ids.dtype}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 or None (no truncation), got {max_length}")
    B, L = input_ids.shape
    device = input_ids.device
    mask = (torch.ones(B, L, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.bool))
    if mask.shape != (B, L):
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, L)}, got {tuple(mask.shape)}")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != (B, L)):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must have the shape of input_ids {(B, L)}, got {shape}")
    media = dict(media or {})
    modality_of = dict(PLACEHOLDER_MODALITY if modality_of is None else modality_of)
    for pid in media:
        if not isinstance(pid, int) or pid >= 0:
            raise ValueError(f"media keys must be negative placeholder ids (IMAGE_TOKEN_ID={IMAGE_TOKEN_ID}, "
                             f"AUDIO_TOKEN_ID={AUDIO_TOKEN_ID}), got {pid!r}")
        if pid not in modality_of:
            raise ValueError(f"no modality id for the {placeholder_name(pid)}; pass modality_of={{{pid}: id}}")

    # The ONE host read of the step: the splice has data-dependent lengths. It comes before the media are encoded
    # (``media`` values may be callables, called below): read after them, the copy would wait for the encoders' GPU
    # work and the GPU would then idle while the host splices. Everything after it is launched without a sync.
    ids_h, mask_h = input_ids.cpu(), mask.cpu()
    bad = ids_h[mask_h & (ids_h < 0)]
    unknown = sorted(set(bad.tolist()) - set(media))
    if unknown:
        known = sorted(set(media)) or "none"
        raise ValueError(f"input_ids hold placeholder / negative id(s) {unknown} with no media for them (media given "
                         f"for: {known}); pass the features for each placeholder id (e.g. images=...) or remove it")
    media = {pid: f() if callable(f) else f for pid, f in media.items()}

    # Every token of the batch embedded in one call, non-text positions as id 0 (not used): selecting the text
    # tokens on the device first would be a boolean index, a sync.
    text_ids = torch.where(mask & (input_ids >= 0), input_ids, torch.zeros_like(input_ids))
    text_embeds = embed(text_ids.reshape(-1))  # [B * L, D]
    if text_embeds.ndim != 2:
        raise ValueError(f"embed must map ids [T] to embeddings [T, D], got shape {tuple(text_embeds.shape)}")
    D, dtype = text_embeds.shape[-1], text_embeds.dtype
    items = {pid: _items_per_sample(f, pid, B, D) for pid, f in media.items()}

    # Per input token: how many spliced tokens it becomes (text 1, padding 0, placeholder its item's length).
    counts = mask_h.long()
    taken: list[list[tuple[int, Tensor, int]]] = [[] for _ in range(B)]  # (input position, item, modality)
    for b in range(B):
        for pid, per_sample in items.items():
            where = ((ids_h[b] == pid) & mask_h[b]).nonzero().flatten().tolist()
            have = per_sample[b]
            if len(where) > len(have) or (where and len(where) < len(have)):
                raise ValueError(
                    f"sample {b} has {len(where)} {placeholder_name(pid)}(s) but {len(have)} item(s) for it: each "
                    "placeholder takes one item of that sample (a sample without placeholders ignores its item); "
                    "fix the prompt or the media")
            for i, item in zip(where, have):
                counts[b, i] = item.shape[0]
                taken[b].append((i, item, modality_of[pid]))
    ends = counts.cumsum(-1)
    starts = ends - counts
    lengths = ends[:, -1] if L else torch.zeros(B, dtype=torch.long)
    if max_length is not None:
        lengths = lengths.clamp(max=max_length)
    S = int(lengths.max()) if B else 0
    offset = S - lengths if padding_side == "left" else torch.zeros_like(lengths)  # where each sample begins

    # Position map, -1 where nothing of the input token is in the output.
    kept = mask_h & (starts < lengths[:, None]) & (counts > 0)
    token_positions = torch.where(kept, starts + offset[:, None], -1)
    b_idx, i_idx = (kept & (ids_h >= 0)).nonzero(as_tuple=True)  # the text tokens that survive truncation
    text_src = b_idx * L + i_idx  # rows of text_embeds (and of labels)
    text_dest = b_idx * S + token_positions[b_idx, i_idx]  # rows of the spliced [B * S] sequence
    modality = torch.zeros(B, S, dtype=torch.long)
    # Every media token of the batch lands with ONE index_put (destinations computed here, on the host): a copy per
    # item would cost one launch per image / clip of the batch.
    unused = []
    rows, media_dest = [], []
    for b in range(B):
        for i, item, mod in taken[b]:
            start = int(starts[b, i])
            n = min(item.shape[0], int(lengths[b]) - start)
            if n <= 0:
                unused.append(item)
                continue
            at = start + int(offset[b])
            rows.append(item[:n])
            media_dest.append(torch.arange(b * S + at, b * S + at + n))
            modality[b, at:at + n] = mod
    positions = torch.arange(S)[None, :].expand(B, S)
    real = (positions >= offset[:, None]) & (positions < (offset + lengths)[:, None])
    position_ids = torch.where(real, positions - offset[:, None], 0)

    # The host-made index tensors reach the device as ONE copy, without a sync (pinned memory, non_blocking).
    parts = [text_src, text_dest, *media_dest, modality.flatten(), position_ids.flatten(), real.flatten().long(),
             token_positions.flatten(), lengths]
    host = torch.cat(parts)
    if device.type == "cuda":
        dev = host.pin_memory().to(device, non_blocking=True)
    else:
        dev = host.to(device)
    Tt, Tm, BS = text_src.numel(), sum(d.numel() for d in media_dest), B * S
    text_src_d, text_dest_d, media_dest_d, modality_d, position_ids_d, real_d, token_positions_d, lengths_d = (
        dev.split([Tt, Tt, Tm, BS, BS, BS, B * L, B]))

    values = text_embeds[text_src_d]
    if rows:
        values = torch.cat([values, torch.cat([r.to(device) for r in rows]).to(dtype)])
    embeds = text_embeds.new_zeros(BS, D).index_put((torch.cat([text_dest_d, media_dest_d]),), values)
    embeds = embeds.view(B, S, D)
    used = {id(item) for b in range(B) for _, item, _ in taken[b]}
    for per_sample in items.values():
        unused.extend(x for sample in per_sample for x in sample if id(x) not in used)
    for x in unused:  # in the graph with a zero gradient (see the module docstring): adds exactly 0
        embeds = embeds + x[:0].sum().to(device=device, dtype=dtype)

    out_labels = None
    if labels is not None:
        out_labels = torch.full((BS,), IGNORE_INDEX, dtype=labels.dtype, device=device)
        out_labels[text_dest_d] = labels.to(device).reshape(-1)[text_src_d]
        out_labels = out_labels.view(B, S)
    return SplicedBatch(inputs_embeds=embeds, attention_mask=real_d.view(B, S).bool(), labels=out_labels,
                        modality=modality_d.view(B, S), position_ids=position_ids_d.view(B, S),
                        token_positions=token_positions_d.view(B, L), lengths=lengths_d)


def shifted_lm_loss(logits: Tensor, labels: Tensor, compiled: bool = False) -> Tensor:
    """Next-token cross-entropy: position t predicts ``labels[t + 1]``; ``IGNORE_INDEX`` targets do not count; mean
    over the counted targets of the whole batch (the official ``CrossEntropyLoss()`` on shifted logits), in fp32.
    ``logits`` [B, S, V], ``labels`` [B, S].

    ``compiled``: through ``torch.compile`` (the models pass their decoder's training compile option,
    :meth:`zoo.models.decoder.DecoderLM.compile_mode`). Eagerly, the fp32 cast is a copy of the shifted logits at
    twice their bf16 size, which log-softmax reads and writes again, forward and backward: ~2 ms a step for the Phi-2
    vocabulary at 3,328 tokens on an H200 (session 17's profile, benchmarks/results/moe_llava_step.md); compiled, one
    fused reduction reads the bf16 logits once and the backward writes their gradient once."""
    fn = compiled_once(_shifted_cross_entropy) if compiled else _shifted_cross_entropy
    return fn(logits, labels.to(logits.device))


def _shifted_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)
