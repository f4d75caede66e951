"""The files this project reads and writes itself, with numpy and Pillow: found (gzipped or not), checked against
their md5 and downloaded from mirrors; MNIST's idx files, MATLAB v5 .mat files (SVHN's), folders of JPEGs decoded once
into a cached array (CelebA's), and PNG pictures of image grids with a caption (every figure, every samples.png),
animated GIFs of them (sample.py --gif) and line charts (train.py's curves.png).
data.py says which files make each dataset and turns them into arrays; train.py and sample.py draw.

    from files import image_grid, save_png
    save_png(image_grid(images, nrow=10), "grid.png", "a caption")      # images: (N, C, H, W) in [0, 1]
"""
from __future__ import annotations
import gzip, hashlib, os, struct, sys, urllib.request, zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np

FIX_BAD_FILE = "delete it and run again to re-download, or point --data-dir / VLAE_DATA at a good copy"
LABEL_H = 14                 # pixels of the caption strip above each panel of side_by_side
PANEL_GAP = 12               # pixels between panels


class DataError(Exception):
    """A problem with the user's data files; its message is one line saying what is wrong and how to fix it."""


# ------------------------------------------------------------------------------- finding, checking, downloading

def find_folder(roots: list[Path], name: str, files) -> Path:
    """The first of <root>/<name> or <root> (for each root in order) that holds all the files, gzipped or not.
    If none does, <first root>/<name>: the folder to download into."""
    for root in roots:
        for folder in (root / name, root):
            if not missing(folder, files):
                return folder
    return roots[0] / name


def missing(folder: Path, files) -> list[str]:
    """The files that are in folder neither as they are nor gzipped."""
    return [f for f in files if not ((folder / f).exists() or (folder / (f + ".gz")).exists())]


def check_md5(path: Path, data: bytes, md5: str, of: str = "") -> None:
    got = hashlib.md5(data).hexdigest()
    if got != md5:
        raise DataError(f"{path} is corrupt: md5{of} is {got}, expected {md5}: {FIX_BAD_FILE}")


def read_verified(folder: Path, name: str, md5: str, md5_of_gz: bool = False) -> bytes:
    """The decompressed bytes of <name> or <name>.gz in folder, checked against md5: the md5 of the decompressed bytes,
    or with md5_of_gz that of the .gz file (then an uncompressed <name> goes unchecked: there is no md5 to check)."""
    paths = (folder / name, folder / (name + ".gz"))
    for path in reversed(paths) if md5_of_gz else paths:
        if not path.exists():
            continue
        try:
            raw = path.read_bytes()
            data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path} is truncated or not valid gzip ({e}): {FIX_BAD_FILE}") from None
        if not md5_of_gz:
            check_md5(path, data, md5, " of its decompressed bytes")
        elif data is not raw:
            check_md5(path, raw, md5, " of the .gz file")
        return data
    raise DataError(f"{folder / name}[.gz] not found")


def download(folder: Path, files, mirrors, how_to_fix: str) -> None:
    """Fetch each file from the first mirror that answers, with a progress line; how_to_fix ends the error when
    none does. (Not tinygrad.helpers.fetch: it refuses file:// mirrors, which the tests use, with an AssertionError.)"""
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        errors = []
        for base in mirrors:
            url, tmp = base + file, folder / (file + ".part")
            try:
                def progress(blocks, block_size, total, url=url):
                    done = blocks * block_size
                    pct = f"{100 * done / total:5.1f}%" if total > 0 else f"{done >> 10} KiB"
                    print(f"\rdownloading {url} {pct}", end="", file=sys.stderr, flush=True)
                urllib.request.urlretrieve(url, tmp, reporthook=progress)
                print(file=sys.stderr)
                os.replace(tmp, folder / file)
                break
            except OSError as e:
                tmp.unlink(missing_ok=True)
                errors.append(f"{url}: {e}")
        else:
            raise DataError(f"{file} is not in {folder} and could not be downloaded ({'; '.join(errors)}): "
                            f"{how_to_fix}")


