"""The loader arguments every datamodule takes are one typed group (:class:`zoo.data.LoaderArgs`), declared once
in :class:`~zoo.data.base.SplitDataModule`: the datamodules pass ``**loader`` on, and the CLI, the recipes, the
checkpoints' recorded init args and Python callers keep the flat keys (``batch_size``, ``num_workers`` ...)."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
from jsonargparse import ArgumentParser

from zoo.data import CIFAR10SpriteDataModule, DigitsDataModule, ImageFolderDataModule, LoaderArgs, MNISTDataModule
from zoo.data.base import SplitDataModule, init_parameters
from zoo.data.image_text import ClassCaptionDataModule, Flickr8kDataModule, ImageTextCSVDataModule
from zoo.data.image_text import MixedImageTextDataModule
from zoo.data.instruct import InstructDataModule
from zoo.data.instruct_sets import InstructSetsDataModule
from zoo.data.text import Flickr8kCaptionsLMDataModule
from zoo.tasks.datamodule_factory import build_datamodule

LOADER_KEYS = set(LoaderArgs.names())
# every concrete datamodule and the batch size it defaults to (the others' defaults are the group's)
DEFAULT_BATCH = {DigitsDataModule: 64, MNISTDataModule: 128, CIFAR10SpriteDataModule: 128,
                 ClassCaptionDataModule: 128, ImageTextCSVDataModule: 64, Flickr8kDataModule: 64,
                 MixedImageTextDataModule: 64, Flickr8kCaptionsLMDataModule: 64, InstructDataModule: 16,
                 InstructSetsDataModule: 16}


def test_the_group_is_declared_once():
    """No datamodule repeats a loader argument in its own signature: each takes ``**loader``."""
    for cls in [*DEFAULT_BATCH, ImageFolderDataModule]:
        own = inspect.signature(cls.__init__).parameters
        assert not LOADER_KEYS & set(own), cls.__name__
        assert any(p.kind is p.VAR_KEYWORD for p in own.values()), cls.__name__
        assert LOADER_KEYS <= set(init_parameters(cls)), cls.__name__
    assert set(inspect.signature(SplitDataModule.__init__).parameters) - {"self"} == LOADER_KEYS


@pytest.mark.parametrize("cls", list(DEFAULT_BATCH), ids=lambda c: c.__name__)
def test_cli_takes_the_flat_keys_with_the_class_default(cls):
    """jsonargparse follows ``**loader`` into the base signature: ``--data.batch_size`` etc. as before."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=L.LightningDataModule)
    path = f"{cls.__module__}.{cls.__qualname__}"
    extra = (["--data.main=zoo.data.image_text.ClassCaptionDataModule", "--data.main.dataset=digits"]
             if cls is MixedImageTextDataModule else [])
    cfg = parser.parse_args([f"--data={path}", *extra, "--data.init_args.num_workers=1", "--data.seed=3",
                             "--data.pin_memory=true"])
    args = cfg.data.init_args
    assert (args.num_workers, args.seed, args.pin_memory, args.persistent_workers) == (1, 3, True, None)
    dm = parser.instantiate(cfg).data
    assert isinstance(dm.loader, LoaderArgs)
    assert (dm.batch_size, dm.num_workers, dm.seed, dm.pin_memory) == (DEFAULT_BATCH[cls], 1, 3, True)
    assert dm.hparams["batch_size"] == DEFAULT_BATCH[cls]  # the resolved value is recorded, not None
    with pytest.raises(Exception, match="batch_size"):
        parser.parse_args([f"--data={path}", *extra, "--data.batch_size=many"])


def test_group_values_validation_and_loaders():
    dm = DigitsDataModule(batch_size=50, seed=2, pin_memory=False)
    assert dm.loader == LoaderArgs(batch_size=50, num_workers=0, seed=2, pin_memory=False)
    assert {k: dm.hparams[k] for k in LOADER_KEYS} == dm.loader.as_dict()
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.batch_size == 50 and loader.num_workers == 0 and not loader.persistent_workers
    dm.batch_size = 40  # settable (Lightning's batch-size finder does this), through the group
    assert dm.loader.batch_size == 40 and dm.val_dataloader().batch_size == 40
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        dm.batch_size = 0
    for bad, match in (({"batch_size": 0}, "batch_size must be"), ({"seed": -1}, "seed must be"),
                       ({"num_workers": 1.5}, "num_workers must be"), ({"pin_memory": "yes"}, "pin_memory must be"),
                       ({"persistent_workers": True}, "needs num_workers > 0")):
        with pytest.raises(ValueError, match=match):
            LoaderArgs(**bad)
        with pytest.raises(ValueError, match=match):
            DigitsDataModule(**bad)
    assert LoaderArgs(num_workers=1).dataloader(range(5)).persistent_workers
    assert not LoaderArgs(num_workers=1, persistent_workers=False).dataloader(range(5)).persistent_workers
    with pytest.raises(TypeError, match="batchsize"):
        DigitsDataModule(batchsize=8)


def test_nested_source_and_recorded_args_keep_the_flat_keys():
    cc = ClassCaptionDataModule("digits", batch_size=9, seed=4)
    assert (cc.source.batch_size, cc.source.seed) == (9, 4)
    # a checkpoint records flat init args; eval rebuilds from them, overrides apply to the group's fields
    recorded = dict(DigitsDataModule(batch_size=32, seed=5).hparams)
    dm = build_datamodule("zoo.data.DigitsDataModule", recorded, overrides={"batch_size": 8})
    assert (dm.batch_size, dm.seed) == (8, 5)
    with pytest.raises(ValueError, match="has no argument"):
        build_datamodule("zoo.data.DigitsDataModule", recorded, overrides={"batchsize": 8})
