"""Hugging Face Whisper import (zoo/convert/hf_whisper.py): a tiny random transformers WhisperModel is saved with
save_pretrained; our encoder output and our Q-Former (its decoder fed query vectors) must equal transformers' within
1e-4. Unknown and missing tensors fail. transformers is a test-only dependency."""

from __future__ import annotations

import pytest
import torch

from zoo.convert.hf_files import HFCheckpointError, read_hf_folder
from zoo.convert.hf_whisper import load_whisper

transformers = pytest.importorskip("transformers")

D, Q = 32, 5


@pytest.fixture(scope="module")
def whisper_folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(d_model=D, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=48,
                                     num_mel_bins=80, vocab_size=64, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2, decoder_start_token_id=1)
    model = transformers.WhisperModel(cfg).eval()
    with torch.no_grad():  # random biases (transformers initialises them to 0, which would hide a bias mix-up)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("whisper")
    model.save_pretrained(folder)
    return folder, model


def test_encoder_and_qformer_match_transformers(whisper_folder):
    folder, model = whisper_folder
    encoder, qformer = load_whisper(folder, num_queries=Q)
    torch.manual_seed(1)
    feats, queries = torch.randn(2, 80, 3000), torch.randn(2, Q, D)
    with torch.no_grad():
        ref_enc = model.encoder(feats).last_hidden_state
        ref_dec = model.decoder(inputs_embeds=queries, encoder_hidden_states=ref_enc).last_hidden_state
        ours_enc = encoder.eval()(feats)
        ours_dec = qformer.eval()(queries, ours_enc)
    torch.testing.assert_close(ours_enc, ref_enc, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_dec, ref_dec, atol=1e-4, rtol=0)


def test_encoder_only_and_for_conditional_generation_names(whisper_folder):
    folder, model = whisper_folder
    config, tensors = read_hf_folder(folder)
    encoder, qformer = load_whisper(folder, decoder=False)
    assert qformer is None
    # WhisperForConditionalGeneration stores model.encoder.* / model.decoder.* and the LM head proj_out.
    renamed = {f"model.{k}": v for k, v in tensors.items()}
    renamed["proj_out.weight"] = tensors["decoder.embed_tokens.weight"]
    enc2, qf2 = load_whisper(folder, tensors=renamed, hf_config=config, num_queries=Q)
    torch.testing.assert_close(enc2.state_dict(), encoder.state_dict())
    assert qf2 is not None and qf2.config.depth == 3


def test_unknown_and_missing_tensors_fail(whisper_folder):
    folder, _ = whisper_folder
    config, tensors = read_hf_folder(folder)
    extra = dict(tensors, **{"encoder.mystery.weight": torch.zeros(3)})
    with pytest.raises(HFCheckpointError, match="encoder.mystery.weight"):
        load_whisper(folder, tensors=extra, hf_config=config)
    missing = {k: v for k, v in tensors.items() if k != "decoder.layers.2.encoder_attn.v_proj.weight"}
    with pytest.raises(HFCheckpointError, match="decoder.layers.2.encoder_attn.v_proj.weight"):
        load_whisper(folder, tensors=missing, hf_config=config)
    with pytest.raises(HFCheckpointError, match="not understood"):  # config says fewer layers than the weights
        load_whisper(folder, tensors=tensors, hf_config=dict(config, decoder_layers=2))
    with pytest.raises(HFCheckpointError, match="model_type"):
        load_whisper(folder, tensors=tensors, hf_config=dict(config, model_type="llama"))
