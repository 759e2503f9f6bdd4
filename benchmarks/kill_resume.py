"""Kill -9 / resume sweep: train a recipe with ``train.py``, SIGKILL it at random moments after its checkpoints,
resume with ``--ckpt_path last`` each time, and compare the final weights with an uninterrupted run (bit for bit,
CPU). The recipes' own checkpoint settings are used (no special interval).

    python benchmarks/kill_resume.py --runs 10 --kills 3 --out benchmarks/results/kill_resume.json

``tests/tasks/test_resume.py`` runs :func:`kill_resume_run` once per recipe on a short run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parents[1]

# Short runs of two shipped recipes on data that needs no download (scikit-learn digits): each extra argument
# shortens or fits the run to digits; the checkpoint settings are the recipe's.
RECIPES: dict[str, list[str]] = {
    "classification": ["--config", str(REPO / "configs" / "train" / "vmoe_digits.yaml")],
    "contrastive": ["--config", str(REPO / "configs" / "train" / "limoe_mnist.yaml"), "--data.dataset=digits",
                    "--data.batch_size=64", '--model.init_args.model_overrides={"patch_size": 2}'],
}
COMMON = ["--test=false", "--trainer.enable_progress_bar=false"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def reference_run(recipe: str, steps: int, root: Path) -> Path:
    """The uninterrupted run (a subprocess, like the killed ones); returns its run folder."""
    args = [*RECIPES[recipe], *COMMON, f"--trainer.default_root_dir={root}", "--run_name=uninterrupted",
            f"--trainer.max_steps={steps}"]
    proc = _train(args)
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"uninterrupted run failed:\n{err.decode()[-3000:]}")
    return root / "runs" / "uninterrupted"


def kill_resume_run(recipe: str, steps: int, root: Path, run_name: str, kills: int, rng: random.Random,
                    max_delay_s: float = 1.0, timeout_s: float = 900) -> dict[str, Any]:
    """Train ``recipe`` for ``steps`` optimiser steps, killing it (SIGKILL) ``kills`` times: each time after the
    next checkpoint write plus a random delay in [0, max_delay_s]; resumes with ``--ckpt_path last``. Returns
    the steps killed at (those of the checkpoint resumed from) and the run folder."""
    run_dir = root / "runs" / run_name
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    base = [*RECIPES[recipe], *COMMON, f"--trainer.default_root_dir={root}", f"--run_name={run_name}",
            f"--trainer.max_steps={steps}"]
    resumed_from: list[int] = []
    killed = 0
    deadline = time.time() + timeout_s
    while True:
        resume = ["--ckpt_path=last"] if ckpt.exists() else []
        proc = _train(base + resume)
        seen = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        if killed < kills:
            while proc.poll() is None:  # wait for a new checkpoint, then kill after a random delay
                now = ckpt.stat().st_mtime_ns if ckpt.exists() else None
                if now is not None and now != seen:
                    time.sleep(rng.uniform(0.0, max_delay_s))
                    proc.send_signal(signal.SIGKILL)
                    break
                if time.time() > deadline:
                    proc.kill()
                    raise TimeoutError("no checkpoint written in time")
                time.sleep(0.02)
        _, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
        if proc.returncode == -signal.SIGKILL:
            killed += 1
            resumed_from.append(int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]))
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"train.py failed ({proc.returncode}):\n{err.decode()[-3000:]}")
        return {"run_dir": run_dir, "kills": killed, "resumed_from": resumed_from}


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=sorted(RECIPES), choices=sorted(RECIPES))
    parser.add_argument("--runs", type=int, default=10, help="killed runs per recipe")
    parser.add_argument("--kills", type=int, default=3, help="kills per run")
    parser.add_argument("--steps", type=int, default=120, help="optimiser steps per run")
    parser.add_argument("--root", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="results JSON")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill delays (default: random)")
    args = parser.parse_args(argv)
    import tempfile

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    results: dict[str, Any] = {"steps": args.steps, "kills_per_run": args.kills, "delay_seed": seed, "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            root = Path(args.root or tmp) / recipe
            reference = final_weights(reference_run(recipe, args.steps, root))
            runs = []
            for i in range(args.runs):
                out = kill_resume_run(recipe, args.steps, root, f"killed{i}", args.kills, rng)
                same = identical(reference, final_weights(out["run_dir"]))
                runs.append({"kills": out["kills"], "resumed_from": out["resumed_from"], "bit_identical": same})
                print(json.dumps({"recipe": recipe, "run": i, **runs[-1]}), flush=True)
            results["recipes"][recipe] = {"runs": runs, "identical": sum(r["bit_identical"] for r in runs),
                                          "total": len(runs), "kills": sum(r["kills"] for r in runs)}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: {kk: v[kk] for kk in ("identical", "total", "kills")}
                      for k, v in results["recipes"].items()}))
    return results


if __name__ == "__main__":
    main()