# --------------------------------------------------------------------------------------------- idx (MNIST)

def parse_idx(data: bytes, name: str) -> np.ndarray:
    """An idx file: magic (0, 0, dtype=0x08 ubyte, ndim), ndim big-endian uint32 sizes, then the data."""
    fix = "replace it with the original file, or point --data-dir / VLAE_DATA at a good copy"
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{name} is not an unsigned-byte idx file (bad magic number {data[:4].hex()}): {fix}")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{name} is truncated inside its header: {fix}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{name} holds {arr.size} values where its header says {shape}: {fix}")
    return arr.reshape(shape)


# --------------------------------------------------------------------------------------------- MATLAB v5 (SVHN)

MAT_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}  # miINT8..
MAT_CLASSES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
MI_MATRIX, MI_COMPRESSED = 14, 15


def mat_element(buf: memoryview, pos: int, order: str, pad: bool = True) -> tuple[int, memoryview, int]:
    """The data element at buf[pos]: (type, its data, where the next element starts). A tag is (type, byte count)
    as two uint32; a 'small' element packs both into one uint32 (count << 16 | type) and its data into the next 4
    bytes. Inside a matrix elements are padded to 8 bytes; top-level ones are not (compressed ones end anywhere)."""
    mtype, nbytes = struct.unpack_from(order + "II", buf, pos)
    if mtype >> 16:
        return mtype & 0xFFFF, buf[pos + 4:pos + 4 + (mtype >> 16)], pos + 8
    end = pos + 8 + nbytes
    if end > len(buf):
        raise ValueError(f"an element of {nbytes} bytes at byte {pos} runs past the end")
    return mtype, buf[pos + 8:end], (end + 7) // 8 * 8 if pad else end


def mat_matrix(body: memoryview, order: str) -> tuple[str, np.ndarray | None]:
    """An miMATRIX element's data -> (variable name, array in MATLAB's shape), None for anything but a real numeric
    array. Subelements: array flags (class in the low byte, complex bit 0x800), dimensions, name, real part."""
    _, flags, pos = mat_element(body, 0, order)
    _, dims, pos = mat_element(body, pos, order)
    _, name, pos = mat_element(body, pos, order)
    flag_word, name = struct.unpack_from(order + "I", flags)[0], bytes(name).decode("latin-1")
    if (flag_word & 0xFF) not in MAT_CLASSES or flag_word & 0x800:
        return name, None
    shape = tuple(np.frombuffer(dims, order + "i4"))
    dtype, data, _ = mat_element(body, pos, order)
    if dtype not in MAT_TYPES:
        raise ValueError(f"variable {name} has data of unknown type {dtype}")
    arr = np.frombuffer(data, order + MAT_TYPES[dtype])                  # stored type: may be smaller than the class
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"variable {name} holds {arr.size} values, not {shape}")
    return name, arr.reshape(shape, order="F").astype(MAT_CLASSES[flag_word & 0xFF], copy=False)   # column-major


def read_mat(raw: bytes, path) -> dict[str, np.ndarray]:
    """{name: array} for the real numeric variables of a MATLAB v5 .mat file (MATLAB's -v6 and -v7 formats).

    Why not scipy.io.loadmat: scipy is a heavy dependency for reading two arrays, and SVHN's files use a small part
    of the format ("MAT-File Format", MathWorks): a 128-byte header (text, version, endian indicator "IM" or "MI"),
    then one data element per variable, an miMATRIX or an miCOMPRESSED element that zlib-compresses one. Cell,
    struct, char, sparse and complex variables are skipped; v7.3 files (HDF5) are not read."""
    if raw[:10] == b"MATLAB 7.3":
        raise DataError(f"{path} is a MATLAB 7.3 (HDF5) file, which this reader does not read: re-save it with -v7")
    order = {b"IM": "<", b"MI": ">"}.get(raw[126:128])
    if len(raw) < 128 or order is None or raw[:4] == b"\0\0\0\0":
        raise DataError(f"{path} is not a MATLAB v5 .mat file (no v5 header): {FIX_BAD_FILE}")
    buf, pos, arrays = memoryview(raw), 128, {}
    try:
        while pos < len(buf):
            mtype, body, pos = mat_element(buf, pos, order, pad=False)
            if mtype == MI_COMPRESSED:
                mtype, body, _ = mat_element(memoryview(zlib.decompress(body)), 0, order)
            if mtype != MI_MATRIX:
                continue
            name, arr = mat_matrix(body, order)
            if arr is not None:
                arrays[name] = arr
    except (struct.error, zlib.error, ValueError) as e:
        raise DataError(f"{path} is truncated or not a valid .mat file ({e}): {FIX_BAD_FILE}") from None
    return arrays


