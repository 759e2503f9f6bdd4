"""Tests of the image-classification datamodules (zoo.data).

MNIST / CIFAR tests read the real data in ../shared/data (or $ZOO_DATA) and skip with the reason when it is absent;
everything else uses scikit-learn's digits or small files written to tmp_path.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.data import (
    CIFAR10SpriteDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    resolve_data_root,
)
from zoo.data.base import random_crop_flip
from zoo.data.readers import read_cifar_sprite, read_idx

DIGITS_CLASS_COUNTS = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # sklearn load_digits
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # from mnist/SOURCE.txt


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def all_batches(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every batch of a loader -> (images [N, C, H, W], labels [N])."""
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write a uint8 array as an IDX file (magic = 0x08 << 8 | ndim), gzipped when ``compress``."""
    header = struct.pack(">I", (0x08 << 8) | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def write_fake_mnist(folder: Path, n_train: int = 40, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Write four small IDX files (labels cycle 0..9, image i is filled with value i) and return the labels."""
    folder.mkdir(parents=True, exist_ok=True)
    train_y = np.arange(n_train) % 10
    test_y = (np.arange(n_test) + 3) % 10
    write_idx(folder / "train-images-idx3-ubyte.gz", np.broadcast_to(np.arange(n_train)[:, None, None], (n_train, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", train_y)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((n_test, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", test_y)
    return train_y, test_y


# ---------------------------------------------------------------------------------------------------------------
# digits (always available)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=100, seed=0)
    dm.setup("fit")
    return dm


def test_digits_attributes_shapes_and_sizes(digits: DigitsDataModule) -> None:
    assert digits.split_sizes == {"train": 1257, "val": 180, "test": 360}
    assert (digits.num_classes, digits.image_size, digits.in_chans) == (10, 8, 1)
    assert digits.class_names == [str(i) for i in range(10)]
    assert len(digits.mean) == len(digits.std) == 1
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (100, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (100,) and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) <= 9
    # Last test batch is partial (360 = 3 * 100 + 60): no samples are dropped.
    sizes = [len(b[1]) for b in digits.test_dataloader()]
    assert sizes == [100, 100, 100, 60]
    assert digits.hparams["batch_size"] == 100 and digits.hparams["image_size"] == 8


def test_digits_splits_disjoint_and_cover_everything(digits: DigitsDataModule) -> None:
    parts = [set(ds.source_indices.tolist()) for ds in (digits.train_set, digits.val_set, digits.test_set)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert set().union(*parts) == set(range(1797))


def test_digits_splits_are_stratified(digits: DigitsDataModule) -> None:
    for ds, n in ((digits.test_set, 360), (digits.val_set, 180), (digits.train_set, 1257)):
        counts = np.bincount(ds.targets.numpy(), minlength=10)
        expected = DIGITS_CLASS_COUNTS * n / DIGITS_CLASS_COUNTS.sum()
        assert np.all(np.abs(counts - expected) <= 1.0), (n, counts, expected)


def test_digits_split_determinism(digits: DigitsDataModule) -> None:
    same = DigitsDataModule(batch_size=100, seed=0)
    same.setup()
    other = DigitsDataModule(batch_size=100, seed=1)
    other.setup()
    assert torch.equal(same.val_set.source_indices, digits.val_set.source_indices)
    assert torch.equal(same.train_set.source_indices, digits.train_set.source_indices)
    # The test split is seed-independent; the val hold-out follows the seed.
    assert torch.equal(other.test_set.source_indices, digits.test_set.source_indices)
    assert not torch.equal(other.val_set.source_indices, digits.val_set.source_indices)
    # Shuffled train order is reproducible from the seed too, and differs between epochs.
    fresh_a, fresh_b = DigitsDataModule(batch_size=100, seed=3), DigitsDataModule(batch_size=100, seed=3)
    fresh_a.setup()
    fresh_b.setup()
    epoch1_a, epoch1_b = all_batches(fresh_a.train_dataloader())[1], all_batches(fresh_b.train_dataloader())[1]
    assert torch.equal(epoch1_a, epoch1_b)
    assert not torch.equal(all_batches(fresh_a.train_dataloader())[1], epoch1_a)


def test_digits_normalised_value_range(digits: DigitsDataModule) -> None:
    x, _ = all_batches(digits.train_dataloader())
    mean, std = digits.mean[0], digits.std[0]
    lo, hi = (0.0 - mean) / std, (1.0 - mean) / std
    # Raw pixels span 0..16 -> exactly [lo, hi] after /16 and normalisation; both ends occur in digits.
    assert float(x.min()) == pytest.approx(lo, abs=1e-5)
    assert float(x.max()) == pytest.approx(hi, abs=1e-5)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05


def test_digits_upsampling_keeps_content(digits: DigitsDataModule) -> None:
    big = DigitsDataModule(batch_size=100, image_size=16)
    big.setup()
    x16, y16 = big.test_set[0]
    x8, y8 = digits.test_set[0]
    assert x16.shape == (1, 16, 16) and y16 == y8
    back = torch.nn.functional.avg_pool2d(x16[None], 2)[0]
    corr = np.corrcoef(back.flatten().numpy(), x8.flatten().numpy())[0, 1]
    assert corr > 0.95


def test_dataloader_before_setup_raises() -> None:
    with pytest.raises(RuntimeError, match=r"setup\(\) must be called"):
        DigitsDataModule().train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"batch_size": 2.5}, "batch_size must be an integer >= 1"),
        ({"batch_size": True}, "batch_size must be an integer >= 1"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0"),
        ({"seed": -3}, "seed must be an integer >= 0"),
        ({"image_size": 4}, "image_size must be an integer >= 8"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_size": 0}, r"val_size=0 gives 0 samples out of 1437"),
        ({"val_size": 1.0}, r"val_size as a fraction must be in \(0, 1\)"),
        ({"test_size": 1797}, r"test_size=1797 gives 1797 samples out of 1797"),
        ({"val_size": "10"}, r"val_size must be an int \(count\) or a float"),
    ],
)
def test_bad_split_sizes(kwargs: dict, message: str) -> None:
    dm = DigitsDataModule(**kwargs)
    with pytest.raises(ValueError, match=message):
        dm.setup()


def test_fractional_split_sizes() -> None:
    dm = DigitsDataModule(val_size=0.25, test_size=0.5)
    dm.setup()
    # test = round(0.5 * 1797) = 898 (banker's rounding of 898.5), val = round(0.25 * 899) = 225.
    assert dm.split_sizes == {"train": 1797 - 898 - 225, "val": 225, "test": 898}


# ---------------------------------------------------------------------------------------------------------------
# data-dir resolution and MNIST errors (tmp_path, no shared data needed)
# ---------------------------------------------------------------------------------------------------------------
def test_data_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOO_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg").path == tmp_path / "arg"
    root = resolve_data_root()
    assert root.path == tmp_path / "env" and "ZOO_DATA" in root.source
    monkeypatch.delenv("ZOO_DATA")
    root = resolve_data_root()
    assert root.source == "default" and root.searched[0].parts[-2:] == ("shared", "data")


def test_mnist_missing_folder_message(tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "mnist") in msg
    assert "--data.data_dir" in msg and "ZOO_DATA" in msg and "data_dir argument" in msg


def test_mnist_missing_folder_via_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ZOO_DATA environment variable") as info:
        MNISTDataModule().setup()
    assert str(tmp_path / "mnist") in str(info.value)


def test_mnist_empty_and_incomplete_folder(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    with pytest.raises(FileNotFoundError, match=r"mnist is empty; it needs the 4 original IDX files"):
        MNISTDataModule(data_dir=tmp_path).setup()
    write_fake_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-labels-idx1-ubyte.gz"):
        MNISTDataModule(data_dir=tmp_path).setup()


def test_mnist_from_small_idx_files(tmp_path: Path) -> None:
    train_y, test_y = write_fake_mnist(tmp_path / "mnist")
    dm = MNISTDataModule(data_dir=tmp_path, val_size=10, batch_size=8)
    dm.setup()
    assert dm.split_sizes == {"train": 30, "val": 10, "test": 10}
    assert np.bincount(dm.val_set.targets.numpy(), minlength=10).tolist() == [1] * 10  # stratified
    x, y = dm.train_set[5]
    src = int(dm.train_set.source_indices[5])
    assert y == train_y[src]
    # Image src is filled with the value src: check the decode and the normalisation.
    assert torch.allclose(x, torch.full((1, 28, 28), (src / 255 - 0.1307) / 0.3081))
    assert dm.test_set.targets.tolist() == test_y.tolist()
    # data_dir may also point at the mnist folder itself.
    direct = MNISTDataModule(data_dir=tmp_path / "mnist", val_size=10)
    direct.setup()
    assert direct.split_sizes == dm.split_sizes


def test_corrupt_idx_truncated_gzip(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"Corrupt data file .*train-images-idx3-ubyte.gz: cannot decompress"):
        MNISTDataModule(data_dir=tmp_path, val_size=10).setup()


def test_corrupt_idx_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    write_idx(path, np.zeros((5, 28, 28)))  # an image file where a label file is expected
    with pytest.raises(ValueError, match=r"magic number 2051, expected 2049"):
        read_idx(path, expected_magic=2049)
    path.write_bytes(gzip.compress(b"GIF89a not idx"))
    with pytest.raises(ValueError, match=r"not an unsigned-byte IDX magic"):
        read_idx(path)
    raw = struct.pack(">IIII", 2051, 5, 28, 28) + bytes(28 * 28 * 4)  # one image short
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError, match=r"header says shape \(5, 28, 28\) .* file has 3152 bytes"):
        read_idx(path)


def test_mnist_image_label_count_mismatch(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.zeros(9))
    with pytest.raises(ValueError, match=r"holds 10 images but .*t10k-labels-idx1-ubyte.gz 9 labels"):
        MNISTDataModule(data_dir=tmp_path, val_size=10).setup()


# ---------------------------------------------------------------------------------------------------------------
# real MNIST
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist(shared_dataset) -> MNISTDataModule:  # noqa: ANN001 (fixture from tests/conftest.py)
    folder = shared_dataset("mnist", "t10k-images-idx3-ubyte.gz")
    dm = MNISTDataModule(data_dir=folder.parent, batch_size=256)
    dm.setup()
    return dm


def test_mnist_sizes_shapes_labels(mnist: MNISTDataModule) -> None:
    assert mnist.split_sizes == {"train": 55000, "val": 5000, "test": 10000}
    x, y = next(iter(mnist.test_dataloader()))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    lo, hi = -mnist.mean[0] / mnist.std[0], (1 - mnist.mean[0]) / mnist.std[0]
    assert float(x.min()) == pytest.approx(lo, abs=1e-5) and float(x.max()) == pytest.approx(hi, abs=1e-5)
    assert np.bincount(mnist.test_set.targets.numpy(), minlength=10).tolist() == MNIST_TEST_COUNTS
    train, val = set(mnist.train_set.source_indices.tolist()), set(mnist.val_set.source_indices.tolist())
    assert not train & val and len(train | val) == 60000


def test_mnist_known_labels(mnist: MNISTDataModule) -> None:
    assert int(mnist.test_set[0][1]) == 7  # first t10k digit is a 7
    assert int(mnist.test_set.labels[1]) == 2 and int(mnist.test_set.labels[2]) == 1
    assert int(mnist.train_set.labels[0]) == 5  # first training digit is a 5 (row 0 of the shared train tensor)


def test_mnist_idx_decode_is_byte_exact(mnist: MNISTDataModule, shared_dataset) -> None:  # noqa: ANN001
    folder = shared_dataset("mnist", "t10k-images-idx3-ubyte.gz")
    images = read_idx(folder / "t10k-images-idx3-ubyte.gz", expected_magic=2051)
    # Rebuild the uncompressed file and compare with the published md5 of t10k-images-idx3-ubyte.
    raw = struct.pack(">IIII", 2051, *images.shape) + images.tobytes()
    assert hashlib.md5(raw).hexdigest() == "2646ac647ad5339dbf082846283269ea"
    # The datamodule's test tensor is the same pixels.
    assert torch.equal(mnist.test_set.images[:, 0], torch.from_numpy(images.copy()))


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 sprites
# ---------------------------------------------------------------------------------------------------------------
def write_sprite(path: Path, width: int = 1024, height: int = 1000) -> None:
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(path)


def test_cifar_missing_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar10_convnetjs_subset.*--data.data_dir.*ZOO_DATA"):
        CIFAR10SpriteDataModule(data_dir=tmp_path).setup()
    (tmp_path / "cifar10_convnetjs_subset").mkdir()
    with pytest.raises(FileNotFoundError, match=r"cifar10_convnetjs_subset is empty; it needs cifar10_labels.js"):
        CIFAR10SpriteDataModule(data_dir=tmp_path).setup()


def test_cifar_corrupt_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar10_convnetjs_subset"
    folder.mkdir()
    (folder / "cifar10_labels.js").write_text("var labels=[" + ", ".join(["1"] * 51000) + "];")
    write_sprite(folder / "cifar10_batch_0.png")
    write_sprite(folder / "cifar10_batch_50.png", width=1000)
    dm = CIFAR10SpriteDataModule(data_dir=tmp_path, train_batches=[0])
    with pytest.raises(ValueError, match=r"cifar10_batch_50.png: size 1000x1000, expected 1024x1000"):
        dm.setup()
    (folder / "cifar10_batch_50.png").write_bytes((folder / "cifar10_batch_0.png").read_bytes()[:500])
    with pytest.raises(ValueError, match=r"cifar10_batch_50.png: cannot decode PNG"):
        CIFAR10SpriteDataModule(data_dir=tmp_path, train_batches=[0]).setup()
    (folder / "cifar10_labels.js").write_text("var labels=[1, 2, 12];")
    with pytest.raises(ValueError, match=r"labels span \[1, 12\], expected \[0, 9\]"):
        CIFAR10SpriteDataModule(data_dir=tmp_path, train_batches=[0]).setup()


def test_cifar_bad_train_batches() -> None:
    with pytest.raises(ValueError, match="train_batches must be distinct sprite numbers in 0..49"):
        CIFAR10SpriteDataModule(train_batches=[0, 50])
    with pytest.raises(ValueError, match="train_batches must be distinct"):
        CIFAR10SpriteDataModule(train_batches=[1, 1])


def test_random_crop_flip_is_a_shifted_window() -> None:
    torch.manual_seed(0)
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    windows = [padded[:, t : t + 8, l : l + 8] for t in range(5) for l in range(5)]
    candidates = windows + [w.flip(-1) for w in windows]
    augment = random_crop_flip(padding=2)
    outputs = [augment(image) for _ in range(40)]
    for out in outputs:
        assert out.shape == image.shape and any(torch.equal(out, c) for c in candidates)
    assert len({o.numpy().tobytes() for o in outputs}) > 5  # it is actually random


@pytest.fixture(scope="module")
def cifar_dir(shared_dataset) -> Path:  # noqa: ANN001 (fixture from tests/conftest.py)
    return shared_dataset("cifar10_convnetjs_subset", "cifar10_batch_50.png")


@pytest.fixture(scope="module")
def cifar_labels(cifar_dir: Path) -> list[int]:
    # Independent parse of the labels file (not the library's reader).
    text = (cifar_dir / "cifar10_labels.js").read_text()
    return [int(v) for v in re.findall(r"-?\d+", text[text.index("[") :])]


def test_cifar_test_split(cifar_dir: Path, cifar_labels: list[int]) -> None:
    dm = CIFAR10SpriteDataModule(data_dir=cifar_dir.parent, train_batches=[0], val_size=100, batch_size=50)
    dm.setup()
    assert dm.split_sizes == {"train": 900, "val": 100, "test": 1000}
    assert dm.class_names[3] == "cat" and dm.class_names[8] == "ship" and dm.num_classes == 10
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # cat ship ship airplane frog ... (SOURCE.txt)
    assert dm.test_set.targets.tolist() == cifar_labels[50000:51000]
    assert dm.train_set.labels.tolist() == cifar_labels[:1000]
    assert np.bincount(dm.val_set.targets.numpy(), minlength=10).min() >= 7  # stratified 100 of ~100 per class
    # Channel order: the mean RGB of the test sprite is documented in SOURCE.txt (R > G > B for CIFAR).
    mean_rgb = dm.test_set.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean_rgb, torch.tensor([0.4967, 0.4867, 0.451]), atol=6e-4)


