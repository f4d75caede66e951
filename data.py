"""Datasets for the VLAE: MNIST from the four standard idx files, checked by md5, plus image-grid PNG writing.

    from data import load_dataset, batches
    ds = load_dataset("mnist")                 # finds, checks (and if needed downloads) the idx files
    ds.train_x.shape                           # (60000, 1, 28, 28) float32 in [0, 1]
    for x, y in batches(ds.train_x, ds.train_y, 100, seed=0, epoch=0): ...

Where the files are looked for, in order: --data-dir, the environment variable VLAE_DATA, ./data.
Each is a root folder holding one sub-folder per dataset (<root>/mnist/train-images-idx3-ubyte[.gz], ...);
a folder that holds the idx files directly works too.
"""
from __future__ import annotations
import gzip, hashlib, os, struct, sys, urllib.request
from dataclasses import dataclass
from pathlib import Path
import numpy as np

# md5 of the *decompressed* files (the .gz bytes differ between mirrors; the content does not).
MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_MIRRORS = ["https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "https://ossci-datasets.s3.amazonaws.com/mnist/"]
DATASETS = ("mnist",)


class DataError(Exception):
    """A problem with the user's data files; its message is one line saying what is wrong and how to fix it."""


@dataclass
class Dataset:
    name: str
    train_x: np.ndarray     # (N, C, H, W) float32 in [0, 1]
    train_y: np.ndarray     # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def image_shape(self) -> tuple: return tuple(self.train_x.shape[1:])


def data_roots(data_dir: str | None = None) -> list[Path]:
    """Where to look, in order: --data-dir, $VLAE_DATA, ./data."""
    return [Path(p) for p in (data_dir, os.environ.get("VLAE_DATA"), "data") if p]


def find_folder(roots: list[Path], name: str, files) -> Path:
    """The first of <root>/<name> or <root> (for each root in order) that holds all the files, gzipped or not.
    If none does, <first root>/<name>: the folder to download into."""
    def has(folder, f): return (folder / f).exists() or (folder / (f + ".gz")).exists()
    for root in roots:
        for folder in (root / name, root):
            if all(has(folder, f) for f in files): return folder
    return roots[0] / name


def read_verified(folder: Path, name: str, md5: str) -> bytes:
    """The decompressed bytes of <name> or <name>.gz in folder, checked against md5."""
    fix = "delete it and run again to re-download, or point --data-dir / VLAE_DATA at a good copy"
    for path in (folder / name, folder / (name + ".gz")):
        if not path.exists(): continue
        try:
            raw = path.read_bytes()
            data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path} is truncated or not valid gzip ({e}): {fix}") from None
        if (got := hashlib.md5(data).hexdigest()) != md5:
            raise DataError(f"{path} is corrupt: md5 of its decompressed bytes is {got}, expected {md5}: {fix}")
        return data
    raise DataError(f"{folder / name}[.gz] not found")


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """An idx file: magic (0, 0, dtype=0x08 ubyte, ndim), ndim big-endian uint32 sizes, then the data."""
    fix = "replace it with the original file, or point --data-dir / VLAE_DATA at a good copy"
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{name} is not an unsigned-byte idx file (bad magic number {data[:4].hex()}): {fix}")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim: raise DataError(f"{name} is truncated inside its header: {fix}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{name} holds {arr.size} values where its header says {shape}: {fix}")
    return arr.reshape(shape)


