"""Tests for models.datasets: splits, the .amat reader, errors, and no network unless asked."""

from __future__ import annotations

import gzip
import io
import re
import sys
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from models.datasets import (
    DATASET_NAMES,
    Dataset,
    DatasetNotFoundError,
    _digits_split_indices,
    load_dataset,
    read_amat,
)

SHARED_BINARIZED_MNIST = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "binarized_mnist"
)
PIXELS = 784


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to open a URL."""

    def urlopen(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def random_rows(num_rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=(num_rows, PIXELS)).astype(np.float32)


def amat_text(rows: np.ndarray, *, sep: str = " ", newline: str = "\n") -> bytes:
    lines = (sep.join(str(int(value)) for value in row) for row in rows)
    return "".join(line + newline for line in lines).encode()


def write_amat(directory: Path, split: str, rows: np.ndarray, *, gz: bool = False) -> Path:
    path = directory / f"binarized_mnist_{split}.amat{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(amat_text(rows)) if gz else amat_text(rows))
    return path


# ---------------------------------------------------------------------------------------
# digits


def test_digits_shapes_values_and_sizes():
    data = load_dataset("digits")
    assert isinstance(data, Dataset)
    assert data.name == "digits" and data.image_shape == (8, 8)
    assert not data.dynamic_binarization
    for split, size in zip((data.train, data.valid, data.test), (1297, 250, 250), strict=True):
        assert split.shape == (size, 64) and split.dtype == torch.float32
        assert set(split.unique().tolist()) == {0.0, 1.0}
    assert "1297/250/250" in data.description and "> 7 of 16" in data.description


def test_digits_is_deterministic_whatever_the_global_seed():
    first = load_dataset("digits")
    torch.manual_seed(123)
    second = load_dataset("digits")
    for a, b in zip(
        (first.train, first.valid, first.test),
        (second.train, second.valid, second.test),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_digits_splits_are_disjoint_and_binarize_the_source_images():
    indices = _digits_split_indices()
    assert [len(idx) for idx in indices] == [1297, 250, 250]
    flat = torch.cat(indices)
    assert torch.equal(flat.sort().values, torch.arange(1797))  # disjoint and exhaustive
    source = torch.as_tensor(load_digits().data)
    data = load_dataset("digits")
    for split, idx in zip((data.train, data.valid, data.test), indices, strict=True):
        assert torch.equal(split, (source[idx] >= 8).float())


# ---------------------------------------------------------------------------------------
# binarized MNIST: tiny generated files


def test_binarized_mnist_round_trips_plain_and_gz_files(tmp_path, no_network):
    rows = {"train": random_rows(5, 0), "valid": random_rows(3, 1), "test": random_rows(4, 2)}
    write_amat(tmp_path, "train", rows["train"])
    write_amat(tmp_path, "valid", rows["valid"], gz=True)
    write_amat(tmp_path, "test", rows["test"], gz=True)
    data = load_dataset("binarized-mnist", root=tmp_path)
    assert data.name == "binarized-mnist" and data.image_shape == (28, 28)
    assert not data.dynamic_binarization
    for split in ("train", "valid", "test"):
        tensor = getattr(data, split)
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, torch.from_numpy(rows[split]))
    assert "5/3/4" in data.description


def test_binarized_mnist_root_accepts_a_string(tmp_path, no_network):
    for split in ("train", "valid", "test"):
        write_amat(tmp_path, split, random_rows(2, 0))
    assert load_dataset("binarized-mnist", root=str(tmp_path)).train.shape == (2, PIXELS)


def test_read_amat_accepts_crlf_tabs_and_blank_lines(tmp_path):
    rows = random_rows(3, 0)
    text = amat_text(rows, sep=" \t ", newline="\r\n").replace(b"\r\n", b" \r\n\n", 1)
    path = tmp_path / "odd.amat"
    path.write_bytes(text + b"\n")
    assert np.array_equal(read_amat(path), rows)


def test_default_root_comes_from_the_environment(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("PYRO_AMORTIZED_DATA", str(tmp_path))
    (tmp_path / "binarized_mnist").mkdir()
    for split in ("train", "valid", "test"):
        write_amat(tmp_path / "binarized_mnist", split, random_rows(2, 0))
    assert load_dataset("binarized-mnist").valid.shape == (2, PIXELS)


# ---------------------------------------------------------------------------------------
# binarized MNIST: the real files


def test_binarized_mnist_real_files(no_network):
    if not all(
        (SHARED_BINARIZED_MNIST / f"binarized_mnist_{split}.amat.gz").is_file()
        for split in ("train", "valid", "test")
    ):
        pytest.skip(f"no shared copy of binarized MNIST in {SHARED_BINARIZED_MNIST.resolve()}")
    data = load_dataset("binarized-mnist", root=SHARED_BINARIZED_MNIST)
    assert data.train.shape == (50_000, PIXELS)
    assert data.valid.shape == (10_000, PIXELS)
    assert data.test.shape == (10_000, PIXELS)
    # Mean pixel values published with the copy (its README): train 0.1306, valid 0.1311,
    # test 0.1325; the rounding of those figures sets the tolerance.
    for split, mean in (("train", 0.1306), ("valid", 0.1311), ("test", 0.1325)):
        tensor = getattr(data, split)
        assert ((tensor == 0) | (tensor == 1)).all()
        assert abs(tensor.mean().item() - mean) <= 5e-5


# ---------------------------------------------------------------------------------------
# binarized MNIST: errors


@pytest.mark.parametrize("present", [(), ("train",), ("train", "test")])
def test_missing_files_are_named_with_the_directory_and_nothing_is_downloaded(
    tmp_path, present, no_network
):
    directory = tmp_path / "does" / "not" / "exist" if not present else tmp_path
    for split in present:
        write_amat(directory, split, random_rows(1, 0))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("binarized-mnist", root=directory)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(directory) in message and "download=True" in message
    for split in ("train", "valid", "test"):
        needed = f"binarized_mnist_{split}.amat (or .amat.gz)"
        assert (needed in message) == (split not in present)
    assert not (tmp_path / "does").exists()  # looking for files creates no directory


def test_download_fetches_only_the_missing_files_when_asked(tmp_path, monkeypatch):
    rows = {"valid": random_rows(2, 1), "test": random_rows(3, 2)}
    write_amat(tmp_path, "train", random_rows(4, 0), gz=True)
    requested = []

    def urlopen(url, timeout=None):
        requested.append(url)
        split = re.search(r"binarized_mnist_(\w+)\.amat$", url).group(1)
        return io.BytesIO(amat_text(rows[split]))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    data = load_dataset("binarized-mnist", root=tmp_path, download=True)
    base = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
    assert requested == [base + "binarized_mnist_valid.amat", base + "binarized_mnist_test.amat"]
    assert torch.equal(data.valid, torch.from_numpy(rows["valid"]))
    assert torch.equal(data.test, torch.from_numpy(rows["test"]))
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "binarized_mnist_test.amat",
        "binarized_mnist_train.amat.gz",
        "binarized_mnist_valid.amat",
    ]


def test_an_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    class Broken(io.BytesIO):
        def read(self, *args):
            raise ConnectionResetError("connection reset")

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Broken())
    with pytest.raises(ConnectionResetError):
        load_dataset("binarized-mnist", root=tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def _short_row(text: bytes) -> bytes:
    lines = text.splitlines(keepends=True)
    lines[1] = lines[1][2:]  # drop the first value and its separator: 783 values
    return b"".join(lines)


def _value_two(text: bytes) -> bytes:
    lines = text.splitlines(keepends=True)
    lines[1] = lines[1][:20] + b"2" + lines[1][21:]  # the 11th value of the second row
    return b"".join(lines)


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (_short_row, r"line 2 of 3: 783 values, expected 784"),
        (_value_two, r"line 2 of 3, column 11: value '2' is not 0 or 1"),
        (lambda text: text.replace(b"1", b"10", 1), r"line \d of 3: value '10' is not 0 or 1"),
        (lambda text: b"", r"no rows"),
    ],
    ids=["783-values", "value-2", "value-10", "empty"],
)
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_malformed_files_are_reported_with_file_and_line(tmp_path, corrupt, expected, gz):
    for split in ("train", "test"):
        write_amat(tmp_path, split, random_rows(2, 0))
    text = corrupt(amat_text(random_rows(3, 1)))
    path = tmp_path / f"binarized_mnist_valid.amat{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(text) if gz else text)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + expected):
        load_dataset("binarized-mnist", root=tmp_path)


# ---------------------------------------------------------------------------------------
# torchvision MNIST and Fashion-MNIST


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_without_torchvision_says_how_to_install_it(tmp_path, monkeypatch, name, folder):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(ImportError, match="pip install torchvision") as info:
        load_dataset(name, root=tmp_path)
    assert str(tmp_path / folder / "raw") in str(info.value)


def fake_torchvision(monkeypatch, num_train: int, num_test: int, *, missing: bool = False):
    """Install a stand-in torchvision whose MNIST classes hold random grey images."""

    class FakeMNIST:
        def __init__(self, root, train, download):
            if missing:
                raise RuntimeError("Dataset not found. You can use download=True to download it")
            generator = torch.Generator().manual_seed(int(train))
            size = num_train if train else num_test
            self.data = torch.randint(
                0, 256, (size, 28, 28), dtype=torch.uint8, generator=generator
            )

    module = types.ModuleType("torchvision")
    module.datasets = types.SimpleNamespace(MNIST=FakeMNIST, FashionMNIST=FakeMNIST)
    monkeypatch.setitem(sys.modules, "torchvision", module)
    return FakeMNIST


def test_mnist_splits_and_binarization(tmp_path, monkeypatch):
    fake = fake_torchvision(monkeypatch, num_train=10_007, num_test=6)
    data = load_dataset("mnist", root=tmp_path)
    assert data.dynamic_binarization and data.image_shape == (28, 28)
    assert [len(data.train), len(data.valid), len(data.test)] == [7, 10_000, 6]
    grey = fake(tmp_path, True, False).data.reshape(-1, PIXELS).float() / 255
    assert torch.equal(data.train, grey[:7])  # grey levels, to be resampled per batch
    for split in (data.valid, data.test):
        assert split.dtype == torch.float32
        assert set(split.unique().tolist()) <= {0.0, 1.0}
    # A fixed binarization: the same on every call, whatever the global seed.
    torch.manual_seed(99)
    again = load_dataset("mnist", root=tmp_path)
    assert torch.equal(again.valid, data.valid) and torch.equal(again.test, data.test)
    # It is a Bernoulli draw with the grey levels as probabilities: black stays 0, white 1.
    assert torch.equal(data.valid[grey[7:] == 0], torch.zeros_like(data.valid[grey[7:] == 0]))
    assert torch.equal(data.valid[grey[7:] == 1], torch.ones_like(data.valid[grey[7:] == 1]))
    assert "torch.bernoulli" in data.description


def test_mnist_files_missing(tmp_path, monkeypatch):
    fake_torchvision(monkeypatch, num_train=1, num_test=1, missing=True)
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte") as info:
        load_dataset("fashion-mnist", root=tmp_path)
    assert str(tmp_path / "FashionMNIST" / "raw") in str(info.value)
    assert "download=True" in str(info.value)


# ---------------------------------------------------------------------------------------


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown data set 'cifar10'") as info:
        load_dataset("cifar10")
    for name in DATASET_NAMES:
        assert name in str(info.value)