def test_cifar_sprite_pixel_layout(cifar_dir: Path) -> None:
    path = cifar_dir / "cifar10_batch_50.png"
    images = read_cifar_sprite(path)
    assert images.shape == (1000, 3, 32, 32) and images.dtype == np.uint8
    with Image.open(path) as sprite:
        rng = np.random.default_rng(0)
        for i, y, x in zip(rng.integers(0, 1000, 30), rng.integers(0, 32, 30), rng.integers(0, 32, 30)):
            assert tuple(images[i, :, y, x]) == sprite.getpixel((32 * int(y) + int(x), int(i)))
        # Whole-row check for one image: row 3 of the sprite is test image 3.
        row = np.asarray(sprite.crop((0, 3, 1024, 4)))[0]  # [1024, 3]
    assert np.array_equal(images[3].transpose(1, 2, 0).reshape(1024, 3), row)
    assert not np.array_equal(images[3], images[3].transpose(0, 2, 1))  # decoding is not symmetric in y, x


def test_cifar_full_train_and_augmentation(cifar_dir: Path) -> None:
    dm = CIFAR10SpriteDataModule(data_dir=cifar_dir.parent, augment=True)
    dm.setup()
    assert dm.split_sizes == {"train": 3500, "val": 500, "test": 1000}
    raw = dm.train_set.images[dm.train_set.source_indices[0]]
    plain = ((raw.float() / 255 - torch.tensor(dm.mean).view(3, 1, 1)) / torch.tensor(dm.std).view(3, 1, 1))
    torch.manual_seed(1)
    outs = [dm.train_set[0][0] for _ in range(8)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.allclose(o, plain) for o in outs)  # augmentation changes the train image
    val_raw = dm.val_set.images[dm.val_set.source_indices[0]]
    val_plain = (val_raw.float() / 255 - torch.tensor(dm.mean).view(3, 1, 1)) / torch.tensor(dm.std).view(3, 1, 1)
    assert torch.allclose(dm.val_set[0][0], val_plain, atol=1e-5)  # val is never augmented


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------------------------
COLOURS = {"blue": (0, 0, 255), "green": (0, 200, 0), "red": (220, 0, 0)}