def download(folder: Path, names, mirrors=MNIST_MIRRORS) -> None:
    """Fetch <name>.gz for each missing name from the first mirror that answers, with a progress line."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (folder / name).exists() or (folder / (name + ".gz")).exists(): continue
        errors = []
        for base in mirrors:
            url, tmp = base + name + ".gz", folder / (name + ".gz.part")
            try:
                def progress(blocks, block_size, total, url=url):
                    done = blocks * block_size
                    pct = f"{100 * done / total:5.1f}%" if total > 0 else f"{done >> 10} KiB"
                    print(f"\rdownloading {url} {pct}", end="", file=sys.stderr, flush=True)
                urllib.request.urlretrieve(url, tmp, reporthook=progress)
                print(file=sys.stderr)
                os.replace(tmp, folder / (name + ".gz"))
                break
            except OSError as e:
                tmp.unlink(missing_ok=True)
                errors.append(f"{url}: {e}")
        else:
            raise DataError(f"{name}.gz is not in {folder} and could not be downloaded ({'; '.join(errors)}); "
                            f"copy the MNIST idx files there, or point --data-dir / VLAE_DATA at a folder holding them")


def load_mnist(roots: list[Path], mirrors=MNIST_MIRRORS) -> Dataset:
    folder = find_folder(roots, "mnist", MNIST_FILES)
    missing = [n for n in MNIST_FILES if not ((folder / n).exists() or (folder / (n + ".gz")).exists())]
    if missing: download(folder, missing, mirrors)
    arrays = {n: parse_idx(read_verified(folder, n, md5), n) for n, md5 in MNIST_FILES.items()}

    def images(n): return (arrays[n].astype(np.float32) / 255.0)[:, None]       # (N, 1, 28, 28) in [0, 1]
    return Dataset("mnist", images("train-images-idx3-ubyte"), arrays["train-labels-idx1-ubyte"].astype(np.int64),
                   images("t10k-images-idx3-ubyte"), arrays["t10k-labels-idx1-ubyte"].astype(np.int64))


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return load_mnist(data_roots(data_dir))


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int, start: int = 0,
            binarize: bool = False):
    """Shuffled mini-batches for one epoch, the order a function of (seed, epoch) only, so a resumed run sees
    the same data. start skips the first batches. The last incomplete batch is dropped (jitted shapes are fixed).
    binarize: dynamic binarization, x ~ Bernoulli(pixel intensity), drawn afresh every epoch."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(x))
    for i in range(start, len(x) // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        xb = x[idx]
        if binarize:
            xb = (np.random.default_rng([seed, epoch, i]).random(xb.shape, dtype=np.float32) < xb).astype(np.float32)
        yield xb, y[idx]


def image_grid(images: np.ndarray, nrow: int, gutter: int = 2, scale: int = 1, background: float = 1.0) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (rows*(H+g)+g, nrow*(W+g)+g, C) uint8, images separated by gutters."""
    n, c, h, w = images.shape
    ncol_rows = (n + nrow - 1) // nrow
    grid = np.full((ncol_rows * (h + gutter) + gutter, nrow * (w + gutter) + gutter, c), background, np.float32)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = gutter + r * (h + gutter), gutter + col * (w + gutter)
        grid[top:top + h, left:left + w] = img.transpose(1, 2, 0)
    grid = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
    return grid.repeat(scale, 0).repeat(scale, 1) if scale > 1 else grid


def over_each_other(top: np.ndarray, bottom: np.ndarray, ncol: int) -> np.ndarray:
    """Rows of ncol images from top, each followed by the matching row from bottom (e.g. test images over their
    reconstructions): (N, C, H, W) twice -> (2N, C, H, W) for image_grid(..., ncol)."""
    rows = [part for r in range(0, len(top), ncol) for part in (top[r:r + ncol], bottom[r:r + ncol])]
    return np.concatenate(rows)


def save_png(grid: np.ndarray, path, header: str | None = None) -> Path:
    """Write a grid from image_grid as PNG, with an optional one-line text header above it."""
    from PIL import Image, ImageDraw
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if header:
        framed = Image.new(img.mode, (img.width, img.height + 14), 255 if img.mode == "L" else (255, 255, 255))
        framed.paste(img, (0, 14))
        ImageDraw.Draw(framed).text((2, 1), header, fill=0 if img.mode == "L" else (0, 0, 0))
        img = framed
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
