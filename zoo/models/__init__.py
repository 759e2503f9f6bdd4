"""Model families, each registered with the preset registry."""

from zoo.models.output import ModelOutput
from zoo.models.transformer import Block, Transformer, TransformerConfig, resolve_moe_layers
from zoo.models import limoe, vmoe
from zoo.models.vmoe import VMoE, VMoEConfig
from zoo.models.limoe import LIMoE, LIMoEConfig
from zoo.models.decoder import DecoderConfig, DecoderLM
from zoo.models import moe_llava
from zoo.models.moe_llava import MoELLaVA, MoELLaVAConfig
from zoo.models import uni_moe
from zoo.models.uni_moe import UniMoE, UniMoEConfig
from zoo.models.audio import WhisperEncoder, WhisperEncoderConfig, audio_features
from zoo.models.beats import BEATsConfig, BEATsEncoder
from zoo.models.qformer import (Blip2QFormer, Blip2QFormerConfig, SpeechConnector, WhisperQFormer,
                                WhisperQFormerConfig, encode_speech)
from zoo.registry import register_family

register_family("vmoe", VMoEConfig, VMoE, checkpoint_filter=vmoe.checkpoint_filter_fn, card=vmoe.CARD,
                input_size=vmoe.input_size, predict=vmoe.predict)
register_family("limoe", LIMoEConfig, LIMoE, checkpoint_filter=limoe.checkpoint_filter_fn, card=limoe.CARD,
                input_size=limoe.input_size)
register_family("decoder", DecoderConfig, DecoderLM)
register_family("moe_llava", MoELLaVAConfig, MoELLaVA, card=moe_llava.CARD, input_size=moe_llava.input_size)
register_family("uni_moe", UniMoEConfig, UniMoE, card=uni_moe.CARD, input_size=uni_moe.input_size)

__all__ = ["ModelOutput", "Transformer", "TransformerConfig", "Block", "resolve_moe_layers", "VMoE", "VMoEConfig",
           "DecoderLM", "DecoderConfig", "MoELLaVA", "MoELLaVAConfig", "UniMoE", "UniMoEConfig", "WhisperEncoder", "WhisperEncoderConfig", "audio_features", "WhisperQFormer",
           "WhisperQFormerConfig", "SpeechConnector", "encode_speech", "Blip2QFormer", "Blip2QFormerConfig",
           "BEATsConfig", "BEATsEncoder"]