def make_tree(root: Path, per_class: int, classes: dict[str, tuple[int, int, int]] = COLOURS) -> None:
    """One PNG per sample, 12 wide x 10 high, filled with the class colour."""
    for name, rgb in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (12, 10), rgb).save(root / name / f"{i:03d}.png")


def test_image_folder_single_tree(tmp_path: Path) -> None:
    make_tree(tmp_path, per_class=10)
    dm = ImageFolderDataModule(tmp_path, image_size=8, val_size=0.2, test_size=0.2, batch_size=64)
    assert dm.class_names == ["blue", "green", "red"] and dm.num_classes == 3 and dm.in_chans == 3
    dm.setup()
    # test = 0.2 * 30 = 6, val = round(0.2 * 24) = 5, train = 19; each class kept in every split.
    assert dm.split_sizes == {"train": 19, "val": 5, "test": 6}
    assert np.bincount(dm.test_set.targets.numpy(), minlength=3).tolist() == [2, 2, 2]
    x, y = all_batches(dm.train_dataloader())
    assert x.shape == (19, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    # The class colour dominates the channel named by the label (blue=2, green=1, red=0 in RGB order).
    channel_of_label = torch.tensor([2, 1, 0])
    assert torch.equal(x.mean(dim=(2, 3)).argmax(dim=1), channel_of_label[y])
    splits = [set(ds.indices) for ds in (dm.train_set, dm.val_set, dm.test_set)]
    assert sum(len(s) for s in splits) == len(set().union(*splits)) == 30


def test_image_folder_grayscale(tmp_path: Path) -> None:
    make_tree(tmp_path, per_class=4)
    dm = ImageFolderDataModule(tmp_path, image_size=6, in_chans=1, val_size=3, test_size=3)
    dm.setup()
    x, _ = dm.val_set[0]
    assert x.shape == (1, 6, 6) and dm.mean == (0.449,)


def test_image_folder_train_val_test_layouts(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", per_class=5)
    make_tree(tmp_path / "val", per_class=2)
    dm = ImageFolderDataModule(tmp_path, image_size=8)
    dm.setup()
    assert dm.split_sizes == {"train": 15, "val": 6, "test": 6}  # no test/: val doubles as test
    make_tree(tmp_path / "test", per_class=3)
    dm = ImageFolderDataModule(tmp_path, image_size=8)
    dm.setup()
    assert dm.split_sizes == {"train": 15, "val": 6, "test": 9}
    assert dm.test_set.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_image_folder_train_test_holds_out_val(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", per_class=6)
    make_tree(tmp_path / "test", per_class=2)
    dm = ImageFolderDataModule(tmp_path, image_size=8, val_size=3, seed=4)
    dm.setup()
    assert dm.split_sizes == {"train": 15, "val": 3, "test": 6}
    assert sorted(dm.val_set.targets.tolist()) == [0, 1, 2]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ImageFolder root not found: .*nope.*--data.root"):
        ImageFolderDataModule(tmp_path / "nope", image_size=8).setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"No images found under ImageFolder tree .*empty"):
        ImageFolderDataModule(empty, image_size=8).setup()
    (empty / "cat").mkdir()
    (empty / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"No images found under ImageFolder tree .*<class>/0001.png"):
        ImageFolderDataModule(empty, image_size=8).setup()
    make_tree(tmp_path / "mixed" / "train", per_class=2)
    make_tree(tmp_path / "mixed" / "val", per_class=2, classes={"red": (255, 0, 0), "cyan": (0, 255, 255)})
    with pytest.raises(ValueError, match=r"differ from those of the training split"):
        ImageFolderDataModule(tmp_path / "mixed", image_size=8).setup()
    with pytest.raises(ValueError, match=r"in_chans must be 1 \(grayscale\) or 3 \(RGB\)"):
        ImageFolderDataModule(tmp_path, image_size=8, in_chans=2)
    with pytest.raises(ValueError, match=r"mean and std need 3 values"):
        ImageFolderDataModule(tmp_path, image_size=8, mean=[0.5])
