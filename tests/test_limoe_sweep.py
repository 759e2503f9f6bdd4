"""benchmarks/limoe_sweep.py: the self-supervision round's variants parse through train.py's CLI and reach the
task and the datamodule (nothing is trained)."""

import pytest

from tests.conftest import REPO, load_benchmark
from zoo.tasks.cli import build_cli


def _sweep():
    return load_benchmark("limoe_sweep")


VARIANTS = _sweep().VARIANTS
CASES = [(r, name) for r in ("flickr8k_ssl", "flickr8k_ssl2") for name in sorted(VARIANTS[r])]


@pytest.mark.parametrize("round_name,name", CASES, ids=[f"{r}-{n}" for r, n in CASES])
def test_ssl_round_variants_parse(round_name, name, tmp_path):
    args = ["--config", str(REPO / "configs" / "train" / "limoe_flickr8k.yaml"),
            f"--trainer.default_root_dir={tmp_path}", "--data.init_args.num_val=100", "--test=false",
            *VARIANTS[round_name][name]]
    cli = build_cli(args, runs_root=tmp_path)
    task, dm = cli.model, cli.datamodule
    assert cli.trainer.max_epochs == (240 if name.endswith("e240") else 200) and dm.num_val == 100
    image, text = task.hparams.image_ssl_weight, task.hparams.text_ssl_weight
    assert (dm.image_views == 2) == (image > 0) and (dm.text_views == 2) == (text > 0)
    assert (task.image_ssl_head is not None) == (image > 0)
    expected = {"ctrl": (0.0, 0.0), "img1": (1.0, 0.0), "img0.3": (0.3, 0.0), "txt1": (0.0, 1.0),
                "img1_txt1": (1.0, 1.0), "txt1_img0.3": (0.3, 1.0)}
    key = next(k for k in sorted(expected, key=len, reverse=True) if name.startswith(k))
    assert (image, text) == expected[key]
    assert dm.view_color_jitter == (0.5 if "color" in name else 0.0)