# --------------------------------------------------------------------------------------------- JPEG folders (CelebA)

def decode_jpeg(path: Path, crop: int, size: int) -> np.ndarray:
    """One JPEG -> (3, size, size) uint8: its central crop x crop square (rounded as in the authors' CelebA code),
    resized bilinearly."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            left, top = round((img.width - crop) / 2), round((img.height - crop) / 2)
            # crop, then resize: resize(box=...) would blend in pixels from outside the box at its edges
            img = img.crop((left, top, left + crop, top + crop)).resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img).transpose(2, 0, 1)                    # (H, W, C) -> (C, H, W)
    except OSError as e:
        raise DataError(f"{path} is not a readable image ({e}): delete it, or unzip the images anew") from None


def decoded_jpegs(folder: Path, names: list[str], crop: int, size: int, desc: str) -> np.ndarray:
    """All the images, (N, 3, size, size) uint8, memory-mapped from a cache next to the folder,
    <folder>.<size>x<size>.<hash of crop and file names>.npy. The JPEGs are decoded once; when the list of files
    changes, so does the hash: the old cache is deleted and the images decoded again. (A file replaced under the same
    name is not noticed: delete the cache.)"""
    from tinygrad.helpers import tqdm
    key = hashlib.sha1("\n".join([f"crop {crop}", *names]).encode()).hexdigest()[:12]
    prefix = f"{folder.name}.{size}x{size}."
    cache, shape = folder.parent / (prefix + key + ".npy"), (len(names), 3, size, size)
    if cache.exists():
        try:
            x = np.load(cache, mmap_mode="r")
            if x.shape == shape and x.dtype == np.uint8:
                return x
        except (OSError, ValueError):
            pass
        print(f"{cache} is unreadable: decoding the images again", file=sys.stderr)
    x = np.empty(shape, np.uint8)
    with ThreadPoolExecutor(os.cpu_count()) as pool, tqdm(total=len(names), desc=desc, unit="img") as bar:
        for start in range(0, len(names), 1024):                  # Pillow releases the GIL while it decodes
            block = names[start:start + 1024]
            x[start:start + len(block)] = np.stack(list(pool.map(lambda n: decode_jpeg(folder / n, crop, size), block)))
            bar.update(len(block))
    tmp = cache.with_name(cache.name + ".part")
    try:
        with open(tmp, "wb") as f:
            np.save(f, x)
        os.replace(tmp, cache)                                     # atomic: a cache file is complete or absent
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(f"could not write the cache {cache} ({e}): the images will be decoded again next time", file=sys.stderr)
        return x
    for old in folder.parent.glob(prefix + "*.npy"):
        if old != cache:
            old.unlink()
    return np.load(cache, mmap_mode="r")


# --------------------------------------------------------------------------------------------- PNG pictures

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
    return save_image([with_header(grid, header)], path)


def save_gif(grids: list[np.ndarray], path, headers: list[str], ms: int = 120) -> Path:
    """Grids from image_grid, one per frame, as an animated GIF that loops, each frame under its own header."""
    return save_image([with_header(g, h) for g, h in zip(grids, headers)], path, duration=ms, loop=0)


def with_header(grid: np.ndarray, header: str | None):
    """A grid (H, W, C uint8) as a Pillow image, with a one-line text header above it."""
    from PIL import Image, ImageDraw
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if header:
        framed = Image.new(img.mode, (img.width, img.height + 14), 255 if img.mode == "L" else (255, 255, 255))
        framed.paste(img, (0, 14))
        ImageDraw.Draw(framed).text((2, 1), header, fill=0 if img.mode == "L" else (0, 0, 0))
        img = framed
    return img


def save_image(frames: list, path, **gif) -> Path:
    """Pillow images to path, written to a temporary file and renamed; more than one frame makes an animated GIF."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if len(frames) > 1:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], **gif)
    else:
        frames[0].save(tmp, format=path.suffix[1:].upper() or "PNG")
    os.replace(tmp, path)
    return path


