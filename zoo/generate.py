"""``python -m zoo.generate``: answer one question about one image with a MoE-LLaVA-style model, printing the answer
token by token as it is decoded.

The model comes from ``--model`` (a preset name: random weights, a warning says so; or ``local-dir:PATH``) or from
``--checkpoint`` (an InstructTask training checkpoint written by train.py). A checkpoint carries the vocabulary its
run trained with (the datamodule's ``state_dict``, :meth:`zoo.data.instruct.InstructDataModuleBase.state_dict`) and
its datamodule settings (template, image size / mean / std / aspect): both are used, because ids of any other
vocabulary would mean other words to the trained embeddings. Without a checkpoint there is no trained vocabulary;
a compact tokenizer over the first BPE ids that fit the model's vocabulary is used, which only makes sense for the
random-weight smoke run such a model is.

Examples::

    python -m zoo.generate --checkpoint runs/moe_llava_stage3/checkpoints/last.ckpt --image cat.jpg \\
        --prompt "What is in the picture?"
    python -m zoo.generate --model moe_llava_tiny --image cat.jpg --prompt "What is it?" --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

import torch
from torch import nn

from zoo.data.instruct import CLIP_MEAN, CLIP_STD, ImageProcessor
from zoo.data.templates import CompactTokenizer, get_template


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m zoo.generate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="preset name (random weights) or local-dir:PATH")
    src.add_argument("--checkpoint", help="InstructTask training checkpoint (train.py's runs/.../*.ckpt)")
    p.add_argument("--image", required=True, help="image file (any format PIL reads)")
    p.add_argument("--prompt", required=True, help="the question; '<image>' is put before it unless it has one")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default) = greedy, deterministic; > 0 samples with this temperature")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (unused by greedy)")
    p.add_argument("--template", default=None, help="conversation template (default: the checkpoint's, else 'tiny')")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def _checkpoint_tokenizer(ckpt: dict[str, Any]) -> Optional[CompactTokenizer]:
    """The CompactTokenizer a datamodule saved into ``ckpt`` (Lightning stores a datamodule's ``state_dict`` under
    its class's qualified name, so look for the entry that holds a tokenizer state rather than guess that name)."""
    for value in ckpt.values():
        if isinstance(value, dict) and isinstance(value.get("tokenizer"), dict) \
                and value["tokenizer"].get("kind") == CompactTokenizer.KIND:
            return CompactTokenizer.from_state_dict(value["tokenizer"])
    return None


def load_from_checkpoint(path: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer, datamodule hyper-parameters)`` of an InstructTask training checkpoint."""
    from zoo.tasks.checkpoints import load_training_checkpoint
    from zoo.tasks.instruct import InstructTask

    ckpt = load_training_checkpoint(path)
    hp = dict(ckpt.get("hyper_parameters") or {})
    if "model_overrides" not in hp or "upcycle" not in hp:  # only InstructTask saves both
        raise ValueError(f"{path} is not an InstructTask checkpoint (its hyper-parameters are "
                         f"{sorted(hp)[:10]}); python -m zoo.generate answers with MoE-LLaVA-style models")
    # The stage this run started from is already in the checkpoint's weights: do not look for that file again.
    hp.pop("init_from", None)
    task = InstructTask(**hp)
    task.load_state_dict(ckpt["state_dict"])
    tokenizer = _checkpoint_tokenizer(ckpt)
    if tokenizer is None:
        raise ValueError(f"{path} holds no CompactTokenizer vocabulary (a run with a custom tokenizer object): "
                         "that tokenizer cannot be rebuilt from the checkpoint")
    if tokenizer.vocab_size != task.model.config.decoder.vocab_size:
        raise ValueError(f"the checkpoint's vocabulary has {tokenizer.vocab_size} tokens but its model "
                         f"{task.model.config.decoder.vocab_size}")
    return task.model, tokenizer, dict(ckpt.get("datamodule_hyper_parameters") or {})


def load_model(name: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer, {})`` for a preset name (random weights) or ``local-dir:PATH``."""
    from zoo.factory import create_model

    model = create_model(name)
    check_model(model, f"model {name!r}")  # before anything that assumes a decoder vocabulary
    if not name.startswith(("local-dir:", "hf-hub:")):
        warnings.warn(f"{name!r} is built with RANDOM weights (a preset, no checkpoint): the answer is noise; give "
                      "--checkpoint runs/.../last.ckpt for a trained model", stacklevel=2)
    vocab = int(getattr(getattr(getattr(model, "config", None), "decoder", None), "vocab_size", 0) or 0)
    # No trained vocabulary exists here: take the first BPE ids that fit the model's embedding table.
    n = vocab - CompactTokenizer.SPECIAL
    if n < 1:
        raise ValueError(f"{name!r} has no decoder vocabulary to encode a prompt with")
    return model, CompactTokenizer(range(min(n, 49408))), {}


def check_model(model: nn.Module, source: str) -> None:
    from zoo.models.moe_llava import MoELLaVA

    if not isinstance(model, MoELLaVA):
        raise TypeError(f"{source} is a {type(model).__name__}; python -m zoo.generate needs an image+text model "
                        "(MoELLaVA family, e.g. moe_llava_tiny)")


def encode(prompt: str, tokenizer: Any, template_name: str) -> torch.Tensor:
    text = prompt if "<image>" in prompt else "<image>\n" + prompt
    ids, _ = get_template(template_name).encode_prompt([{"from": "human", "value": text},
                                                         {"from": "gpt", "value": ""}], tokenizer, sample="prompt")
    return torch.tensor(ids, dtype=torch.long)[None]


def answer(model: nn.Module, tokenizer: Any, image: torch.Tensor, ids: torch.Tensor, max_new_tokens: int,
           temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           seed: int = 0, on_text: Optional[Callable[[str], None]] = None) -> str:
    """Generate; ``on_text`` gets each new piece of the decoded answer as soon as its token is chosen (the text of
    all tokens so far is decoded again and the new tail passed on, because BPE pieces join into words only in
    context)."""
    eos = int(tokenizer.eos_token_id)
    tokens: list[int] = []
    shown = ""

    def on_token(tok: torch.Tensor) -> None:
        nonlocal shown
        t = int(tok[0])
        if t == eos:
            return
        tokens.append(t)
        text = tokenizer.decode(tokens)
        if on_text is not None and text.startswith(shown) and len(text) > len(shown):
            on_text(text[len(shown):])
            shown = text
        elif on_text is not None and not text.startswith(shown):  # a decoded word changed: show the rest anew
            on_text("\n" + text)
            shown = text

    kw: dict[str, Any] = {}
    if temperature > 0:
        gen = torch.Generator(device=ids.device).manual_seed(seed)
        kw = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": gen}
    model.generate(ids, images=image, max_new_tokens=max_new_tokens, eos_token_id=eos, on_token=on_token, **kw)
    return tokenizer.decode(tokens)


def main(argv: Optional[list[str]] = None, out: TextIO = sys.stdout) -> str:
    args = parse_args(argv)
    image_path = Path(args.image)
    if not image_path.is_file():
        raise FileNotFoundError(f"--image {args.image}: no such file")
    if args.checkpoint:
        model, tokenizer, dm_hp = load_from_checkpoint(args.checkpoint)
        source = f"checkpoint {args.checkpoint}"
    else:
        model, tokenizer, dm_hp = load_model(args.model)
        source = f"model {args.model!r}"
    check_model(model, source)  # a checkpoint of another task could hold any model
    from PIL import Image

    # Preprocess as the training run did (its datamodule settings), else from the model's own tower config.
    proc = ImageProcessor(int(dm_hp.get("image_size") or model.config.vision.image_size),
                          dm_hp.get("image_mean") or CLIP_MEAN, dm_hp.get("image_std") or CLIP_STD,
                          dm_hp.get("image_aspect") or "pad")
    with Image.open(image_path) as im:
        image = proc(im)[None].to(args.device)
    ids = encode(args.prompt, tokenizer, args.template or dm_hp.get("template") or "tiny").to(args.device)
    model.to(args.device).eval()

    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    text = answer(model, tokenizer, image, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                  args.seed, on_text=show)
    out.write("\n")
    out.flush()
    return text


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, TypeError, ValueError) as err:
        print(f"python -m zoo.generate: error: {err}", file=sys.stderr)
        sys.exit(2)
