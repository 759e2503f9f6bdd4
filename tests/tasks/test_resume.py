"""Exact resume (issue 17 items 1-3): the shipped recipes checkpoint DURING training with their own settings, a run
killed with SIGKILL at random moments and resumed with ``--ckpt_path last`` ends with the uninterrupted run's
weights bit for bit (CPU), a checkpoint on an epoch's last batch does not replay an epoch, metrics.csv keeps no
rows of the killed run past its checkpoint, and a new run into a folder holding one is refused."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import load_benchmark
from zoo.tasks.cli import DEFAULT_CHECKPOINT_EVERY_N_STEPS, build_cli, checkpoint_callback, main

REPO = Path(__file__).resolve().parents[2]
DIGITS = str(REPO / "configs" / "train" / "vmoe_digits.yaml")
QUIET = ["--test=false", "--trainer.enable_progress_bar=false"]


def _kill_resume():
    return load_benchmark("kill_resume")


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_checkpoints_during_training(config):
    recipe = yaml.safe_load(config.read_text())
    assert recipe.get("trainer", {}).get("enable_checkpointing", True) is not False
    checkpoint = recipe.get("checkpoint") or {}
    assert checkpoint.get("every_n_epochs") is None and checkpoint.get("train_time_interval") is None
    every = checkpoint.get("every_n_train_steps", DEFAULT_CHECKPOINT_EVERY_N_STEPS)  # none set: the callback's
    assert isinstance(every, int) and 1 <= every <= 200


def test_the_checkpoint_interval_reaches_the_callback(tmp_path):
    cb = checkpoint_callback(build_cli(["--config", DIGITS, f"--trainer.default_root_dir={tmp_path}"]).trainer)
    assert cb._every_n_train_steps == yaml.safe_load(open(DIGITS))["checkpoint"]["every_n_train_steps"]
    # a recipe without an interval still checkpoints during training (the callback's default)
    bare = tmp_path / "bare.yaml"  # the digits recipe without its checkpoint section
    bare.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(open(DIGITS)).items() if k != "checkpoint"}))
    cb = checkpoint_callback(build_cli(["--config", str(bare), f"--trainer.default_root_dir={tmp_path}"]).trainer)
    assert cb._every_n_train_steps == DEFAULT_CHECKPOINT_EVERY_N_STEPS
    cb = checkpoint_callback(build_cli(["--config", DIGITS, f"--trainer.default_root_dir={tmp_path}",
                                        "--checkpoint.every_n_train_steps=null"]).trainer)
    assert cb._every_n_train_steps == 0 or cb._every_n_train_steps is None  # explicit null: the user's choice
    cb = checkpoint_callback(build_cli(["--config", DIGITS, f"--trainer.default_root_dir={tmp_path}",
                                        "--checkpoint.every_n_epochs=1"]).trainer)
    assert cb._every_n_epochs == 1 and not cb._every_n_train_steps  # another trigger replaces the step interval


@pytest.mark.parametrize("recipe,steps", [("classification", 60), ("contrastive", 60)])
def test_kill_and_resume_gives_the_uninterrupted_weights(recipe, steps, tmp_path):
    """Two kills at random moments after checkpoints (the recipe's own interval), each resumed with
    --ckpt_path last: the final weights equal the uninterrupted run's bit for bit."""
    kr = _kill_resume()
    seed = random.SystemRandom().randrange(1 << 30)
    # the uninterrupted run in this process (saves a start-up; same CPU kernels and thread count as train.py)
    main([*kr.RECIPES[recipe], *kr.COMMON, f"--trainer.default_root_dir={tmp_path}", "--run_name=uninterrupted",
          f"--trainer.max_steps={steps}"])
    reference = kr.final_weights(tmp_path / "runs" / "uninterrupted")
    out = kr.kill_resume_run(recipe, steps, tmp_path, "killed", kills=2, rng=random.Random(seed), max_delay_s=1.5)
    assert out["kills"] >= 1, out
    assert kr.identical(reference, kr.final_weights(out["run_dir"])), f"delay seed {seed}: {out}"
    # metrics.csv of the killed-and-resumed run: one row set, as the uninterrupted run's (no replayed rows)
    # (a kill between a checkpoint and the flush of that step's row may leave that one row out, never a copy)
    killed, whole = _rows(out["run_dir"] / "metrics.csv"), _rows(tmp_path / "runs" / "uninterrupted" / "metrics.csv")
    assert len(set(killed)) == len(killed) and set(killed) <= set(whole) and killed[-1] == whole[-1]


def _rows(path: Path) -> list[tuple]:
    with open(path, newline="") as f:
        return [(r["epoch"], r["step"], r.get("train/loss"), r.get("val/loss")) for r in csv.DictReader(f)]


def test_checkpoint_on_an_epochs_last_batch_does_not_replay_an_epoch(tmp_path):
    """digits: 20 batches per epoch. A run stopped right after the last batch of epoch 0, resumed to step 30, is
    the 30-step run: same epoch count, same weights, same metrics rows."""
    base = ["--config", DIGITS, *QUIET, f"--trainer.default_root_dir={tmp_path}", "--trainer.log_every_n_steps=1"]
    whole = main([*base, "--run_name=whole", "--trainer.max_steps=30"])
    main([*base, "--run_name=split", "--trainer.max_steps=20"])
    resumed = main([*base, "--run_name=split", "--trainer.max_steps=30", "--ckpt_path=last"])
    assert resumed["start_global_step"] == 20 and resumed["global_step"] == whole["global_step"] == 30
    a, b = (torch.load(tmp_path / "runs" / r / "checkpoints" / "last.ckpt", weights_only=False)
            for r in ("whole", "split"))
    assert a["epoch"] == b["epoch"] == 1
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert _rows(tmp_path / "runs" / "split" / "metrics.csv") == _rows(tmp_path / "runs" / "whole" / "metrics.csv")


def test_resume_drops_the_killed_runs_rows_past_its_checkpoint(tmp_path):
    base = ["--config", DIGITS, *QUIET, f"--trainer.default_root_dir={tmp_path}", "--trainer.log_every_n_steps=1",
            "--run_name=r"]
    main([*base, "--trainer.max_steps=6"])
    metrics = tmp_path / "runs" / "r" / "metrics.csv"
    with open(metrics, newline="") as f:  # as if the run had logged 3 more steps before being killed
        rows = list(csv.DictReader(f))
        fields = list(rows[0])
    with open(metrics, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writerows({**rows[-1], "step": str(s)} for s in (6, 7, 8))
    main([*base, "--trainer.max_steps=8", "--ckpt_path=last"])
    steps = [int(r["step"]) for r in csv.DictReader(open(metrics, newline=""))]
    assert steps == list(range(8))


def test_a_new_run_into_a_folder_holding_one_is_refused(tmp_path, capsys):
    base = ["--config", DIGITS, *QUIET, f"--trainer.default_root_dir={tmp_path}", "--run_name=r",
            "--trainer.max_steps=2", "--trainer.log_every_n_steps=1"]
    main(base)
    ckpt = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(base)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--ckpt_path last" in err and "--run_name" in err and "--overwrite" in err
    assert ckpt.read_bytes() == before  # untouched
    out = main([*base, "--overwrite=true", "--trainer.max_steps=1"])
    assert out["global_step"] == 1 and torch.load(ckpt, weights_only=False)["global_step"] == 1
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "runs" / "r" / "metrics.csv", newline=""))]
    assert steps == [0]  # the old run's rows are gone


