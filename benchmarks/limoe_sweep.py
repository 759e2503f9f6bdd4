#!/usr/bin/env python
"""Run several LIMoE recipe variants in parallel (one process each) and tabulate them: a small hyperparameter
search for a recipe, made on a VALIDATION split carved out of the training photos (the test split stays unseen).

    python benchmarks/limoe_sweep.py --config configs/train/limoe_flickr8k.yaml --variants flickr8k_gpu \\
        --out /tmp/sweep --jobs 8 -- --trainer.accelerator=gpu --data.init_args.num_val=100

Each variant is ``benchmarks/limoe_run.py --config CONFIG --run_name NAME --out OUT/NAME.json`` plus the common
arguments after ``--`` plus the variant's own arguments. Writes ``OUT/sweep.json`` and ``OUT/sweep.md`` (val and,
when tested, test recall per variant, sorted by the selection metric).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _model(overrides: dict) -> str:
    return "--model.init_args.model_overrides=" + json.dumps(overrides)


# Flickr8k on one GPU: larger inputs and widths than the CPU recipe (32 px, width 64, 4 blocks). Every variant
# keeps LIMoE's routing (8 experts, top-1, BPR, per-modality entropy losses) and changes size / schedule only.
_W128 = {"image_size": 64, "patch_size": 8, "embed_dim": 128, "encoder.dim": 128, "encoder.depth": 6,
         "encoder.num_heads": 4, "encoder.mlp_dim": 512}
_BASE = {"in_chans": 3, "image_size": 32}
_EMA = ["--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay=0.998"]
_E200 = ["--trainer.max_epochs=200"]
_IMG_SSL = ["--data.init_args.image_views=2", "--model.init_args.image_ssl_weight=1.0"]
_TXT_SSL = ["--data.init_args.text_views=2", "--model.init_args.text_ssl_weight=1.0"]
VARIANTS = {
    "flickr8k_gpu": {
        "base_32px_w64": [_model(_BASE)],
        "w128_64px_e200": [_model(_W128), "--data.init_args.image_size=64", "--trainer.max_epochs=200"],
        "w192_64px_e200": [_model({**_W128, "embed_dim": 192, "encoder.dim": 192, "encoder.num_heads": 6,
                                   "encoder.mlp_dim": 768}), "--data.init_args.image_size=64",
                           "--trainer.max_epochs=200"],
        "w128_64px_e400": [_model(_W128), "--data.init_args.image_size=64", "--trainer.max_epochs=400"],
        "w128_64px_e200_b128": [_model(_W128), "--data.init_args.image_size=64", "--trainer.max_epochs=200",
                                "--data.init_args.batch_size=128"],
        "w128_64px_e200_lr5e-4": [_model(_W128), "--data.init_args.image_size=64", "--trainer.max_epochs=200",
                                  "--model.init_args.lr=0.0005"],
        "w128_64px_e200_pdrop0.25": [_model({**_W128, "patch_dropout": 0.25}), "--data.init_args.image_size=64",
                                     "--trainer.max_epochs=200"],
        "w128_64px_e200_depth4": [_model({**_W128, "encoder.depth": 4}), "--data.init_args.image_size=64",
                                  "--trainer.max_epochs=200"],
    },
    # Round 2 (after round 1 showed size and resolution barely matter at 800 photos): caption use, schedule,
    # loss, regularisation, and seeds to see the noise of a 100-photo validation split.
    "flickr8k_gpu2": {
        "base_seed1": [_model(_BASE), "--seed_everything=1"],
        "base_seed2": [_model(_BASE), "--seed_everything=2"],
        "base_allcaps": [_model(_BASE), "--data.init_args.train_all_captions=true"],
        "base_allcaps_e240": [_model(_BASE), "--data.init_args.train_all_captions=true", "--trainer.max_epochs=240"],
        "base_e240": [_model(_BASE), "--trainer.max_epochs=240"],
        "base_sigmoid": [_model({**_BASE, "loss": "sigmoid"})],
        "base_wd0.5": [_model(_BASE), "--model.init_args.weight_decay=0.5"],
        "w128_64px_allcaps": [_model(_W128), "--data.init_args.image_size=64", "--trainer.max_epochs=200",
                              "--data.init_args.train_all_captions=true"],
    },
    # Round 3: round 2's only clear gain was the longer schedule; how far does it go (and with which noise)?
    "flickr8k_gpu3": {
        "base_e240_seed1": [_model(_BASE), "--trainer.max_epochs=240", "--seed_everything=1"],
        "base_e360": [_model(_BASE), "--trainer.max_epochs=360"],
        "base_e360_seed1": [_model(_BASE), "--trainer.max_epochs=360", "--seed_everything=1"],
        "base_e480": [_model(_BASE), "--trainer.max_epochs=480"],
        "base_e480_seed1": [_model(_BASE), "--trainer.max_epochs=480", "--seed_everything=1"],
        "base_e480_b128": [_model(_BASE), "--trainer.max_epochs=480", "--data.init_args.batch_size=128"],
    },
    # Round 4, with configs/train/limoe_flickr8k_cifar.yaml (common: --data.init_args.main.init_args.num_val=100):
    # does more image-text data in the same run (CIFAR-10 photos + class captions) lift Flickr8k retrieval?
    # flickr_only_* is the Flickr8k-only recipe run through the same mixture module, as the in-round control.
    "flickr8k_mix": {
        "mix_r5": [],
        "mix_r5_seed1": ["--seed_everything=1"],
        "mix_r5_seed2": ["--seed_everything=2"],
        "mix_r5_pairs": ["--model.init_args.positives=pairs"],
        "mix_r3_e30": ["--data.init_args.main_repeats=3", "--trainer.max_epochs=30"],
        "mix_r2_e35": ["--data.init_args.main_repeats=2", "--trainer.max_epochs=35"],
        "flickr_only": ["--data.init_args.extra=[]", "--data.init_args.main_repeats=1", "--trainer.max_epochs=240",
                        "--trainer.check_val_every_n_epoch=20"],
        "flickr_only_seed1": ["--data.init_args.extra=[]", "--data.init_args.main_repeats=1",
                              "--trainer.max_epochs=240", "--trainer.check_val_every_n_epoch=20",
                              "--seed_everything=1"],
    },
    # Round 5, Flickr8k-only recipe (common: --data.init_args.num_val=100): mask the caption words no training
    # batch contained (LIMoEConfig.mask_unseen_tokens) at evaluation, against the same seeds without it.
    "flickr8k_unseen": {
        **{f"base_seed{s}": [_model(_BASE), f"--seed_everything={s}"] for s in (0, 1, 2)},
        **{f"unseen_seed{s}": [_model({**_BASE, "mask_unseen_tokens": True}), f"--seed_everything={s}"]
           for s in (0, 1, 2)},
        "unseen_tdrop0.3": [_model({**_BASE, "mask_unseen_tokens": True, "text_token_dropout": 0.3})],
        "unseen_tdrop0.1": [_model({**_BASE, "mask_unseen_tokens": True, "text_token_dropout": 0.1})],
    },
    # Round 6: a convolutional stem instead of the linear patch projection (LIMoEConfig.patch_stem; at 32 px
    # and at 64 px with the same 8x8 token grid), and an EMA of the weights (Lightning's EMAWeightAveraging).
    "flickr8k_stem": {
        **{f"conv32_seed{s}": [_model({**_BASE, "patch_stem": "conv"}), f"--seed_everything={s}"] for s in (0, 1, 2)},
        **{f"conv64_seed{s}": [_model({**_BASE, "image_size": 64, "patch_size": 8, "patch_stem": "conv"}),
                               "--data.init_args.image_size=64", f"--seed_everything={s}"] for s in (0, 1)},
        **{f"ema_seed{s}": [_model(_BASE), *_EMA, f"--seed_everything={s}"] for s in (0, 1)},
        "conv32_ema": [_model({**_BASE, "patch_stem": "conv"}), *_EMA],
    },
    # Round 7: self-supervision on the same photos and captions (ContrastiveTask image_ssl_weight / text_ssl_weight,
    # datamodule image_views / text_views / view_color_jitter; off in the recipe). SLIP-style SimCLR loss between
    # two augmented views of each image (weights 1.0 and 0.3; with SimCLR colour distortion of the second view),
    # an InfoNCE loss between two captions of each image, and both. A second view costs about one more forward /
    # backward pass per step, so the whole round (controls included) runs 200 epochs instead of the recipe's 240
    # to fit one device command with 8 variants in parallel; ctrl_* are the in-round controls at 200 epochs.
    "flickr8k_ssl": {
        **{f"ctrl_seed{s}": [_model(_BASE), *_E200, f"--seed_everything={s}"] for s in (0, 1)},
        **{f"img1_seed{s}": [_model(_BASE), *_E200, *_IMG_SSL, f"--seed_everything={s}"] for s in (0, 1)},
        "img0.3": [_model(_BASE), *_E200, "--data.init_args.image_views=2", "--model.init_args.image_ssl_weight=0.3"],
        "img1_color0.5": [_model(_BASE), *_E200, *_IMG_SSL, "--data.init_args.view_color_jitter=0.5"],
        "txt1": [_model(_BASE), *_E200, *_TXT_SSL],
        "img1_txt1": [_model(_BASE), *_E200, *_IMG_SSL, *_TXT_SSL],
    },
    # Round 8: more seeds of round 7's two best (text SSL, image SSL at 0.3), both together, text SSL at the
    # recipe's 240 epochs.
    "flickr8k_ssl2": {
        **{f"txt1_seed{s}": [_model(_BASE), *_E200, *_TXT_SSL, f"--seed_everything={s}"] for s in (1, 2)},
        **{f"img0.3_seed{s}": [_model(_BASE), *_E200, "--data.init_args.image_views=2",
                               "--model.init_args.image_ssl_weight=0.3", f"--seed_everything={s}"] for s in (1, 2)},
        **{f"txt1_img0.3_seed{s}": [_model(_BASE), *_E200, *_TXT_SSL, "--data.init_args.image_views=2",
                                    "--model.init_args.image_ssl_weight=0.3", f"--seed_everything={s}"]
           for s in (0, 1)},
        "ctrl_seed2": [_model(_BASE), *_E200, "--seed_everything=2"],
        "txt1_e240": [_model(_BASE), *_TXT_SSL],
    },
}


# Every round ran before the recipe (configs/train/limoe_flickr8k.yaml) took the text SSL loss: its variants start
# from the recipe without it (a variant's own flags come later and win). Round 4 uses another recipe.
_NO_TXT_SSL = ["--data.init_args.text_views=1", "--model.init_args.text_ssl_weight=0.0"]
VARIANTS = {round_name: {name: ([] if round_name == "flickr8k_mix" else _NO_TXT_SSL) + args for name, args in v.items()}
            for round_name, v in VARIANTS.items()}


def metric(res: dict, split: str, key: str):
    """A recall of a limoe_run.py JSON in percent (the unit of the recorded sweep tables)."""
    from limoe_report import in_percent  # noqa: PLC0415 (benchmarks/ is on sys.path when run as a script)

    m = (in_percent(res) if res else {}).get(split) or {}
    return m.get(key)


def main() -> None:
    argv = sys.argv[1:]
    common = []
    if "--" in argv:
        i = argv.index("--")
        argv, common = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--variants", required=True, choices=sorted(VARIANTS))
    ap.add_argument("--only", default="", help="comma list of variant names")
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=540, help="seconds per variant")
    ap.add_argument("--select", default="val_mean_r10", help="column to sort by")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = VARIANTS[args.variants]
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    pending = list(variants.items())
    running: list[tuple[str, subprocess.Popen, float, object]] = []
    status: dict[str, dict] = {}
    t0 = time.time()
    while pending or running:
        while pending and len(running) < args.jobs:
            name, extra = pending.pop(0)
            # --overwrite: a sweep re-runs its variants from scratch (train.py refuses to overwrite a run otherwise)
            cmd = [sys.executable, str(HERE / "limoe_run.py"), "--config", args.config, "--run_name", name,
                   "--out", str(out / f"{name}.json"), "--overwrite", "true", *common, *extra]
            log = open(out / f"{name}.log", "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time(), log))
            status[name] = {"command": " ".join(cmd[1:])}
        time.sleep(2)
        for item in list(running):
            name, proc, start, log = item
            rc = proc.poll()
            if rc is None and time.time() - start > args.timeout:
                proc.kill()
                rc = "timeout"
            if rc is not None:
                log.close()
                running.remove(item)
                status[name].update(rc=rc, wall_s=round(time.time() - start, 1))
                print(f"[{time.time() - t0:.0f}s] {name}: rc={rc}", flush=True)
    rows = []
    for name, st in status.items():
        path = out / f"{name}.json"
        res = json.loads(path.read_text()) if path.exists() else {}
        row = {"variant": name, "rc": st["rc"], "wall_s": st["wall_s"], "command": st["command"],
               "num_params": res.get("num_params")}
        for split in ("val", "test"):
            for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
                row[f"{split}_{key}"] = metric(res, split, key)
            a, b = row[f"{split}_i2t_R@10"], row[f"{split}_t2i_R@10"]
            row[f"{split}_mean_r10"] = (a + b) / 2 if a is not None and b is not None else None
        rows.append(row)
    rows.sort(key=lambda r: -(r.get(args.select) or -1))
    (out / "sweep.json").write_text(json.dumps({"config": args.config, "common": common, "rows": rows}, indent=1))
    cols = ["variant", "rc", "wall_s", "num_params", "val_i2t_R@10", "val_t2i_R@10", "val_mean_r10",
            "test_i2t_R@10", "test_t2i_R@10"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
