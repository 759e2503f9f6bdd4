"""MNIST / CIFAR-10 through torchvision's layouts and downloads (zoo/data/download.py), never from the internet:
torchvision's download URLs are pointed at a loopback HTTP server (127.0.0.1, a thread of this test) serving files
built from ../shared/data in the format torchvision expects."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pickle
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.data import CIFAR10SpriteDataModule, MNISTDataModule
from zoo.data.image_classification import CIFAR10_CLASS_NAMES

MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz"]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def loopback(tmp_path):
    """``(folder, base_url)``: an HTTP server on 127.0.0.1 serving ``folder``; every request is recorded."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # noqa: ANN002 (quiet)
            requests.append(self.path)

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address) -> None:  # noqa: ANN001
            # torchvision first opens each URL only to follow redirects and closes it unread: not an error
            import sys

            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()


def test_mnist_downloads_through_torchvision_and_reads_its_layout(shared_dataset, loopback, tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    mnist = shared_dataset("mnist", "t10k-images-idx3-ubyte.gz")
    served, url, requests = loopback
    for name in MNIST_FILES:
        shutil.copy(mnist / name, served / name)
    monkeypatch.setattr(MNIST, "mirrors", [url])
    # the shared train-images .gz is a byte-exact rebuild with another gzip header (mnist/SOURCE.txt): its md5
    # differs from torchvision's, so the served files' own md5s are the expected ones
    monkeypatch.setattr(MNIST, "resources", [(name, md5(served / name)) for name in MNIST_FILES])
    monkeypatch.delenv("ZOO_DATA", raising=False)

    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError, match=r"--data\.download=true") as err:
        MNISTDataModule(data_dir=root).setup()
    assert "yann.lecun.com" in str(err.value) and not requests

    downloaded = MNISTDataModule(data_dir=root, download=True)
    downloaded.setup()
    assert set(requests) == {f"/{n}" for n in MNIST_FILES}
    assert (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    reference = MNISTDataModule(data_dir=mnist.parent)
    reference.setup()
    assert downloaded.split_sizes == reference.split_sizes == {"train": 55000, "val": 5000, "test": 10000}
    for split in ("train_set", "val_set", "test_set"):
        got, want = getattr(downloaded, split), getattr(reference, split)
        assert torch.equal(got.images, want.images) and torch.equal(got.targets, want.targets)
        assert torch.equal(got.source_indices, want.source_indices)

    requests.clear()  # torchvision's layout is now there: read without downloading, also via ZOO_DATA
    monkeypatch.setenv("ZOO_DATA", str(root))
    again = MNISTDataModule()
    again.setup()
    assert torch.equal(again.test_set.images, reference.test_set.images) and not requests


def _cifar_tarball(folder: Path, sprites: Path) -> tuple[Path, dict[str, str]]:
    """``cifar-10-python.tar.gz`` as the official release lays it out (``cifar-10-batches-py/`` with pickled
    ``data_batch_1..5``, ``test_batch``, ``batches.meta``), holding the shared subset: train images 0..3999 in
    data_batch_1 (the other train batches empty) and test images 0..999. Returns its path and each member's md5."""
    from zoo.data.readers import read_cifar_sprite, read_convnetjs_labels

    labels = read_convnetjs_labels(sprites / "cifar10_labels.js", num_classes=10)
    train = np.concatenate([read_cifar_sprite(sprites / f"cifar10_batch_{k}.png") for k in range(4)])
    test = read_cifar_sprite(sprites / "cifar10_batch_50.png")

    def batch(images: np.ndarray, batch_labels: np.ndarray) -> bytes:  # rows: R plane, G plane, B plane
        return pickle.dumps({"data": images.reshape(len(images), 3 * 32 * 32),
                             "labels": [int(v) for v in batch_labels]})

    members = {"data_batch_1": batch(train, labels[:4000])}
    for k in range(2, 6):
        members[f"data_batch_{k}"] = batch(np.zeros((0, 3, 32, 32), np.uint8), np.zeros(0))
    members["test_batch"] = batch(test, labels[50000:51000])
    members["batches.meta"] = pickle.dumps({"label_names": CIFAR10_CLASS_NAMES})
    path = folder / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, {name: hashlib.md5(data).hexdigest() for name, data in members.items()}


def test_cifar10_downloads_through_torchvision_and_matches_the_sprites(shared_dataset, loopback, tmp_path,
                                                                       monkeypatch):
    from torchvision.datasets import CIFAR10

    sprites = shared_dataset("cifar10_convnetjs_subset", "cifar10_labels.js")
    served, url, requests = loopback
    tarball, md5s = _cifar_tarball(served, sprites)
    monkeypatch.setattr(CIFAR10, "url", url + tarball.name)
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5(tarball))
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{k}", md5s[f"data_batch_{k}"]] for k in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5s["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5s["batches.meta"]})
    monkeypatch.delenv("ZOO_DATA", raising=False)

    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError, match=r"--data\.download=true") as err:
        CIFAR10SpriteDataModule(data_dir=root).setup()
    assert "cs.toronto.edu" in str(err.value) and not requests

    downloaded = CIFAR10SpriteDataModule(data_dir=root, download=True)
    downloaded.setup()
    assert set(requests) == {"/cifar-10-python.tar.gz"}
    reference = CIFAR10SpriteDataModule(data_dir=sprites.parent)
    reference.setup()
    assert downloaded.split_sizes == reference.split_sizes == {"train": 3500, "val": 500, "test": 1000}
    for split in ("train_set", "val_set", "test_set"):
        got, want = getattr(downloaded, split), getattr(reference, split)
        assert torch.equal(got.images, want.images) and torch.equal(got.targets, want.targets)
        assert torch.equal(got.source_indices, want.source_indices)

    with pytest.raises(ValueError, match="holds 4000 train images"):  # this release holds only train 0..3999
        CIFAR10SpriteDataModule(data_dir=root, train_batches=[4]).setup()