def test_resuming_with_changed_model_settings_says_what_differs(tmp_path, capsys):
    """A run resumed (--ckpt_path last) after its model settings changed gets one clear error naming what differs
    and how to go on, not Lightning's strict-load dump; the checkpoint stays as it was."""
    base = ["--config", DIGITS, *QUIET, f"--trainer.default_root_dir={tmp_path}", "--run_name=r",
            "--trainer.max_steps=2"]
    main(base)
    ckpt = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    wider = ["--model.model_overrides={encoder: {dropout: 0.1, mlp_dim: 72}}"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--trainer.max_steps=4", "--ckpt_path=last", *wider])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "written by a different model" in err and "of another shape" in err and "--overwrite" in err
    assert ckpt.read_bytes() == before
    out = main([*base, "--trainer.max_steps=4", "--ckpt_path=last"])  # the same settings still resume
    assert out["global_step"] == 4


def test_two_process_run_resumed_part_way_into_an_epoch_gives_the_uninterrupted_weights(tmp_path):
    """DDP on 2 CPU processes (gloo), digits: 10 batches per epoch on each rank. A run stopped at step 12 (2 batches
    into epoch 1) and resumed to step 30 with --ckpt_path last ends with the 30-step run's weights bit for bit.
    Before the sharded resumable sampler, Lightning's wrapper of the sampler failed on the resumed run's first batch
    (IndexError: the resumed epoch is shorter than the wrapper's index range)."""
    import subprocess
    import sys

    kr = _kill_resume()
    base = ["--config", DIGITS, *QUIET, f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu",
            "--trainer.devices=2", "--trainer.strategy=ddp"]

    def train(*args):
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *base, *args], cwd=REPO, env=kr._env(),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    train("--run_name=whole", "--trainer.max_steps=30")
    train("--run_name=split", "--trainer.max_steps=12")
    train("--run_name=split", "--trainer.max_steps=30", "--ckpt_path=last")
    whole, split = (kr.final_weights(tmp_path / "runs" / r) for r in ("whole", "split"))
    assert kr.identical(whole, split)
