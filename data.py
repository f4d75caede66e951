"""Datasets for the VLAE: MNIST, Fashion-MNIST, SVHN and CelebA: found, checked by md5 where md5s are published,
downloaded where they can be, split and batched (files.py does the work on files and reads their formats).

    ds = load_dataset("mnist")                 # ds.train_x: (60000, 1, 28, 28) float32 in [0, 1]
    batch = next(batches(ds.train_x, ds.train_y, 100, seed=0, epoch=0))     # (x, y), x float32 in [0, 1]

mnist, fashion-mnist: the four idx files (gzipped or not); svhn: train_32x32.mat and test_32x32.mat (both downloaded
if missing); celeba: the folder img_align_celeba/ of JPEGs (download by hand), decoded once into a 64x64 uint8 cache.
Looked for in --data-dir, $VLAE_DATA, ./data: each a root with one sub-folder per dataset (<root>/mnist/...) or the
files themselves.
"""
from __future__ import annotations
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
import numpy as np
from files import (FIX_BAD_FILE, DataError, check_md5, decoded_jpegs, download, find_folder, missing, parse_idx,
                   read_mat, read_verified)

# md5 of the *decompressed* files (the .gz bytes differ between mirrors; the content does not).
MNIST_FILES = {"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
               "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
               "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
               "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"}
