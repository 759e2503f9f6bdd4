"""Uni-MoE (Li et al., "Uni-MoE: Scaling Unified Multimodal LLMs with Mixture of Experts", 2024): image, video and
speech encoders with connectors into one decoder LM whose FFNs are MoE layers.

    images [B, 3, H, W]            -> VisionTower -> Projector ------------------------------> [B, N, D]
    video  [B, T, 3, H, W]         -> VisionTower per frame -> Projector -> mean over frames -> [B, N, D]
    audio  [B, samples] (16 kHz)   -> log-mel 30 s windows -> WhisperEncoder -> SpeechConnector (Whisper decoder as a
           or [B, C, n_mels, F]      Q-Former over Q learnable queries, projector) -> C x Q tokens per clip
    input_ids [B, L] with -200 / -400 / -300 placeholders --splice_media--> inputs_embeds [B, S', D]
        (+ mask, labels, modality ids 0 text / 1 image / 2 video / 3 audio) -> DecoderLM (MoE) -> logits [B, S', V]

The vision tower, projector, splicing, templates and freeze groups are the MoE-LLaVA-style family's
(:mod:`zoo.models.moe_llava`, :mod:`zoo.models.multimodal`); the speech side is :mod:`zoo.models.audio` +
:mod:`zoo.models.qformer`. Uni-MoE v1 routes as Mixtral (top-2 of the raw router logits, softmax over the two =
renormalised top-2, dropless, MoE in every block): the presets' defaults.

Where the zoo differs from the official code on purpose:

- ``images[b]`` / ``audio[b]`` / ``video[b]`` belong to sample b (the official code hands out images with one
  counter over the whole batch and needs a per-sample ``image_mask``); a sample without a placeholder ignores its
  item, as in the official code.
- Padding ids are dropped before splicing (the official code keeps them, masked, before its own right padding): the
  real tokens' logits are the same.
- The tower runs without autograd while frozen (the official towers are always under ``no_grad``).
- Video: the official mean-pools the frames' tokens into one image's tokens; ``video_frames_as_tokens=True`` keeps
  every frame's tokens instead (with ``max_video_frames`` as the budget).
- Audio variant (BEATs + BLIP-2 aligner): by default each clip is one BEATs sequence and padded frames are masked out
  of the Q-Former; the official cuts clips into 30 s windows (last one padded with copies of its last sample) and
  lets the Q-Former read the padded frames: ``audio_beats_window=480000, audio_beats_mask_padding=False`` (what
  :mod:`zoo.convert.uni_moe_audio` sets for official checkpoints).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from zoo.models.audio import (HOP_LENGTH, SAMPLE_RATE, WhisperEncoder, WhisperEncoderConfig, check_audio,
                              log_mel_spectrogram, split_windows, window_samples)
from zoo.models.beats import BEATsConfig, BEATsEncoder
from zoo.models.beats import min_samples as beats_min_samples
from zoo.models.connectors import PROJECTOR_KINDS, Projector
from zoo.models.decoder import DecoderConfig, DecoderLM
from zoo.models.freeze import run_tower
from zoo.models.multimodal import (AUDIO_TOKEN_ID, IMAGE_TOKEN_ID, NUM_MODALITIES, VIDEO_TOKEN_ID, MultimodalOutput,
                                   SplicedBatch, shifted_lm_loss, splice_media)
from zoo.models.qformer import Blip2AudioConnector, Blip2QFormerConfig, SpeechConnector, WhisperQFormerConfig
from zoo.models.towers import VisionTower, VisionTowerConfig
from zoo.registry import CardInfo

__all__ = ["UniMoEConfig", "UniMoE", "IMAGE_TOKEN_ID", "AUDIO_TOKEN_ID", "VIDEO_TOKEN_ID"]


@dataclass
class UniMoEConfig:
    """A Uni-MoE model.

    Attributes:
        vision: the image / video-frame tower (None = no visual input); projector: ``mlp2x_gelu`` or ``linear``.
        audio_encoder: the Whisper encoder (None = no audio input); audio_qformer: the Whisper decoder used as a
            Q-Former (``num_queries`` query tokens per 30 s window; the official training default is 50), the
            speech models' connector; audio_blip2: instead of it, a BLIP-2 Q-Former (the official audio variant's
            aligner, ``Blip2QFormerModel``; set ``audio_qformer`` to None); audio_beats: instead of the Whisper
            encoder, a BEATs encoder (the official audio variant's; waveform input only, one token sequence per
            clip, no 30 s windows; set ``audio_encoder`` to None). Either encoder feeds either connector;
            audio_projector: the aligner's projector into the LM (``linear``, the official default, or
            ``mlp2x_gelu``).
        audio_window_seconds: Whisper only: the log-mel window (30 s, Whisper's and the official, by default). A
            shorter window suits encoders trained from scratch on short clips: a 0.5 s spoken digit fills 1.7% of a
            30 s window's 1,500 encoder positions, the rest is identical silence that every attention layer pays
            for (2.5 s: 125 positions, ~140x less attention). A clip longer than the window is cut into several, in
            order, as 30 s windows are. Must be a multiple of 0.02 s within the encoder's ``max_positions``.
        audio_beats_window: BEATs only: None (the zoo default) encodes each clip as one sequence; a number of samples
            splits each clip into windows of that length encoded one by one, ``num_queries`` tokens per window,
            concatenated in order, as the official audio variant's data pipeline does with 480000 (30 s): the last
            window is padded to full length by repeating its last sample, and the padding is masked inside BEATs.
        audio_beats_mask_padding: BEATs only: True (the zoo default) keeps padded frames out of the Q-Former's
            cross-attention; the official aligner passes an all-ones mask, so its queries also read the BEATs
            outputs at padded positions (False reproduces that; converted official checkpoints set it).
        decoder: the LM; its MoE layers get modality ids, so ``moe.num_modalities`` must be 4.
        video_frames_as_tokens: keep every frame's tokens (else the official mean over frames);
            max_video_frames: the frame budget (frames evenly subsampled beyond it).
        tokenizer_model_max_length: truncate each spliced sequence (None = no truncation).
    """

    vision: Optional[VisionTowerConfig] = field(default_factory=VisionTowerConfig)
    projector: str = "mlp2x_gelu"
    audio_encoder: Optional[WhisperEncoderConfig] = field(default_factory=WhisperEncoderConfig)
    audio_qformer: Optional[WhisperQFormerConfig] = field(default_factory=WhisperQFormerConfig)
    audio_blip2: Optional[Blip2QFormerConfig] = None
    audio_beats: Optional[BEATsConfig] = None
    audio_projector: str = "linear"
    audio_window_seconds: float = 30.0
    audio_beats_window: Optional[int] = None
    audio_beats_mask_padding: bool = True
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    video_frames_as_tokens: bool = False
    max_video_frames: int = 8
    tokenizer_model_max_length: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("projector", "audio_projector"):
            if getattr(self, name) not in PROJECTOR_KINDS:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {PROJECTOR_KINDS}")
        if self.audio_qformer is not None and self.audio_blip2 is not None:
            raise ValueError("audio_qformer (Whisper-decoder Q-Former) and audio_blip2 (BLIP-2 Q-Former) are two "
                             "choices of the audio connector: set one of them to None")
        if self.audio_encoder is not None and self.audio_beats is not None:
            raise ValueError("audio_encoder (Whisper) and audio_beats (BEATs) are two choices of the audio encoder: "
                             "set one of them to None")
        connector = self.audio_qformer if self.audio_qformer is not None else self.audio_blip2
        encoder_dim = (self.audio_encoder.dim if self.audio_encoder is not None else
                       self.audio_beats.encoder_embed_dim if self.audio_beats is not None else None)
        if (encoder_dim is None) != (connector is None):
            raise ValueError("an audio encoder (audio_encoder or audio_beats) and an audio connector (audio_qformer or "
                             "audio_blip2) go together: set both (audio input) or neither")
        if self.audio_qformer is not None and self.audio_qformer.encoder_dim not in (None, encoder_dim):
            raise ValueError(f"audio_qformer.encoder_dim={self.audio_qformer.encoder_dim} but the audio encoder's "
                             f"width is {encoder_dim}")
        if self.audio_blip2 is not None and self.audio_blip2.encoder_dim != encoder_dim:
            raise ValueError(f"audio_blip2.encoder_dim={self.audio_blip2.encoder_dim} but the audio encoder's width "
                             f"is {encoder_dim}")
        moe = self.decoder.moe
        if moe is not None and moe.num_modalities < NUM_MODALITIES:
            raise ValueError(f"decoder.moe.num_modalities={moe.num_modalities}: Uni-MoE's routers get modality ids "
                             f"0..{NUM_MODALITIES - 1} (text, image, video, audio); set it to {NUM_MODALITIES}")
        window_samples(self.audio_window_seconds)  # ValueError naming the fix (the encoder's reach: see encode_audio)
        if self.audio_beats_window is not None:
            need = beats_min_samples(self.audio_beats.input_patch_size) if self.audio_beats is not None else 1
            if self.audio_beats_window < need:
                raise ValueError(f"audio_beats_window={self.audio_beats_window} samples is shorter than one BEATs "
                                 f"patch ({need} samples); official: 480000 = 30 s at 16 kHz; None = whole clips")
        if self.max_video_frames < 1:
            raise ValueError(f"max_video_frames must be >= 1, got {self.max_video_frames}")


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


class UniMoE(nn.Module):
    """``forward(input_ids [B, L], attention_mask=None, images=None, video=None, audio=None, audio_lengths=None,
    audio_chunks=None, labels=None) -> MultimodalOutput`` (logits over the spliced right-padded sequence, its mask /
    labels / modality, MoE aux losses and routing, ``loss`` when labels are given).

    ``audio`` is either waveforms ``[B, samples]`` at 16 kHz with ``audio_lengths [B]`` (0 = no audio; the
    :mod:`zoo.data.instruct` batch) or log-mel windows ``[B, C, n_mels, frames]`` with ``audio_chunks [B, C]`` bool
    (True = a real window of that sample's clip, in order; default all). Each window gives Q query tokens; a clip's
    windows are concatenated into its one ``<audio>`` placeholder.

    Parameters: ``vision_tower.*`` (frozen when built), ``projector.*``, ``audio_encoder.*`` (frozen when built),
    ``audio_connector.{query_tokens, qformer.*, projector.*}`` (with ``audio_blip2``:
    ``audio_connector.{qformer.query_tokens, qformer.*, projector.*}``), ``decoder.*``.
    """

    def __init__(self, config: UniMoEConfig) -> None:
        super().__init__()
        self.config = config
        D = config.decoder.dim
        self.vision_tower = VisionTower(config.vision) if config.vision is not None else None
        self.projector = Projector(config.projector, self.vision_tower.out_dim, D) if self.vision_tower else None
        if config.audio_encoder is not None or config.audio_beats is not None:
            self.audio_encoder = (WhisperEncoder(config.audio_encoder) if config.audio_encoder is not None
                                  else BEATsEncoder(config.audio_beats))
            self.audio_connector = (
                SpeechConnector(config.audio_qformer, D, config.audio_projector) if config.audio_qformer is not None
                else Blip2AudioConnector(config.audio_blip2, D, config.audio_projector))
            self.audio_encoder.requires_grad_(False)
        else:
            self.audio_encoder = self.audio_connector = None
        self.decoder = DecoderLM(config.decoder)
        if self.vision_tower is not None:
            self.vision_tower.requires_grad_(False)

    def param_group_rules(self) -> list:
        """Freeze groups beyond the shared ones (:mod:`zoo.models.freeze`, which include ``lora``): ``audio_tower``
        (the Whisper encoder) and ``audio_connector`` (queries, Q-Former, aligner projector)."""
        from zoo.models.freeze import GroupRule

        return [GroupRule("audio_tower", lambda m: isinstance(m, (WhisperEncoder, BEATsEncoder))),
                GroupRule("audio_connector", lambda m: isinstance(m, (SpeechConnector, Blip2AudioConnector)))]

    # ------------------------------------------------------------------------------------------------ encoders
    def encode_images(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> projected tokens [B, N, D]."""
        if self.vision_tower is None:
            raise ValueError("this Uni-MoE has no vision tower (config.vision is None) but got images / video")
        features = run_tower(self.vision_tower, images.to(self.vision_tower.pos_embed.dtype))
        return self.projector(features.to(self.projector[0].weight.dtype))

    def encode_video(self, video: Tensor) -> Tensor:
        """video [B, T, 3, H, W] -> [B, N, D] (mean over frames, official) or [B, T' * N, D] (frames as tokens)."""
        if not isinstance(video, Tensor) or video.ndim != 5:
            raise ValueError(f"video must be [B, T, 3, H, W] frames, got {_shape(video)}")
        B, T = video.shape[:2]
        if T > self.config.max_video_frames:  # evenly spaced frames within the budget
            keep = torch.linspace(0, T - 1, self.config.max_video_frames).round().long().to(video.device)
            video, T = video[:, keep], len(keep)
        tokens = self.encode_images(video.flatten(0, 1)).unflatten(0, (B, T))  # [B, T, N, D]
        return tokens.flatten(1, 2) if self.config.video_frames_as_tokens else tokens.mean(1)

    def encode_audio(self, audio: Tensor, audio_lengths: Optional[Tensor] = None,
                     audio_chunks: Optional[Tensor] = None) -> list[Optional[Tensor]]:
        """Per sample: its clip's tokens ``[C * Q, D]`` (None when it has no audio)."""
        if self.audio_encoder is None:
            raise ValueError("this Uni-MoE has no audio encoder (config.audio_encoder is None) but got audio")
        if isinstance(self.audio_encoder, BEATsEncoder):
            return self._encode_audio_beats(audio, audio_lengths)
        n_mels = self.config.audio_encoder.n_mels
        if isinstance(audio, Tensor) and audio.ndim == 2:  # waveforms [B, samples] at 16 kHz
            window = window_samples(self.config.audio_window_seconds)
            # checked here, not in the config: a converted tiny tower may take only short log-mel inputs directly
            if window // (2 * HOP_LENGTH) > self.config.audio_encoder.max_positions:
                raise ValueError(f"audio_window_seconds={self.config.audio_window_seconds} needs "
                                 f"{window // (2 * HOP_LENGTH)} encoder positions but audio_encoder.max_positions is "
                                 f"{self.config.audio_encoder.max_positions} (30 s = 1500): pass log-mel windows "
                                 "[B, C, n_mels, frames] or set a shorter audio_window_seconds")
            lengths = (torch.full((audio.shape[0],), audio.shape[1]) if audio_lengths is None
                       else audio_lengths.to("cpu"))
            # every clip's 30 s windows through ONE log-mel call (windows are independent: Whisper normalises each
            # window by its own loudest bin), not one call per clip: a per-clip loop bounded GPU steps by launches
            check_audio(audio.reshape(-1), SAMPLE_RATE)  # dtype and finiteness once for the batch (one host sync)
            raw = [None if int(n) == 0 else split_windows(audio[b, :int(n)].float(), window=window)
                   for b, n in enumerate(lengths.tolist())]
            present = [w for w in raw if w is not None]
            mel = log_mel_spectrogram(torch.cat(present), n_mels) if present else None
            windows, start = [], 0
            for w in raw:
                windows.append(None if w is None else mel[start:start + w.shape[0]])
                start += 0 if w is None else w.shape[0]
        elif isinstance(audio, Tensor) and audio.ndim == 4:  # log-mel windows [B, C, n_mels, frames]
            if audio.shape[2] != n_mels:
                raise ValueError(f"audio features have {audio.shape[2]} mel bins, the encoder takes {n_mels}")
            chunks = (torch.ones(audio.shape[:2], dtype=torch.bool) if audio_chunks is None
                      else audio_chunks.to("cpu", torch.bool))
            if chunks.shape != audio.shape[:2]:
                raise ValueError(f"audio_chunks must be [B, C] = {tuple(audio.shape[:2])}, got {_shape(chunks)}")
            windows = [audio[b, :int(chunks[b].sum())] if chunks[b].any() else None for b in range(audio.shape[0])]
        else:
            raise ValueError(f"audio must be waveforms [B, samples] at {SAMPLE_RATE} Hz (with audio_lengths) or "
                             f"log-mel windows [B, C, n_mels, frames] (with audio_chunks), got {_shape(audio)}")
        # all windows of the batch through the encoder and the connector at once (each window is encoded on its
        # own: batching them changes no value), then split back per clip
        present = [w for w in windows if w is not None]
        if not present:
            return [None] * len(windows)
        weight = self.audio_encoder.conv1.weight
        stacked = torch.cat(present).to(device=weight.device, dtype=weight.dtype)  # [sum C, n_mels, frames]
        tokens = self.audio_connector(run_tower(self.audio_encoder, stacked))  # [sum C, Q, D]
        out: list[Optional[Tensor]] = []
        start = 0
        for w in windows:
            if w is None:
                out.append(None)
                continue
            out.append(tokens[start:start + w.shape[0]].flatten(0, 1))  # [C, Q, D] -> [C * Q, D]
            start += w.shape[0]
        return out

    def _encode_audio_beats(self, audio: Tensor, audio_lengths: Optional[Tensor]) -> list[Optional[Tensor]]:
        """BEATs path of :meth:`encode_audio`: waveforms ``[B, samples]`` (+ ``audio_lengths``) -> per sample
        ``[Q, D]`` (``[windows * Q, D]`` with ``audio_beats_window``) or None. The clips (or windows) of the batch run
        as one padded batch (BEATs masks the padding)."""
        if not (isinstance(audio, Tensor) and audio.ndim == 2):
            raise ValueError(f"the BEATs audio encoder takes waveforms [B, samples] at {SAMPLE_RATE} Hz (with "
                             f"audio_lengths), not log-mel windows; got {_shape(audio)}")
        B, T = audio.shape
        lengths = torch.full((B,), T) if audio_lengths is None else audio_lengths.to("cpu")
        rows = [b for b in range(B) if int(lengths[b]) > 0]
        if not rows:
            return [None] * B
        window = self.config.audio_beats_window
        if window is None:  # one padded sequence per clip
            index = torch.tensor(rows)
            span = int(lengths[index].max())
            waves = audio[index.to(audio.device), :span]
            padding = torch.arange(span)[None, :] >= lengths[index][:, None]  # [b, span], True = padded sample
            owners = rows
        else:  # official: fixed windows, the last one padded by repeating its last sample
            pieces, pads, owners = [], [], []
            for b in rows:
                n = int(lengths[b])
                for start in range(0, n, window):
                    piece = audio[b, start:min(start + window, n)]
                    real = piece.shape[0]
                    if real < window:
                        piece = torch.cat([piece, piece[-1:].expand(window - real)])
                    pieces.append(piece)
                    pads.append(torch.arange(window) >= real)
                    owners.append(b)
            waves, padding = torch.stack(pieces), torch.stack(pads)
        encoder = self.audio_encoder
        features, token_padding = run_tower(encoder, waves, SAMPLE_RATE, padding.to(waves.device),
                                            call=encoder.extract_features)
        mask = None if token_padding is None or not self.config.audio_beats_mask_padding else ~token_padding
        tokens = self.audio_connector(features, mask)  # [windows or clips, Q, D]
        out: list[Optional[Tensor]] = [None] * B
        for b in rows:
            mine = [i for i, owner in enumerate(owners) if owner == b]
            out[b] = tokens[mine].flatten(0, 1)  # its windows' Q tokens in order
        return out

    # ------------------------------------------------------------------------------------------------ splicing
    def prepare_inputs(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                       images: Optional[Tensor] = None, video: Optional[Tensor] = None,
                       audio: Optional[Tensor] = None, audio_lengths: Optional[Tensor] = None,
                       audio_chunks: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                       padding_side: str = "right") -> SplicedBatch:
        """The decoder's inputs with every placeholder replaced by its sample's media tokens."""
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L] token ids with placeholders, got {_shape(input_ids)}")
        B = input_ids.shape[0]
        media: dict[int, Any] = {}
        for name, x in (("images", images), ("video", video), ("audio", audio)):
            if x is not None and (not isinstance(x, Tensor) or x.shape[0] != B):
                raise ValueError(f"{name} must hold one entry per sample (batch of {B}), got {_shape(x)}")
        if images is not None:
            if images.ndim != 4:
                raise ValueError(f"images must be [B, 3, H, W], got {_shape(images)}")
            media[IMAGE_TOKEN_ID] = functools.partial(self.encode_images, images)
        if video is not None:
            media[VIDEO_TOKEN_ID] = functools.partial(self.encode_video, video)
        if audio is not None:
            media[AUDIO_TOKEN_ID] = functools.partial(self.encode_audio, audio, audio_lengths, audio_chunks)
        # The encoders run inside splice_media, after its host read of the ids (see its ``media`` argument).
        return splice_media(input_ids, self.decoder.embed, media, attention_mask, labels,
                            max_length=self.config.tokenizer_model_max_length, padding_side=padding_side)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, images: Optional[Tensor] = None,
                video: Optional[Tensor] = None, audio: Optional[Tensor] = None,
                audio_lengths: Optional[Tensor] = None, audio_chunks: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> MultimodalOutput:
        spliced = self.prepare_inputs(input_ids, attention_mask, images, video, audio, audio_lengths, audio_chunks,
                                      labels)
        out = self.decoder(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                           modality=spliced.modality)
        compiled = bool(self.decoder.compile_mode())
        loss = None if labels is None else shifted_lm_loss(out.logits, spliced.labels, compiled) + out.aux_loss
        return MultimodalOutput(logits=out.logits, aux_loss=out.aux_loss, aux_losses=out.aux_losses,
                                routing=out.routing, hidden_states=out.hidden_states, loss=loss,
                                attention_mask=spliced.attention_mask, labels=spliced.labels,
                                modality=spliced.modality)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, images: Optional[Tensor] = None,
                 video: Optional[Tensor] = None, audio: Optional[Tensor] = None,
                 audio_lengths: Optional[Tensor] = None, audio_chunks: Optional[Tensor] = None,
                 **kwargs: Any) -> Tensor:
        """Greedy / sampled answers, generated tokens only [B, N] (:func:`zoo.models.generate.generate` kwargs)."""
        was_training = self.training
        self.eval()
        try:
            spliced = self.prepare_inputs(input_ids, attention_mask, images, video, audio, audio_lengths,
                                          audio_chunks, padding_side="left")
            return self.decoder.generate(None, spliced.attention_mask, inputs_embeds=spliced.inputs_embeds,
                                         modality=spliced.modality, **kwargs)
        finally:
            self.train(was_training)


def input_size(config: UniMoEConfig) -> Optional[list[int]]:
    v = config.vision
    return None if v is None else [v.in_chans, v.image_size, v.image_size]


CARD = CardInfo(
    pipeline_tag="any-to-any",
    usage=("out = model(input_ids=ids, attention_mask=mask, images=images, audio=waveforms, audio_lengths=lengths)",
           "answer = model.generate(ids, images=images, audio=waveforms, audio_lengths=lengths, max_new_tokens=32)"),
    citation="\n".join([
        "@article{li2024unimoe,",
        "  title={Uni-MoE: Scaling Unified Multimodal LLMs with Mixture of Experts},",
        "  author={Li, Yunxin and Jiang, Shenyuan and Hu, Baotian and Wang, Longyue and Zhong, Wanqi and Luo, Wenhan",
        "          and Ma, Lin and Zhang, Min},",
        "  journal={arXiv preprint arXiv:2405.11273},",
        "  year={2024}",
        "}",
    ]),
)
