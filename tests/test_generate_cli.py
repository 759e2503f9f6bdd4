"""python -m zoo.generate: a tiny InstructTask trained 2 CPU steps, saved by Lightning with its datamodule, answers
through the CLI with the checkpoint's own vocabulary, streamed token by token, identical to the model's generate."""

import io

import lightning as L
import numpy as np
import pytest
import torch

from zoo import generate as gen_cli
from zoo.tasks.instruct import InstructTask

TINY = {"vision.image_size": 32}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import shared_dataset_dir
    from zoo.data.instruct_sets import InstructSetsDataModule

    shared_dataset_dir("mnist", "t10k-images-idx3-ubyte.gz")
    tmp = tmp_path_factory.mktemp("gen")
    L.seed_everything(0)
    dm = InstructSetsDataModule(tasks=["mnist"], num_train=16, num_val=4, num_test=4, image_size=32,
                                tokens_per_image=16, batch_size=8, seed=0)
    dm.setup()
    task = InstructTask("moe_llava_tiny_dense", model_overrides=TINY, lr=1e-2, warmup_steps=1)
    task.adapt_to_datamodule(dm)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=str(tmp))
    trainer.fit(task, datamodule=dm)
    ckpt = tmp / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    from PIL import Image

    img = tmp / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(img)
    return task, dm, ckpt, img


def test_checkpoint_answer_streams_with_the_runs_vocabulary(trained):
    task, dm, ckpt, img = trained
    out = io.StringIO()
    pieces = []

    class Spy(io.StringIO):
        def write(self, s):
            pieces.append(s)
            return out.write(s)

    text = gen_cli.main(["--checkpoint", str(ckpt), "--image", str(img), "--prompt", "what digit is this?",
                         "--max-new-tokens", "6"], out=Spy())
    # The same answer, computed directly with the datamodule's tokenizer / template / image processing.
    ids = gen_cli.encode("what digit is this?", dm.tokenizer, "tiny")
    from PIL import Image

    image = dm.image_processor(Image.open(img))[None]
    new = task.model.eval().generate(ids, images=image, max_new_tokens=6, eos_token_id=int(dm.tokenizer.eos_token_id))
    want = dm.tokenizer.decode(new[0].tolist())
    assert text == want
    assert out.getvalue() == want + "\n"
    # streamed: one write per generated non-eos token that adds text (at least one when there is an answer)
    n_tokens = sum(1 for t in new[0].tolist() if t != dm.tokenizer.eos_token_id)
    if want:
        assert 1 <= len(pieces) - 1 <= n_tokens
    # the checkpoint's vocabulary, not a fresh one
    assert gen_cli._checkpoint_tokenizer(torch.load(ckpt, weights_only=False)).bpe_ids == dm.tokenizer.bpe_ids


def test_greedy_is_deterministic_and_sampling_seeded(trained):
    _, _, ckpt, img = trained
    base = ["--checkpoint", str(ckpt), "--image", str(img), "--prompt", "what digit?", "--max-new-tokens", "5"]
    assert gen_cli.main(base, out=io.StringIO()) == gen_cli.main(base, out=io.StringIO())
    s = base + ["--temperature", "5.0", "--seed", "3"]
    assert gen_cli.main(s, out=io.StringIO()) == gen_cli.main(s, out=io.StringIO())


def test_on_token_sees_every_generated_token():
    from zoo.factory import create_model

    torch.manual_seed(0)
    model = create_model("moe_llava_tiny_dense", **TINY).eval()
    ids = torch.tensor([[2, 5, -200, 7, 9]])
    image = torch.randn(1, 3, 32, 32)
    seen = []
    new = model.generate(ids, images=image, max_new_tokens=4, on_token=lambda t: seen.append(int(t[0])))
    assert seen == new[0].tolist()


def test_preset_warns_random_weights(trained, recwarn):
    _, _, _, img = trained
    text = gen_cli.main(["--model", "moe_llava_tiny_dense", "--image", str(img), "--prompt", "hi",
                         "--max-new-tokens", "2"], out=io.StringIO())
    assert isinstance(text, str)
    assert any("RANDOM weights" in str(w.message) for w in recwarn.list)


def test_clear_errors(trained, tmp_path):
    _, _, ckpt, img = trained
    with pytest.raises(FileNotFoundError, match="no such file"):
        gen_cli.main(["--checkpoint", str(ckpt), "--image", str(tmp_path / "none.png"), "--prompt", "x"])
    with pytest.raises(TypeError, match="image\\+text model"):
        gen_cli.main(["--model", "vit_tiny_patch16_224" if _has("vit_tiny_patch16_224") else _first_non_llava(),
                      "--image", str(img), "--prompt", "x"])


def _has(name):
    import zoo

    return name in zoo.list_models()


def _first_non_llava():
    import zoo

    return next(n for n in zoo.list_models() if "llava" not in n and "uni_moe" not in n and "decoder" not in n)