CURVE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def line_charts(panels: list, path, header: str, size: tuple = (300, 220)) -> Path:
    """Line charts side by side, drawn with Pillow (no plotting library): panels is [(title, [(label, x, y), ...])];
    each panel's axes span its data, with the extreme values written at the ends."""
    from PIL import Image, ImageDraw
    w, h = size
    img = Image.new("RGB", (w * len(panels), h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for p, (title, lines) in enumerate(panels):
        left, right, top, bottom = p * w + 52, p * w + w - 20, 18, h - 18         # the plot's box
        xs = np.concatenate([np.asarray(x, float) for _, x, _ in lines])
        ys = np.concatenate([np.asarray(y, float) for _, _, y in lines])
        ys = ys[np.isfinite(ys)] if np.isfinite(ys).any() else np.zeros(1)
        (x_lo, x_hi), (y_lo, y_hi) = (xs.min(), max(xs.max(), xs.min() + 1)), (ys.min(), max(ys.max(), ys.min() + 1e-6))
        draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
        draw.text((left, 3), title, fill=(0, 0, 0))
        draw.text((p * w + 2, top - 5), f"{y_hi:.4g}", fill=(0, 0, 0))
        draw.text((p * w + 2, bottom - 7), f"{y_lo:.4g}", fill=(0, 0, 0))
        draw.text((left, bottom + 3), f"{x_lo:g}", fill=(0, 0, 0))
        draw.text((right - 60, bottom + 3), f"step {x_hi:g}", fill=(0, 0, 0))
        for i, (label, x, y) in enumerate(lines):
            colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
            points = [(left + (a - x_lo) / (x_hi - x_lo) * (right - left), bottom - (b - y_lo) / (y_hi - y_lo) *
                       (bottom - top)) for a, b in zip(x, y) if np.isfinite(b)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            else:
                draw.point(points, fill=colour)
            if len(lines) > 1:                                                     # the legend: after the title
                draw.text((left + draw.textlength(title + " ") + 30 * i, 3), label, fill=colour)
    return save_image([with_header(np.asarray(img), header)], path)


def side_by_side(grids: list[np.ndarray], labels: list[str]) -> np.ndarray:
    """Panels from image_grid (H, W, C uint8) placed left to right, PANEL_GAP apart, each under its label."""
    from PIL import Image, ImageDraw
    h, c = max(g.shape[0] for g in grids), grids[0].shape[2]
    canvas = np.full((LABEL_H + h, sum(g.shape[1] for g in grids) + PANEL_GAP * (len(grids) - 1), c), 255, np.uint8)
    lefts = np.cumsum([0] + [g.shape[1] + PANEL_GAP for g in grids[:-1]])
    for g, left in zip(grids, lefts):
        canvas[LABEL_H:LABEL_H + g.shape[0], left:left + g.shape[1]] = g
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    draw = ImageDraw.Draw(img)
    for label, left in zip(labels, lefts):
        draw.text((int(left) + 2, 1), label, fill=0 if c == 1 else (0, 0, 0))
    return np.asarray(img).reshape(canvas.shape)
