"""Binary image data sets for the example models, as float32 tensors of shape ``[N, D]``.

One entry point, :func:`load_dataset`, returns a :class:`Dataset` with fixed train, validation
and test splits:

- ``"digits"``: scikit-learn's bundled 8x8 handwritten digits, binarized; always available
  offline, the default of the examples.
- ``"binarized-mnist"``: Larochelle & Murray's statically binarized MNIST, read from a directory
  holding ``binarized_mnist_{train,valid,test}.amat`` (or ``.amat.gz``).
- ``"mnist"`` and ``"fashion-mnist"``: torchvision's copies, dynamically binarized for training;
  they need ``pip install torchvision`` and the files under ``root``.

Nothing is ever downloaded unless ``download=True`` is passed. Files are looked up under
``root`` when given, else under the data root: the environment variable
``PYRO_AMORTIZED_DATA`` when set, else ``~/.cache/pyro_amortized``; binarized MNIST lives in
``<data root>/binarized_mnist/`` and torchvision's sets in ``<data root>/MNIST/raw/`` and
``<data root>/FashionMNIST/raw/``. Run ``python -m models.datasets NAME`` to check a set loads.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "DatasetNotFoundError",
    "binarize",
    "load_dataset",
    "read_amat",
]

DATASET_NAMES = ("digits", "binarized-mnist", "mnist", "fashion-mnist")

_DATA_ENV_VAR = "PYRO_AMORTIZED_DATA"
_SPLITS = ("train", "valid", "test")

_DIGITS_SIZES = (1297, 250, 250)  # of scikit-learn's 1797 images
_DIGITS_SEED = 0

_BINARIZED_MNIST_PIXELS = 784
_BINARIZED_MNIST_URL = (
    "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
    "binarized_mnist_{split}.amat"
)

_MNIST_VALID_SIZE = 10_000  # the last images of torchvision's 60k training set
_MNIST_VALID_SEED = 1
_MNIST_TEST_SEED = 2
_MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are not where :func:`load_dataset` looks for them."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Fixed train/validation/test splits of a data set of flattened images.

    Attributes:
        train: Training images, float32 ``[N_train, D]``; values in {0, 1}, or grey levels in
            [0, 1] when ``dynamic_binarization`` is true.
        valid: Validation images, float32 ``[N_valid, D]``, values in {0, 1}.
        test: Test images, float32 ``[N_test, D]``, values in {0, 1}.
        name: The name given to :func:`load_dataset`.
        description: Source, split sizes and binarization, for logs and reports.
        image_shape: ``(height, width)`` of one image; ``height * width == D``.
        dynamic_binarization: Whether ``train`` holds grey levels that are meant to be
            resampled with ``torch.bernoulli(batch)`` each time a training batch is drawn.
    """

    # The tensors are left out of the repr (it would print pixels) and eq is off because
    # `==` on tensors is elementwise.
    train: Tensor = field(repr=False)
    valid: Tensor = field(repr=False)
    test: Tensor = field(repr=False)
    name: str
    description: str
    image_shape: tuple[int, int]
    dynamic_binarization: bool = False