MNIST_MIRRORS = ["https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "https://ossci-datasets.s3.amazonaws.com/mnist/"]

# Fashion-MNIST (Xiao et al. 2017): md5 of the *.gz* files, as published in zalandoresearch/fashion-mnist's README (none
# of the decompressed files is, so an uncompressed copy is checked only by its idx header).
FASHION_FILES = {"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                 "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
                 "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
                 "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"}
FASHION_MIRRORS = ["https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                   "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]

# SVHN (Netzer et al. 2011), "format 2" 32x32 crops: md5 of the files, as listed in torchvision's svhn.py.
# extra_32x32.mat (md5 a93ce644f1a588dc4d68dda5feec44a7) is not used.
SVHN_FILES = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
              "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}
SVHN_MIRRORS = ["http://ufldl.stanford.edu/housenumbers/"]

# CelebA (Liu et al. 2015), aligned and cropped 178x218 JPEGs. The authors' dataset_celeba.py crops the central
# 108x108 and resizes it to 64x64 (bilinear). md5 of list_eval_partition.txt as listed in torchvision's celeba.py.
CELEBA_CROP, CELEBA_SIZE = 108, 64
CELEBA_PARTITION_MD5 = "d32c9cbf5e040fd4025c592c306e6668"
CELEBA_URLS = "http://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive) or " \
              "https://www.kaggle.com/datasets/jessicali9530/celeba-dataset"

@dataclass
class Dataset:
    name: str
    train_x: np.ndarray     # (N, C, H, W) float32 in [0, 1]; CelebA: uint8 in [0, 255], memory-mapped (see as_float)
    train_y: np.ndarray     # (N,) int64 class labels; zeros where the dataset has none (CelebA)
    test_x: np.ndarray
    test_y: np.ndarray
    labelled: bool = True   # False: train_y and test_y are zeros, not classes

    @property
    def image_shape(self) -> tuple:
        return tuple(self.train_x.shape[1:])


def as_float(x: np.ndarray) -> np.ndarray:
    """Images as float32 in [0, 1]. CelebA's arrays are uint8: as float32 its training set would take 10 GB of memory,
    so it stays uint8 (2.5 GB, memory-mapped) and is converted a batch or a slice at a time."""
    return np.divide(x, np.float32(255), dtype=np.float32) if x.dtype == np.uint8 else x


def data_roots(data_dir: str | None = None) -> list[Path]:
    return [Path(p) for p in (data_dir, os.environ.get("VLAE_DATA"), "data") if p]


def load_idx_dataset(name: str, roots: list[Path], files: dict, mirrors, md5_of_gz: bool = False) -> Dataset:
    """MNIST-style data: files = {train images, train labels, test images, test labels: md5} in that order."""
    folder = find_folder(roots, name, files)
    if absent := missing(folder, files):
        download(folder, [n + ".gz" for n in absent], mirrors,
                 f"copy the {name} idx files there, or point --data-dir / VLAE_DATA at a folder holding them")
    train_x, train_y, test_x, test_y = (parse_idx(read_verified(folder, n, md5, md5_of_gz), n)
                                        for n, md5 in files.items())
    return Dataset(name, as_float(train_x)[:, None], train_y.astype(np.int64), as_float(test_x)[:, None],
                   test_y.astype(np.int64))                            # x: (N, 1, 28, 28) in [0, 1]


load_mnist = partial(load_idx_dataset, "mnist", files=MNIST_FILES, mirrors=MNIST_MIRRORS)        # (roots, mirrors=)
load_fashion_mnist = partial(load_idx_dataset, "fashion-mnist", files=FASHION_FILES, mirrors=FASHION_MIRRORS,
                             md5_of_gz=True)


def svhn_split(path: Path, md5: str) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN file: X (32, 32, 3, N) uint8 (row, column, channel, image) and y (N, 1) with 1..10, 10 for digit 0."""
    check_md5(path, raw := path.read_bytes(), md5)
    mat = read_mat(raw, path)
    X, y = mat.get("X"), mat.get("y")
    svhn_like = X is not None and y is not None and X.ndim == 4 and X.shape[:3] == (32, 32, 3)
    if not svhn_like or X.dtype != np.uint8 or y.size != X.shape[3]:
        found = {k: v.shape for k, v in mat.items()}
        raise DataError(f"{path} holds {found}, not X (32x32x3xN uint8) and y (Nx1) as in SVHN: {FIX_BAD_FILE}")
    labels = y.reshape(-1).astype(np.int64)
    if labels.min(initial=1) < 1 or labels.max(initial=10) > 10:
        raise DataError(f"{path} has labels outside 1..10: {FIX_BAD_FILE}")
    x = as_float(np.ascontiguousarray(X.transpose(3, 2, 0, 1)))    # (32, 32, 3, N) -> (N, 3, 32, 32): (N, C, H, W)
    return x, labels % 10                                          # SVHN's label 10 is the digit 0


def load_svhn(roots: list[Path], mirrors=SVHN_MIRRORS) -> Dataset:
    folder = find_folder(roots, "svhn", SVHN_FILES)
    if absent := [f for f in SVHN_FILES if not (folder / f).exists()]:      # (SVHN's files are not gzipped)
        download(folder, absent, mirrors, f"download them from {SVHN_MIRRORS[0]} into that folder, or point "
                                          "--data-dir / VLAE_DATA at a folder holding them")
    (train_x, train_y), (test_x, test_y) = (svhn_split(folder / f, md5) for f, md5 in SVHN_FILES.items())
    return Dataset("svhn", train_x, train_y, test_x, test_y)


def celeba_test_rows(folder: Path, names: list[str]) -> np.ndarray:
    """(N,) bool, True for test images: partition 2 of CelebA's own split (list_eval_partition.txt, md5-checked, or
    Kaggle's .csv, in folder), else the last 10% of the images in file-name order (as the official test set)."""
    txt, csv = folder / "list_eval_partition.txt", folder / "list_eval_partition.csv"
    if not (txt.exists() or csv.exists()):
        return np.arange(len(names)) >= len(names) - (len(names) + 9) // 10
    path = txt if txt.exists() else csv
    raw = path.read_bytes()
    if path == txt:
        check_md5(path, raw, CELEBA_PARTITION_MD5)
    lines = (line.replace(",", " ").split() for line in raw.decode(errors="replace").splitlines())
    partition = {fields[0]: fields[1] for fields in lines if len(fields) == 2}       # a csv header line is harmless
    if unknown := [n for n in names if n not in partition]:
        raise DataError(f"{path} has no partition for {len(unknown)} of the images (e.g. {unknown[0]}): "
                        "delete it to split by file name (the last 10% are the test set)")
    return np.array([partition[n] == "2" for n in names])


def rows(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x[mask]; a view (no copy of the memory-mapped cache) when the chosen rows are contiguous, as CelebA's are."""
    idx = np.flatnonzero(mask)
    return x[idx[0]:idx[-1] + 1] if len(idx) and idx[-1] - idx[0] + 1 == len(idx) else x[idx]


def load_celeba(roots: list[Path]) -> Dataset:
    """CelebA's aligned and cropped JPEGs as 64x64 uint8 arrays (see as_float). No class labels: y are zeros."""
    folder = find_folder(roots, "celeba", ["img_align_celeba"])
    images = folder / "img_align_celeba"
    if not images.is_dir():
        for zipped in (f / "img_align_celeba.zip" for root in roots for f in (root / "celeba", root)):
            if zipped.exists():
                raise DataError(f"{zipped} is not unzipped: run `unzip {zipped} -d {zipped.parent}`")
        places = ", ".join(str(r / "celeba") for r in roots)
        raise DataError(f"CelebA is not in {places}: download img_align_celeba.zip by hand (there is no stable URL) "
                        f"from {CELEBA_URLS} and unzip it into {folder}, so that {images / '000001.jpg'} exists")
    if (images / "img_align_celeba").is_dir():                         # nested, as some copies unzip
        images = images / "img_align_celeba"
    names = sorted(f for f in os.listdir(images) if f.lower().endswith((".jpg", ".jpeg")))
    if not names:
        raise DataError(f"{images} holds no .jpg files: unzip img_align_celeba.zip into {folder}")
    test = celeba_test_rows(folder, names)                              # before decoding: it can fail fast
    x = decoded_jpegs(images, names, CELEBA_CROP, CELEBA_SIZE, desc="decoding CelebA")
    train_x, test_x = rows(x, ~test), rows(x, test)
    return Dataset("celeba", train_x, np.zeros(len(train_x), np.int64), test_x, np.zeros(len(test_x), np.int64),
                   labelled=False)


LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist, "svhn": load_svhn, "celeba": load_celeba}
DATASETS = tuple(LOADERS)


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return LOADERS[name](data_roots(data_dir))


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int, start: int = 0,
            binarize: bool = False):
    """Shuffled float32 mini-batches of one epoch from batch `start` on, in an order fixed by (seed, epoch) (a resumed
    run sees the same data), the last incomplete one dropped; binarize: x ~ Bernoulli(x), drawn afresh each epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(len(x))
    for i in range(start, len(x) // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        xb = as_float(x[idx])
        if binarize:
            xb = (np.random.default_rng([seed, epoch, i]).random(xb.shape, dtype=np.float32) < xb).astype(np.float32)
        yield xb, y[idx]


def binarized_test_set(x: np.ndarray) -> np.ndarray:
    """A fixed binarization of the test set (seed 0), so that Bernoulli test ELBOs compare across runs."""
    return (np.random.default_rng(0).random(x.shape, dtype=np.float32) < x).astype(np.float32)
