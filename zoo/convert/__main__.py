"""``python -m zoo.convert vmoe --checkpoint PREFIX --out DIR [--preset NAME | --config official.json] ...`` and
``python -m zoo.convert hf-lm --checkpoint HF_DIR --out DIR`` and
``python -m zoo.convert moe-llava --checkpoint DIR --out DIR [--image-tower DIR_OR_ID]`` and
``python -m zoo.convert uni-moe --checkpoint DIR --out DIR [--base DIR] [--vision-tower DIR] [--audio-tower DIR]``
(``--base``: for an ``-e2`` LoRA fine-tune folder, the full checkpoint it was trained from; an 8-expert fine-tune
also takes ``--mlp-dir DIR [--expert-bases a,b,...]``, the experts' base FFN files)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from zoo.convert.vmoe import PUBLISHED, UNSUPPORTED_PUBLISHED


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.convert", description="Convert external checkpoints "
                                     "to zoo published folders (config.json + model.safetensors + README.md)")
    # metavar: argparse names a missing subcommand by it ("required: {vmoe,hf-lm,list}", not "required: cmd")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{vmoe,hf-lm,moe-llava,uni-moe,list}")
    v = sub.add_parser("vmoe", help="official V-MoE checkpoint (PREFIX.index + PREFIX.data-*) -> DIR",
                       description="Config source: --config, else --preset, else inferred from the checkpoint "
                                   "(routing settings from the options below / the published-checkpoint table).")
    v.add_argument("--checkpoint", required=True, help="checkpoint prefix (without .index), e.g. "
                   "~/vmoe_checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1")
    v.add_argument("--out", required=True, help="output folder; load with zoo.create_model('local-dir:DIR')")
    src = v.add_mutually_exclusive_group()
    src.add_argument("--preset", help="zoo preset whose config the checkpoint has (e.g. vmoe_tiny_official)")
    src.add_argument("--config", help="official VisionTransformerMoe kwargs as JSON/YAML (config.model), or a "
                     "file with them under 'model_kwargs', or a zoo config.json")
    v.add_argument("--image-size", type=int, help="convert for this resolution (position embeddings resized)")
    v.add_argument("--pos-embed-resize", choices=("zoo", "vmoe"), default="zoo",
                   help="for --image-size: zoo.layers.resize_pos_embed (bilinear, align_corners=False) or as the "
                        "official vit_zoom rule (scipy.ndimage.zoom order 1 = align_corners=True)")
    v.add_argument("--top-k", type=int)
    v.add_argument("--capacity-factor", type=float)
    v.add_argument("--group-size", type=int, help="images per routing group (zoo counts images, vmoe tokens)")
    v.add_argument("--batch-priority", action=argparse.BooleanOptionalAction, default=None)
    v.add_argument("--tag", help="weights tag recorded in the folder")
    h = sub.add_parser("hf-lm", help="transformers causal-LM folder (config.json + safetensors) -> zoo decoder DIR")
    h.add_argument("--checkpoint", required=True, help="folder with config.json and model.safetensors (or shards "
                   "with model.safetensors.index.json); model_type llama, qwen2, stablelm, phi, mixtral, olmoe, "
                   "qwen2_moe or qwen")
    h.add_argument("--out", required=True, help="output folder; load with zoo.create_model('local-dir:DIR')")
    h.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="precision of the converted model and stored weights (default: the checkpoint's)")
    ml = sub.add_parser("moe-llava", help="official MoE-LLaVA checkpoint (LanguageBind/MoE-LLaVA-*) -> zoo "
                        "moe_llava DIR")
    ml.add_argument("--checkpoint", required=True, help="folder with config.json (model_type moe_llava_stablelm, "
                    "moe_llava_phi or moe_llava_qwen) and its weights")
    ml.add_argument("--out", required=True, help="output folder; load with zoo.create_model('local-dir:DIR')")
    ml.add_argument("--image-tower", help="the vision tower's Hugging Face folder or hub id (default: the config's "
                    "mm_image_tower, looked up offline next to the checkpoint and in the Hugging Face cache)")
    ml.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="precision of the stored weights")
    um = sub.add_parser("uni-moe", help="official Uni-MoE v1 (speech) checkpoint, -e2 LoRA fine-tune or 8-expert "
                        "fine-tune (HITsz-TMG Uni_MoE, Uni_MoE_8e) -> zoo uni_moe DIR")
    um.add_argument("--checkpoint", required=True, help="folder with config.json (model_type llava, num_experts, "
                    "mm_audio_tower) and pytorch_model*.bin (+ mm_projector.bin / mm_audio_aligner.bin); or a LoRA "
                    "fine-tune folder (-e2: adapter_config.json + adapter_model.bin, non_lora_trainables.bin, "
                    "mlp_gates.bin, mm_audio_aligner.bin), which needs --base")
    um.add_argument("--base", help="for a LoRA fine-tune: the full checkpoint folder it was trained from (e.g. the "
                    "speech base); its LoRA deltas (lora_alpha / r) B A are merged into the base's dense weights, "
                    "non_lora_trainables.bin / mlp_gates.bin / mm_audio_aligner.bin replace base tensors")
    um.add_argument("--mlp-dir", help="for an 8-expert fine-tune ({e}_mlp_experts.bin files): the folder with the "
                    "experts' base FFN files (the Uni-MoE-8e-Experts release: mlp_audiocap.bin, mlp_basev.bin, ...)")
    um.add_argument("--expert-bases", help="for an 8-expert fine-tune: the base file of each expert, comma-separated "
                    "(default the official table mlp_audiocap,mlp_basev,mlp_base,mlp_base1,mlp_base4,mlp_base7,"
                    "mlp_base,mlp_base7)")
    um.add_argument("--out", required=True, help="output folder; load with zoo.create_model('local-dir:DIR')")
    um.add_argument("--vision-tower", help="the CLIP vision folder (default: the config's mm_vision_tower, looked up "
                    "offline next to the checkpoint and in the Hugging Face cache)")
    um.add_argument("--audio-tower", help="the Whisper folder (speech variant) or the official BEATs .pt (audio "
                    "variant, e.g. BEATs_iter3_plus_AS2M.pt); default: the config's mm_audio_tower, looked up the "
                    "same way (for a .pt: its base name next to the checkpoint and in its parent)")
    um.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="precision of the stored weights")
    lst = sub.add_parser("list", help="the published V-MoE checkpoints and how to convert them")
    del lst
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "list":
        for name, info in PUBLISHED.items():
            print(f"gs://vmoe_checkpoints/{name}\n    {info['description']}\n    python -m zoo.convert vmoe "
                  f"--checkpoint PATH/{name} --out weights/converted/{name}")
        for name, why in UNSUPPORTED_PUBLISHED.items():
            print(f"gs://vmoe_checkpoints/{name}\n    not supported: {why}")
        return 0
    from zoo.config import to_dict

    if args.cmd == "hf-lm":
        import torch

        from zoo.convert.hf_lm import convert_hf_lm

        model = convert_hf_lm(args.checkpoint, args.out, dtype=getattr(torch, args.dtype) if args.dtype else None)
        n = sum(p.numel() for p in model.parameters())
        print(json.dumps(to_dict(model.config)))
        print(f"wrote {args.out} ({n:,} parameters); load with zoo.create_model('local-dir:{args.out}')")
        return 0
    if args.cmd == "moe-llava":
        import torch

        from zoo.convert.moe_llava import convert_moe_llava

        model = convert_moe_llava(args.checkpoint, args.out, image_tower=args.image_tower,
                                  dtype=getattr(torch, args.dtype))
        n = sum(p.numel() for p in model.parameters())
        print(f"wrote {args.out} ({n:,} parameters); load with zoo.create_model('local-dir:{args.out}')")
        return 0
    if args.cmd == "uni-moe":
        import torch

        from zoo.convert.uni_moe import convert_uni_moe

        model = convert_uni_moe(args.checkpoint, args.out, vision_tower=args.vision_tower,
                                audio_tower=args.audio_tower, dtype=getattr(torch, args.dtype), base=args.base,
                                mlp_dir=args.mlp_dir, expert_bases=args.expert_bases)
        n = sum(p.numel() for p in model.parameters())
        print(f"wrote {args.out} ({n:,} parameters); load with zoo.create_model('local-dir:{args.out}')")
        return 0
    from zoo.convert.vmoe import convert_vmoe

    model = convert_vmoe(args.checkpoint, args.out, preset=args.preset, config=args.config,
                         image_size=args.image_size, top_k=args.top_k, capacity_factor=args.capacity_factor,
                         group_size=args.group_size, batch_priority=args.batch_priority, tag=args.tag,
                         pos_embed_resize=args.pos_embed_resize)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps(to_dict(model.config)))
    print(f"wrote {args.out} ({n:,} parameters); load with zoo.create_model('local-dir:{args.out}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
