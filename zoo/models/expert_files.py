"""Named expert files: a dense model's FFNs saved on their own, and MoE experts initialised from such files.

Uni-MoE's progressive training (Li et al. 2024) trains one dense model per modality in stage 2 and starts the
unified MoE of stage 3 with expert ``e`` of every MoE layer copied from the FFN of modality ``e``'s stage-2 model.
The official code loads those FFNs by a hard-coded list of file names; here a stage-2 run writes its FFNs as ONE
named file and the stage-3 recipe maps expert index -> file (``{0: "run:stage2_image/image", 1: ...}``), so which
expert starts from which modality is written in the recipe and checked when the run starts.

File format (safetensors): ``blocks.{i}.fc1.weight [H', D]``, ``blocks.{i}.fc2.weight [D, H]`` (+ ``.bias`` when
the FFN has biases) for every block whose FFN is dense, ``nn.Linear`` layout (H' = 2H for SwiGLU: gate rows, then
up rows); metadata ``activation``, ``dim``, ``hidden_dim``, ``num_blocks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from zoo.moe.experts import LoRAExperts, StackedExperts
from zoo.moe.layer import MoELayer

FORMAT = "zoo-expert-file-v1"


@dataclass
class ExpertFile:
    """One dense model's FFNs: ``ffns[i] = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)`` for block i."""

    activation: str
    dim: int
    hidden_dim: int
    num_blocks: int
    ffns: dict[int, tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]] = field(default_factory=dict)
    path: str = ""


def _decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a decoder LM or of a multimodal model holding one (``model.decoder``)."""
    from zoo.models.decoder import DecoderLM

    decoder = model if isinstance(model, DecoderLM) else getattr(model, "decoder", None)
    if not isinstance(decoder, DecoderLM):
        raise TypeError(f"expert files hold a zoo decoder's FFNs; {type(model).__name__} is not a DecoderLM and has "
                        "no .decoder that is one")
    return decoder.blocks


def save_expert_file(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the dense FFNs of ``model``'s decoder to ``path`` (a ``.safetensors`` file; parent folders created).
    Blocks whose FFN is already an MoE layer are skipped; a model with no dense FFN is an error."""
    from safetensors.torch import save_file

    from zoo.models.upcycle import _dense_mlp_weights

    tensors: dict[str, Tensor] = {}
    activation, dim, hidden = None, None, None
    blocks = _decoder_blocks(model)
    for i, block in enumerate(blocks):
        if isinstance(block.mlp, MoELayer):
            continue
        act, w1, b1, w2, b2 = _dense_mlp_weights(block.mlp)
        activation, dim, hidden = act, w2.shape[0], w2.shape[1]
        for name, t in (("fc1.weight", w1), ("fc1.bias", b1), ("fc2.weight", w2), ("fc2.bias", b2)):
            if t is not None:
                tensors[f"blocks.{i}.{name}"] = t.detach().to("cpu").contiguous()
    if not tensors:
        raise ValueError("the model has no dense FFN to save (every block is an MoE layer)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT, "activation": str(activation), "dim": str(dim),
                                            "hidden_dim": str(hidden), "num_blocks": str(len(blocks))})
    return path


def load_expert_file(path: Union[str, Path]) -> ExpertFile:
    """Read a file written by :func:`save_expert_file`; a missing file or another format is a clear error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expert file {path} does not exist; a dense run writes it when its recipe sets "
                                "export_ffn: NAME (runs/<run>/experts/NAME.safetensors)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a zoo expert file (format {meta.get('format')!r}, expected {FORMAT!r})")
        out = ExpertFile(activation=meta["activation"], dim=int(meta["dim"]), hidden_dim=int(meta["hidden_dim"]),
                         num_blocks=int(meta["num_blocks"]), path=str(path))
        names = set(f.keys())
        for key in sorted(names):
            block = int(key.split(".")[1])
            if block in out.ffns:
                continue
            get = lambda n: f.get_tensor(f"blocks.{block}.{n}") if f"blocks.{block}.{n}" in names else None  # noqa: E731
            out.ffns[block] = (get("fc1.weight"), get("fc1.bias"), get("fc2.weight"), get("fc2.bias"))
    return out


def init_experts_from_files(model: nn.Module, files: Mapping[int, Union[str, Path, ExpertFile]]) -> dict[int, str]:
    """Copy, in every MoE layer of ``model``'s decoder, the FFN of block i from ``files[e]`` into expert ``e``.

    Experts not named in ``files`` keep their weights. LoRA experts with per-expert bases
    (:meth:`zoo.moe.LoRAExperts.from_experts`) get the file's FFN as expert ``e``'s frozen base; their low-rank
    factors are left as they are (zero ``B`` at the start of a run: the expert computes the file's FFN). Every named file must hold a dense FFN for every MoE block
    with the experts' activation and shapes; an expert index out of range is an error. Returns ``{e: path}``.
    """
    blocks = _decoder_blocks(model)
    moe_blocks = [(i, b.mlp) for i, b in enumerate(blocks) if isinstance(b.mlp, MoELayer)]
    if not moe_blocks:
        raise ValueError("the model has no MoE layers to initialise from expert files")
    loaded = {int(e): (f if isinstance(f, ExpertFile) else load_expert_file(f)) for e, f in files.items()}
    for e, ef in loaded.items():
        for i, layer in moe_blocks:
            experts = layer.experts
            if not (isinstance(experts, StackedExperts)
                    or (isinstance(experts, LoRAExperts) and experts.per_expert_base)):
                raise TypeError(f"block {i}: experts of type {type(experts).__name__} cannot be loaded from an expert "
                                "file (stacked two-layer experts, or LoRA experts with per-expert bases, only)")
            if not 0 <= e < experts.num_experts:
                raise ValueError(f"expert file for expert {e}: block {i} has experts 0..{experts.num_experts - 1}")
            if ef.activation != experts.activation:
                raise ValueError(f"{ef.path}: FFN activation {ef.activation!r}, experts use {experts.activation!r}")
            if i not in ef.ffns:
                raise ValueError(f"{ef.path} has no dense FFN for block {i} (it holds blocks {sorted(ef.ffns)}); the "
                                 "stage-2 model must have the same depth and a dense FFN where stage 3 has experts")
            w1, b1, w2, b2 = ef.ffns[i]
            if tuple(w1.shape) != (experts.w1.shape[2], experts.dim) or tuple(w2.shape) != (experts.dim,
                                                                                            experts.hidden_dim):
                raise ValueError(f"{ef.path} block {i}: FFN shapes fc1 {tuple(w1.shape)}, fc2 {tuple(w2.shape)} do "
                                 f"not fit the experts (D={experts.dim}, H={experts.hidden_dim})")
            if (experts.b1 is None) != (b1 is None):
                raise ValueError(f"{ef.path} block {i}: the FFN {'has' if b1 is not None else 'has no'} biases, the "
                                 "experts do not match")
            with torch.no_grad():
                experts.w1[e].copy_(w1.t())
                experts.w2[e].copy_(w2.t())
                if experts.b1 is not None:
                    experts.b1[e].copy_(b1)
                    experts.b2[e].copy_(b2)
    return {e: ef.path for e, ef in loaded.items()}


__all__ = ["ExpertFile", "save_expert_file", "load_expert_file", "init_experts_from_files"]
