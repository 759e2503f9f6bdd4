"""Nearest-neighbour caption baseline for the MoE-LLaVA Flickr8k caption task (issue 19).

For every Flickr8k test photo of the split InstructSetsDataModule uses for ``flickr8k_captions`` (the recipe's seed
and limits), answer with a caption of the TRAINING photo whose frozen vision-tower features are closest (cosine
similarity of the mean-pooled tower output). Scored with :mod:`zoo.tasks.caption_metrics` (BLEU-4, CIDEr-D) against
the test photo's 5 captions, like the trained model's answers. A model that scores below this has not learnt more
from the image than "which training photo looks alike" under a random tower.

The tower is the one the recipe trains with: stage I builds the model after ``seed_everything(seed)`` and every
stage keeps the tower frozen, so the same seed-initialised tower is rebuilt here from the recipe's model preset and
overrides (or read from ``--checkpoint``, an InstructTask training checkpoint). Which of the training photo's 5
captions is answered: the first (the one listed first in captions.txt), the caption the data module treats as a
photo's primary one.

    python benchmarks/caption_nn_baseline.py            # writes benchmarks/results/caption_nn_baseline.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "configs/train/moe_llava_stage2.yaml"
RESULTS = ROOT / "benchmarks/results"


def nearest_train(test_feats: torch.Tensor, train_feats: torch.Tensor) -> torch.Tensor:
    """Index of the cosine-nearest row of ``train_feats [N, D]`` for each row of ``test_feats [M, D]`` (ties: the
    lowest index, as argmax gives)."""
    a = torch.nn.functional.normalize(test_feats.double(), dim=-1)
    b = torch.nn.functional.normalize(train_feats.double(), dim=-1)
    return (a @ b.T).argmax(dim=-1)


def recipe_settings(path: Path = RECIPE) -> dict[str, Any]:
    cfg = yaml.safe_load(path.read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    return {"seed": int(cfg.get("seed_everything", 0)), "model": model["model"],
            "model_overrides": model.get("model_overrides") or {}, "image_size": int(data["image_size"]),
            "data_seed": int(data.get("seed", 0)),
            "limits": {"train": data.get("num_train"), "val": data.get("num_val"), "test": data.get("num_test")},
            "image_aspect": data.get("image_aspect", "pad")}


def build_tower(settings: dict[str, Any], checkpoint: Optional[str] = None) -> torch.nn.Module:
    import lightning as L

    from zoo.tasks.instruct import InstructTask

    # Same order as train.py: seed, then the task builds the model (the tower's initial = frozen weights).
    L.seed_everything(settings["seed"], verbose=False)
    task = InstructTask(settings["model"], model_overrides=settings["model_overrides"])
    tower = task.model.vision_tower
    if checkpoint:
        from zoo.tasks.checkpoints import load_training_checkpoint

        state = load_training_checkpoint(checkpoint)["state_dict"]
        prefix = "model.vision_tower."
        tower_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not tower_state:
            raise ValueError(f"{checkpoint} has no {prefix}* weights (not a MoE-LLaVA InstructTask checkpoint)")
        tower.load_state_dict(tower_state)
    return tower.eval()


@torch.no_grad()
def tower_features(tower: torch.nn.Module, paths: list[str], processor: Any, batch: int = 64) -> torch.Tensor:
    from PIL import Image

    out = []
    for i in range(0, len(paths), batch):
        imgs = []
        for p in paths[i:i + batch]:
            with Image.open(p) as im:
                imgs.append(processor(im))
        feats = tower(torch.stack(imgs))  # [B, T, D] token features, as the projector sees them
        out.append(feats.float().mean(dim=1))
    return torch.cat(out)


def run(checkpoint: Optional[str] = None, data_dir: Optional[str] = None) -> dict[str, Any]:
    from zoo.data.instruct import CLIP_MEAN, CLIP_STD, ImageProcessor
    from zoo.data.instruct_sets import flickr8k_captions
    from zoo.tasks.caption_metrics import bleu4, cider_d

    s = recipe_settings()
    splits = flickr8k_captions(data_dir=data_dir, seed=s["data_seed"], limits=s["limits"])
    # Training samples are one per (photo, caption); keep each photo once with its first caption.
    train_photos: dict[str, str] = {}
    for smp in splits["train"]:
        train_photos.setdefault(smp.image, smp.conversations[-1]["value"])
    test = splits["test"]
    processor = ImageProcessor(s["image_size"], CLIP_MEAN, CLIP_STD, s["image_aspect"])
    tower = build_tower(s, checkpoint)
    train_paths = list(train_photos)
    train_feats = tower_features(tower, train_paths, processor)
    test_feats = tower_features(tower, [smp.image for smp in test], processor)
    nn_idx = nearest_train(test_feats, train_feats)
    answers = [train_photos[train_paths[int(j)]] for j in nn_idx]
    refs = [list(smp.references) for smp in test]
    import lightning
    import zoo

    return {
        "benchmark": "caption_nn_baseline",
        "what": "Flickr8k test photo -> first caption of the cosine-nearest training photo (mean-pooled frozen "
                "vision-tower features); BLEU-4 and CIDEr-D against the test photo's 5 captions",
        "recipe": str(RECIPE.relative_to(ROOT)),
        "tower": f"checkpoint {checkpoint}" if checkpoint else f"seed-{s['seed']} initialised tower of "
                                                               f"{s['model']} + recipe overrides (frozen in training)",
        "num_train_photos": len(train_paths), "num_test_photos": len(test),
        "bleu4": bleu4(answers, refs), "cider_d": cider_d(answers, refs),
        "examples": [{"image": Path(t.image).name, "answer": a, "references": r}
                     for t, a, r in list(zip(test, answers, refs))[:5]],
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "lightning": lightning.__version__, "zoo": getattr(zoo, "__version__", "?")},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Nearest-neighbour caption baseline (Flickr8k, issue 19)", "", r["what"] + ".", "",
             f"- recipe: `{r['recipe']}`; tower: {r['tower']}",
             f"- {r['num_train_photos']} training photos, {r['num_test_photos']} test photos", "",
             "| metric | value |", "|---|---|", f"| BLEU-4 | {r['bleu4']:.4f} |", f"| CIDEr-D | {r['cider_d']:.4f} |",
             "", "Examples:", ""]
    lines += [f"- {e['image']}: \"{e['answer']}\" (first reference: \"{e['references'][0]}\")" for e in r["examples"]]
    lines += ["", f"Device: {r['device']} ({r['cpu']}, {r['threads']} threads); versions: "
              + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + f"; date {r['date']}.", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="use this InstructTask checkpoint's tower")
    p.add_argument("--data-dir", default=None, help="Flickr8k folder (default: the shared data folder)")
    p.add_argument("--out", default=str(RESULTS / "caption_nn_baseline"), help="output path without extension")
    args = p.parse_args(argv)
    r = run(args.checkpoint, args.data_dir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(r))
    print(json.dumps({k: r[k] for k in ("bleu4", "cider_d", "num_train_photos", "num_test_photos")}))
    return r


if __name__ == "__main__":
    main()