def binarize(x: Tensor, generator: torch.Generator) -> Tensor:
    """Dynamic binarization: every epoch sees a new Bernoulli draw of the grey levels.

    Arguments:
        x: Grey levels in [0, 1].
        generator: The random generator of the draw.

    Returns:
        A {0, 1} tensor shaped like ``x``.
    """
    return torch.bernoulli(x, generator=generator)


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> Dataset:
    """Load one of :data:`DATASET_NAMES` with its fixed splits.

    Arguments:
        name: ``"digits"``, ``"binarized-mnist"``, ``"mnist"`` or ``"fashion-mnist"``.
        root: For ``"binarized-mnist"`` the directory holding the ``.amat`` files (default
            ``<data root>/binarized_mnist``); for ``"mnist"`` and ``"fashion-mnist"``
            torchvision's root, holding ``MNIST/raw/`` or ``FashionMNIST/raw/`` (default
            ``<data root>``). The data root is ``$PYRO_AMORTIZED_DATA`` when set, else
            ``~/.cache/pyro_amortized``. Ignored for ``"digits"``, which is bundled.
        download: Fetch missing files from their public source into ``root``. Off by
            default: nothing touches the network unless asked.

    Returns:
        The data set; every split a float32 tensor ``[N, D]``.

    Raises:
        ValueError: ``name`` is unknown, or a file is malformed (the message names it).
        DatasetNotFoundError: Files are missing and ``download`` is false; the message says
            which files are needed and where to put them.
        ImportError: ``"mnist"`` or ``"fashion-mnist"`` without torchvision installed.

    Example:
        >>> data = load_dataset("digits")
        >>> data.train.shape, data.valid.shape, data.test.shape
        (torch.Size([1297, 64]), torch.Size([250, 64]), torch.Size([250, 64]))
    """
    if name == "digits":
        return _load_digits()
    if name == "binarized-mnist":
        directory = Path(root) if root is not None else _data_root() / "binarized_mnist"
        return _load_binarized_mnist(directory.expanduser(), download=download)
    if name in ("mnist", "fashion-mnist"):
        directory = Path(root) if root is not None else _data_root()
        return _load_torchvision_mnist(name, directory.expanduser(), download=download)
    raise ValueError(f"unknown data set {name!r}; known names: {', '.join(DATASET_NAMES)}")


def _data_root() -> Path:
    # Read at call time, not import time, so setting the variable later (or in a test) works.
    value = os.environ.get(_DATA_ENV_VAR)
    return Path(value).expanduser() if value else Path("~/.cache/pyro_amortized").expanduser()


# ---------------------------------------------------------------------------------------
# scikit-learn digits


def _digits_split_indices() -> tuple[Tensor, Tensor, Tensor]:
    # A fixed generator makes the split the same on every machine and call, independent
    # of the global seed the caller may have set.
    generator = torch.Generator().manual_seed(_DIGITS_SEED)
    perm = torch.randperm(sum(_DIGITS_SIZES), generator=generator)
    train, valid, test = torch.split(perm, _DIGITS_SIZES)
    return train, valid, test


def _load_digits() -> Dataset:
    # Imported here so that loading the other sets does not pay for importing scikit-learn;
    # the images ship inside the package, so this never downloads.
    from sklearn.datasets import load_digits

    pixels = torch.as_tensor(load_digits().data)  # integer grey levels 0..16
    if len(pixels) != sum(_DIGITS_SIZES):
        raise RuntimeError(f"expected {sum(_DIGITS_SIZES)} digits, scikit-learn has {len(pixels)}")
    images = (pixels > 7).to(torch.float32)  # on at half intensity or more
    train, valid, test = (images[idx] for idx in _digits_split_indices())
    sizes = "/".join(str(size) for size in _DIGITS_SIZES)
    description = (
        f"scikit-learn's bundled 8x8 handwritten digits ({len(images)} images of 64 pixels), "
        f"binarized as pixel > 7 of 16; fixed train/valid/test split {sizes} from a "
        f"permutation drawn with torch generator seed {_DIGITS_SEED}"
    )
    return Dataset(train, valid, test, "digits", description, (8, 8))


# ---------------------------------------------------------------------------------------
# Larochelle & Murray's binarized MNIST


def _amat_name(split: str) -> str:
    return f"binarized_mnist_{split}.amat"


