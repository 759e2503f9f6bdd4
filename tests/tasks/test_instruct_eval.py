"""eval.py on an InstructTask checkpoint (a 2-step stage-III MoE on real MNIST questions, POPE and Flickr8k
captions): per-task metrics (exact match, POPE accuracy + yes-ratio, BLEU-4 / CIDEr), the routing-by-modality PNG,
and the checkpoint's vocabulary restored (eval reproduces the in-process test of the same weights)."""

import json

import lightning as L
import pytest

from zoo.tasks.instruct import InstructTask


def test_eval_py_on_instruct_checkpoint(tmp_path):
    from tests.conftest import shared_dataset_dir
    from zoo.data.instruct_sets import InstructSetsDataModule
    from zoo.tasks.evaluate import main as evaluate

    shared_dataset_dir("mnist", "t10k-images-idx3-ubyte.gz")
    shared_dataset_dir("flickr8k_1k_subset", "captions.txt")
    L.seed_everything(0)

    def dm():
        return InstructSetsDataModule(tasks=["mnist", "pope", "flickr8k_captions"],
                                      task_options={"pope": {"source": "mnist"}}, num_train=16, num_val=4, num_test=4,
                                      image_size=32, tokens_per_image=16, batch_size=8, seed=0)

    task = InstructTask("moe_llava_tiny_dense", model_overrides={"vision.image_size": 32}, lr=1e-2, warmup_steps=1,
                        upcycle={"num_experts": 4, "top_k": 2, "num_modalities": 4}, max_new_tokens=6)
    data = dm()
    data.setup()
    task.adapt_to_datamodule(data)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(task, datamodule=data)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    direct = trainer.test(task, datamodule=data, verbose=False)[0]

    out = tmp_path / "eval.json"
    result = evaluate(["--checkpoint", str(ckpt), "--no-progress-bar", "--accelerator", "cpu", "--output", str(out)])
    m = result["metrics"]
    for key in ("mnist/exact_match", "pope/exact_match", "pope/accuracy", "pope/yes_ratio",
                "flickr8k_captions/bleu4", "flickr8k_captions/cider"):
        assert key in m and 0.0 <= m[key] <= (10.0 if "cider" in key else 1.0), key
    # same weights, same data, same vocabulary (restored from the checkpoint): the same numbers as trainer.test
    for key, value in direct.items():
        assert m[key.removeprefix("test/")] == pytest.approx(float(value), abs=1e-5), key
    assert set(result["layers"]) == set(task.layer_names) and len(result["layers"]) == 2
    names = {p.rsplit("/", 1)[-1] for p in result["plots"]}
    assert "routing_test_by_modality.png" in names and "test_answers.jsonl" in names
    png = next(p for p in result["plots"] if p.endswith("routing_test_by_modality.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    answers = [json.loads(line) for line in open(next(p for p in result["plots"] if p.endswith(".jsonl")))]
    assert {a["task"] for a in answers} == {"mnist", "pope", "flickr8k_captions"}
    assert json.loads(out.read_text())["metrics"] == m
