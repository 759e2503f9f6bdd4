"""MoE-LLaVA (Lin et al., "MoE-LLaVA: Mixture of Experts for Large Vision-Language Models", 2024): a frozen vision
tower, a projector and a decoder LM whose FFNs in every other block are MoE layers.

    images [B, 3, H, W] -> VisionTower -> [B, N, Dv] -> Projector -> [B, N, D]
    input_ids [B, L] with IMAGE_TOKEN_ID (-200) placeholders --splice_media--> inputs_embeds [B, S', D]
        (+ attention_mask, labels, modality ids) -> DecoderLM (MoE routers see the modality ids) -> logits [B, S', V]

``logits`` cover the spliced, right-padded sequence (the official layout: each placeholder replaced by the image's N
tokens, padding at the end). Without images the text goes to the decoder as given, like the official code.

MoE settings of the released models (the presets' defaults): 4 experts, top-2, MoE in blocks 0, 2, 4, ...
("sparse"), renormalised top-2 gates, router logits in fp32, GShard / Switch balance loss with weight 0.01, capacity
factor 1.5 in training and 2.0 in eval (``min_capacity`` 0: no rounding), deterministic routing.

Where the zoo differs from the official code (DeepSpeed 0.9.5's ``top2gating``) on purpose:

- The 2nd expert is the 2nd-highest router probability; DeepSpeed samples it with Gumbel noise, in training AND
  eval, so the official scores move between runs. ``decoder.moe.deepspeed_top2_gating: gumbel`` reproduces that
  sampling (:class:`zoo.moe.MoEConfig`); the decoder's MoE layers are causal, so it is accepted only with
  ``dropless: true`` and ``eval_dropless: true`` (DeepSpeed's whole-call capacity is refused there), e.g.
  ``model_config("moe_llava_tiny", **{"decoder.moe.deepspeed_top2_gating": "gumbel", "decoder.moe.dropless": True,
  "decoder.moe.eval_dropless": True})``. A non-causal ``MoELayer`` with it also reproduces the capacity rule.
- Capacity is per sequence (a causal model: no later token, and no other sample, may change a token's experts),
  filled in position order; DeepSpeed counts the capacity over all tokens of the micro-batch, padding included, fills
  every token's 1st choice before any 2nd choice, and renormalises the gates after dropping. With room for every
  token (e.g. ``eval_dropless``) both compute the same function.
- The balance loss is averaged per sequence over real tokens; DeepSpeed's is over every token of the micro-batch.
- ``images[b]`` belongs to sample b (:mod:`zoo.models.multimodal`); a sample with more placeholders than images is
  an error, where the official batch-wide counter would shift the later samples' images.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from zoo.models.connectors import PROJECTOR_KINDS, Projector
from zoo.models.decoder import DecoderConfig, DecoderLM
from zoo.models.freeze import run_tower
from zoo.models.multimodal import (IGNORE_INDEX, IMAGE_TOKEN_ID, NUM_MODALITIES, MultimodalOutput, SplicedBatch,
                                   shifted_lm_loss, splice_media)
from zoo.models.towers import VisionTower, VisionTowerConfig
from zoo.moe.compiled import compiled_once
from zoo.registry import CardInfo

__all__ = ["MoELLaVAConfig", "MoELLaVA", "IMAGE_TOKEN_ID", "IGNORE_INDEX"]


@dataclass
class MoELLaVAConfig:
    """A MoE-LLaVA model.

    Attributes:
        vision: the vision tower, including which features it returns (``feature_layer`` -2 and ``select`` "patch"
            = MoE-LLaVA's ``mm_vision_select_layer`` / ``mm_vision_select_feature``).
        projector: ``"mlp2x_gelu"`` (the released models) or ``"linear"``, from the tower width to ``decoder.dim``.
        decoder: the language model; ``decoder.moe`` None = a dense model (MoE-Tuning stages I and II). Its MoE
            layers receive modality ids 0 (text) and 1 (image), so ``moe.num_modalities`` must be at least 2.
        tokenizer_model_max_length: truncate each spliced sequence to this many tokens (the official config key of
            that name; None = no truncation, as the official training leaves it).
    """

    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    projector: str = "mlp2x_gelu"
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    tokenizer_model_max_length: Optional[int] = None

    def __post_init__(self) -> None:
        if self.projector not in PROJECTOR_KINDS:
            raise ValueError(f"unknown projector {self.projector!r}; expected one of {PROJECTOR_KINDS}")
        moe = self.decoder.moe
        if moe is not None and moe.num_modalities < 2:
            raise ValueError(f"decoder.moe.num_modalities={moe.num_modalities}: the MoE routers get modality ids "
                             f"(0 text, 1 image); set decoder.moe.num_modalities to {NUM_MODALITIES}")
        if self.tokenizer_model_max_length is not None and self.tokenizer_model_max_length < 1:
            raise ValueError(f"tokenizer_model_max_length must be >= 1 or None, got {self.tokenizer_model_max_length}")


def _tower_forward(tower: nn.Module, images: Tensor) -> Tensor:
    return tower(images)


class MoELLaVA(nn.Module):
    """``forward(input_ids [B, L], attention_mask [B, L] | None, images [B, 3, H, W] | None, labels [B, L] | None)
    -> MultimodalOutput`` (:mod:`zoo.models.multimodal`): ``logits [B, S', V]`` over the spliced right-padded
    sequence with its ``attention_mask`` / ``labels`` / ``modality`` [B, S'], the MoE layers' ``aux_loss`` /
    ``aux_losses`` / ``routing``, and ``loss`` = shifted cross-entropy (IGNORE_INDEX not counted) + ``aux_loss``
    when labels are given.

    Parameters: ``vision_tower.*`` (:class:`VisionTower`, frozen when built: ``requires_grad`` False; a freeze spec
    that names ``vision_tower`` trains it), ``projector.{0,2}.*`` (:class:`Projector`), ``decoder.*``
    (:class:`DecoderLM`). The tower runs without autograd while none of its parameters requires a gradient (the
    official tower is always under ``no_grad``).

    Training-time options: ``compile_tower`` (the tower's forward through ``torch.compile`` while training, replayed
    as a CUDA graph on the GPU) and the decoder's ``gradient_checkpointing`` / ``compile_blocks`` (:class:`DecoderLM`);
    the tasks set them from their ``gradient_checkpointing`` and ``compile`` arguments.
    """

    def __init__(self, config: MoELLaVAConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.projector = Projector(config.projector, self.vision_tower.out_dim, config.decoder.dim)
        self.decoder = DecoderLM(config.decoder)
        self.vision_tower.requires_grad_(False)
        # Training-time option (not architecture, so not in the config): the tower's forward through torch.compile
        # while training (inductor fuses its norms, casts and epilogues; ~24 eager blocks launch-bound otherwise),
        # replayed as a CUDA graph: its input is always [B, 3, image_size, image_size], so one graph per batch size,
        # and the compiled tower alone still took ~12 ms of host time for ~3 ms of GPU work (Phi-2x4 shape, batch 4,
        # session 17, benchmarks/results/moe_llava_step.md).
        self.compile_tower = False

    # ------------------------------------------------------------------------------------------------ pieces
    def encode_images(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> projected image tokens [B, N, D] (cast to the tower's dtype first)."""
        tower_dtype = self.vision_tower.pos_embed.dtype
        if isinstance(images, Tensor) and images.is_floating_point():
            images = images.to(tower_dtype)
        call = (functools.partial(compiled_once(_tower_forward, cuda_graphs=True), self.vision_tower)
                if self.compile_tower and self.training else None)
        features = run_tower(self.vision_tower, images, call=call)
        return self.projector(features.to(self.projector[0].weight.dtype))

    def prepare_inputs(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                       images: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                       padding_side: str = "right") -> SplicedBatch:
        """The decoder's inputs: text embedded, each image placeholder replaced by its image's tokens, padded on
        ``padding_side`` (:func:`zoo.models.multimodal.splice_media`). ``images[b]`` belongs to sample b."""
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be [B, L] token ids with image placeholders ({IMAGE_TOKEN_ID}), got "
                             f"{shape}")
        media = {}
        if images is not None:
            if not isinstance(images, Tensor) or images.ndim != 4:
                shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
                raise ValueError(f"images must be [B, 3, H, W] (images[b] belongs to sample b; zeros for a sample "
                                 f"without an image), got {shape}")
            if images.shape[0] != input_ids.shape[0]:
                raise ValueError(f"images has {images.shape[0]} images for a batch of {input_ids.shape[0]} prompts; "
                                 "give one image per sample (images[b] belongs to sample b, zeros where a sample "
                                 "has none)")
            media[IMAGE_TOKEN_ID] = functools.partial(self.encode_images, images)  # after splice_media's host read
        return splice_media(input_ids, self.decoder.embed, media, attention_mask, labels,
                            max_length=self.config.tokenizer_model_max_length, padding_side=padding_side)

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, images: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> MultimodalOutput:
        if images is None:
            if isinstance(input_ids, Tensor) and not input_ids.is_floating_point() and bool((input_ids < 0).any()):
                raise ValueError(f"input_ids hold image placeholders ({IMAGE_TOKEN_ID}) but images is None; pass "
                                 "images [B, 3, H, W] (images[b] belongs to sample b)")
            mask = attention_mask
            out = self.decoder(input_ids, attention_mask)
            modality = None
        else:
            spliced = self.prepare_inputs(input_ids, attention_mask, images, labels)
            mask, labels, modality = spliced.attention_mask, spliced.labels, spliced.modality
            out = self.decoder(inputs_embeds=spliced.inputs_embeds, attention_mask=mask, modality=modality)
        if labels is not None and labels.shape != out.logits.shape[:2]:
            raise ValueError(f"labels must have the shape of input_ids {tuple(out.logits.shape[:2])}, got "
                             f"{tuple(labels.shape)}")
        compiled = bool(self.decoder.compile_mode())
        loss = None if labels is None else shifted_lm_loss(out.logits, labels, compiled) + out.aux_loss
        return MultimodalOutput(logits=out.logits, aux_loss=out.aux_loss, aux_losses=out.aux_losses,
                                routing=out.routing, hidden_states=out.hidden_states, loss=loss,
                                attention_mask=mask, labels=labels, modality=modality)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, images: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                 **kwargs: Any) -> Tensor:
        """Answer each prompt: splice (left-padded, so every row ends with its last prompt token), prefill the
        decoder with the embeddings, then decode token by token (:func:`zoo.models.generate.generate`; ``kwargs``:
        ``max_new_tokens``, ``do_sample``, ``eos_token_id``, ...). Returns the generated tokens only, [B, N]."""
        was_training = self.training
        self.eval()
        try:
            spliced = self.prepare_inputs(input_ids, attention_mask, images, padding_side="left")
            return self.decoder.generate(None, spliced.attention_mask, inputs_embeds=spliced.inputs_embeds,
                                         modality=spliced.modality, **kwargs)
        finally:
            self.train(was_training)


# ------------------------------------------------------------------------------- what the registry needs to know
def input_size(config: MoELLaVAConfig) -> list[int]:
    return [config.vision.in_chans, config.vision.image_size, config.vision.image_size]


CARD = CardInfo(
    pipeline_tag="image-text-to-text",
    usage=("out = model(input_ids=ids, attention_mask=mask, images=images)  # ids hold -200 where the image goes",
           "answer = model.generate(ids, images, max_new_tokens=64)"),
    citation="\n".join([
        "@article{lin2024moellava,",
        "  title={MoE-LLaVA: Mixture of Experts for Large Vision-Language Models},",
        "  author={Lin, Bin and Tang, Zhenyu and Ye, Yang and Cui, Jiaxi and Zhu, Bin and Jin, Peng and Huang, Jinfa and",
        "          Zhang, Junwu and Pang, Yatian and Ning, Munan and Yuan, Li},",
        "  journal={arXiv preprint arXiv:2401.15947},",
        "  year={2024}",
        "}",
    ]),
)