def _find_amat(directory: Path, split: str) -> Path | None:
    # The plain file first: it needs no decompression.
    for candidate in (directory / _amat_name(split), directory / f"{_amat_name(split)}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_binarized_mnist(directory: Path, *, download: bool) -> Dataset:
    missing = [split for split in _SPLITS if _find_amat(directory, split) is None]
    if missing and download:
        _download_binarized_mnist(directory, missing)
    elif missing:
        names = ", ".join(f"{_amat_name(split)} (or .amat.gz)" for split in missing)
        raise DatasetNotFoundError(
            f"binarized MNIST: missing {names} in directory {directory}. Put the files "
            f"binarized_mnist_{{train,valid,test}}.amat (plain or gzipped) there, pass "
            f"root= the directory holding them, set ${_DATA_ENV_VAR} to a data root "
            f"containing binarized_mnist/, or call "
            f"load_dataset('binarized-mnist', root=..., download=True) to fetch them from "
            f"{_BINARIZED_MNIST_URL.format(split='{split}')}"
        )
    paths = {split: _find_amat(directory, split) for split in _SPLITS}
    train, valid, test = (torch.from_numpy(read_amat(paths[split])) for split in _SPLITS)
    description = (
        f"Larochelle & Murray's statically binarized MNIST (28x28) from {directory}: "
        f"train/valid/test {len(train)}/{len(valid)}/{len(test)} images, fixed binarization"
    )
    return Dataset(train, valid, test, "binarized-mnist", description, (28, 28))


def read_amat(
    path: str | os.PathLike[str], num_columns: int = _BINARIZED_MNIST_PIXELS
) -> np.ndarray:
    """Read an ``.amat`` (or ``.amat.gz``) file of space-separated 0/1 values, one row a line.

    The parse works on the file's bytes with vectorized numpy operations (every value is
    one character): binarized MNIST's 10,000-row validation file reads in about 0.05 s,
    where :func:`numpy.loadtxt` takes about 1 s.

    Arguments:
        path: The file; gzip-compressed when its name ends in ``.gz``.
        num_columns: The number of values each non-empty line must hold.

    Returns:
        A float32 array ``[rows, num_columns]``.

    Raises:
        ValueError: A line with another number of values, a value other than 0 or 1, or no
            rows at all; the message names the file and the line.
    """
    path = Path(path)
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    chars = np.frombuffer(data, dtype=np.uint8)
    # The files as published: every line is "v v ... v\n" with one-character values, so the
    # bytes form a [rows, 2 * num_columns] grid whose even columns hold the values.
    width = 2 * num_columns
    if len(chars) and len(chars) % width == 0:
        grid = chars.reshape(-1, width)
        values = grid[:, 0::2] - np.uint8(ord("0"))  # "0" -> 0, "1" -> 1, anything else > 1
        if (
            (grid[:, 1:-1:2] == ord(" ")).all()
            and (grid[:, -1] == ord("\n")).all()
            and not (values > 1).any()
        ):
            return values.astype(np.float32)
    # Any other layout (CRLF line ends, runs of blanks, empty lines) or an error to report.
    return _read_amat_any_layout(chars, path, num_columns)


def _read_amat_any_layout(chars: np.ndarray, path: Path, num_columns: int) -> np.ndarray:
    newline = chars == ord("\n")
    token = chars > ord(" ")  # spaces, tabs and CRs (all ASCII <= 32) separate values
    num_lines = int(np.count_nonzero(newline)) + int(len(chars) > 0 and not newline[-1])

    # Two value characters in a row mean a value longer than one character, e.g. "10" or "1.0".
    long_values = np.flatnonzero(token[1:] & token[:-1])
    if len(long_values):
        start = stop = int(long_values[0])
        while start > 0 and token[start - 1]:
            start -= 1
        while stop < len(chars) and token[stop]:
            stop += 1
        line = int(np.count_nonzero(newline[:start])) + 1
        value = chars[start:stop].tobytes().decode("ascii", errors="replace")
        raise ValueError(f"{path}, line {line} of {num_lines}: value {value!r} is not 0 or 1")

    # Values per line: the number of value characters between consecutive newlines.
    kept = chars[token | newline]
    line_ends = np.flatnonzero(kept == ord("\n"))
    counts = np.diff(np.concatenate(([-1], line_ends, [len(kept)]))) - 1
    counts = counts[:num_lines]  # drops the empty remainder after a final newline
    nonempty = np.flatnonzero(counts > 0)
    bad = np.flatnonzero((counts > 0) & (counts != num_columns))
    if len(bad):
        raise ValueError(
            f"{path}, line {int(bad[0]) + 1} of {num_lines}: {int(counts[bad[0]])} values, "
            f"expected {num_columns} space-separated 0/1 values per line"
        )
    if not len(nonempty):
        raise ValueError(f"{path}: no rows ({num_lines} lines, none with values)")

    values = chars[token]
    wrong = np.flatnonzero((values != ord("0")) & (values != ord("1")))
    if len(wrong):
        row, column = divmod(int(wrong[0]), num_columns)
        raise ValueError(
            f"{path}, line {int(nonempty[row]) + 1} of {num_lines}, column {column + 1}: "
            f"value {chr(values[wrong[0]])!r} is not 0 or 1"
        )
    return (values - np.uint8(ord("0"))).astype(np.float32).reshape(len(nonempty), num_columns)


def _download_binarized_mnist(directory: Path, splits: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split in splits:
        url = _BINARIZED_MNIST_URL.format(split=split)
        target = directory / _amat_name(split)
        # Write under a temporary name first, so an interrupted download is never taken
        # for a complete file on the next call.
        partial = target.with_name(target.name + ".part")
        print(f"downloading {url} to {target}", file=sys.stderr)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# torchvision MNIST and Fashion-MNIST


def _load_torchvision_mnist(name: str, root: Path, *, download: bool) -> Dataset:
    folder = "MNIST" if name == "mnist" else "FashionMNIST"
    raw = root / folder / "raw"
    files = ", ".join(_MNIST_RAW_FILES)
    try:
        # Imported here: torchvision is optional and only these two sets need it.
        from torchvision import datasets
    except ImportError as err:
        raise ImportError(
            f"{name!r} needs torchvision: pip install torchvision. Then put its files in "
            f"{raw}/ ({files}), or pass download=True to let torchvision fetch them"
        ) from err
    dataset_class = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        train_set = dataset_class(str(root), train=True, download=download)
        test_set = dataset_class(str(root), train=False, download=download)
    except RuntimeError as err:  # torchvision's "Dataset not found" error
        raise DatasetNotFoundError(
            f"{name}: torchvision found no data under {root}: put {files} in {raw}/, pass "
            f"root= the directory holding {folder}/, or pass download=True ({err})"
        ) from err

    def grey(images: Tensor) -> Tensor:
        return images.reshape(len(images), -1).to(torch.float32) / 255.0

    def binarize(images: Tensor, seed: int) -> Tensor:
        # Evaluation sets get one fixed binarization so that bounds are comparable.
        return torch.bernoulli(images, generator=torch.Generator().manual_seed(seed))

    images = grey(train_set.data)
    train, valid = images[:-_MNIST_VALID_SIZE], images[-_MNIST_VALID_SIZE:]
    valid = binarize(valid, _MNIST_VALID_SEED)
    test = binarize(grey(test_set.data), _MNIST_TEST_SEED)
    source = "MNIST" if name == "mnist" else "Fashion-MNIST"
    description = (
        f"torchvision {source} (28x28) from {root}: train/valid/test "
        f"{len(train)}/{len(valid)}/{len(test)} images (valid = the last {len(valid)} of the "
        f"training set); train holds grey levels in [0, 1], to be binarized dynamically with "
        f"torch.bernoulli on each batch; valid and test binarized once with seeds "
        f"{_MNIST_VALID_SEED} and {_MNIST_TEST_SEED}"
    )
    return Dataset(train, valid, test, name, description, (28, 28), dynamic_binarization=True)


def main(argv: list[str] | None = None) -> Dataset:
    """Load a data set and print its description and split shapes."""
    parser = argparse.ArgumentParser(description="Check that a data set loads.")
    parser.add_argument("name", nargs="?", default="digits", choices=DATASET_NAMES)
    parser.add_argument("--root", default=None)
    parser.add_argument("--download", action="store_true")
    args = parser.parse_args(argv)
    data = load_dataset(args.name, root=args.root, download=args.download)
    print(data.description)
    for split in _SPLITS:
        print(f"{split:>5}: {tuple(getattr(data, split).shape)}")
    return data


if __name__ == "__main__":
    main()
