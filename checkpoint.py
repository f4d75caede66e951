"""A run folder's checkpoint: one safetensors file holding the model's weights, and for a training run Adam's state,
tinygrad's RNG counter and the epoch's running sums, with the config, step and log as JSON metadata; written
atomically. sample.py, evaluate.py and study.py read checkpoints through this file without importing the trainer.
StopSignals makes Ctrl-C and SIGTERM stop training between two steps, where the checkpoint saved is consistent.

    from checkpoint import load_model
    model, meta = load_model(Path("out/mnist-vlae"))     # the config in meta["config"] rebuilds the model
"""
from __future__ import annotations
import json, os, signal, sys
from pathlib import Path
import numpy as np
from tinygrad import Tensor, Device, dtypes
from vlae import VLAE, ModelConfig, weights
from hvae import HVAE
import fast

MODELS = {"vlae": VLAE, "hvae": HVAE}
CHECKPOINT = "checkpoint.safetensors"
OWN_RUN = Path("out/mnist-vlae")                                   # where `python train.py` puts the default run
PRETRAINED = Path(__file__).parent / "pretrained" / "mnist-vlae"    # the default run's weights in float16, committed


class UserError(Exception):
    """A mistake in flags, files or run folders; main() prints its one-line message and exits with code 2."""


# ---------------------------------------------------------------------------------------------------------
# Stopping a run where a checkpoint can be saved
# ---------------------------------------------------------------------------------------------------------

class Stopped(Exception):
    """SIGINT or SIGTERM stopped training between two steps; main() prints the message and exits with 128 + signal."""
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = 128 + signum


class StopSignals:
    """While active, Ctrl-C (SIGINT) and SIGTERM only set .signum: the training loop checks it between steps, so a
    step is never cut in half and the checkpoint saved after it is consistent. A second signal stops at once."""
    def __enter__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------

def build_model(cfg: ModelConfig):
    """The model of a config; with its layers' fast forms when the entry script switched fast/ on (the same weights)."""
    return fast.accelerate(MODELS[cfg.model](cfg))


def optimizer_state(opt) -> dict[str, Tensor]:
    """Adam's moments and bias-correction powers (the params themselves are saved with the model)."""
    state = {"b1_t": opt.b1_t, "b2_t": opt.b2_t}
    for i, (m, v) in enumerate(zip(opt.m, opt.v)):
        state[f"m.{i}"], state[f"v.{i}"] = m, v
    return state


def rng_counter() -> Tensor:
    """tinygrad's on-device RNG draws from (seed, counter); saving the counter makes a resumed run continue
    the same stream of random numbers. (A private attribute: tinygrad 0.14 has no public way to read or set the
    counter, and exact resume needs both.)"""
    if Device.DEFAULT not in Tensor._device_rng_counters:
        Tensor.rand(1).realize()
    return Tensor._device_rng_counters[Device.DEFAULT]


def checkpoint_tensors(model, opt=None, totals: Tensor | None = None) -> dict[str, Tensor]:
    """A checkpoint's tensors by name, for saving and for loading: the model's weights (model.*), and for a training
    run Adam's state (optim.*), tinygrad's RNG counter and the running sums of the epoch so far (train.totals)."""
    state = {f"model.{k}": v for k, v in weights(model).items()}
    if opt is not None:
        state |= {f"optim.{k}": v for k, v in optimizer_state(opt).items()}
        state["rng.counter"] = rng_counter()
    if totals is not None:
        state["train.totals"] = totals
    return state


def code_version() -> dict:
    """The git commit of this code and whether the tree had uncommitted changes ({} outside a git checkout): recorded
    with every checkpoint and study row, so that a result names the code that made it."""
    import subprocess
    here = Path(__file__).parent
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=10, check=True)
        return {"commit": git("rev-parse", "HEAD").stdout.strip(),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def save_checkpoint(path: Path, model, opt, meta: dict, totals: Tensor | None = None) -> None:
    """Write to a temporary file, flush it to disk, then rename over the old checkpoint: a crash at any moment
    leaves either the previous checkpoint or the new one, never a half-written file."""
    atomic_safe_save(checkpoint_tensors(model, opt, totals), path, meta)


# safetensors dtype names (https://github.com/huggingface/safetensors) of the dtypes a checkpoint holds
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U32": np.uint32,
                      "U8": np.uint8, "BOOL": np.bool_}


def write_safetensors(state: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    """A safetensors file: an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and byte
    range, plus string metadata), then the raw bytes. Each tensor is read back with .numpy(). Not tinygrad's
    safe_save/safe_load: they copy tensor by tensor through a DISK device, several times slower here for the
    default run's checkpoint (`python bench/checkpoint_io.py`: medium, 344 tensors, save 1.69 s against 0.25 s, load
    1.78 s against 0.03 s; bench/results/checkpoint-io.json)."""
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    arrays = {k: v.numpy() for k, v in state.items()}                   # (tobytes below writes C order)
    header, offset = {"__metadata__": metadata}, 0
    for k, a in arrays.items():
        header[k] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                                     # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for a in arrays.values():
            f.write(a.tobytes())
        f.flush()
        os.fsync(f.fileno())


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and the string metadata of a safetensors file; ValueError if it is cut short or malformed."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 + n:
        raise ValueError(f"its header needs {n} bytes, the file has {len(raw) - 8}")
    header = json.loads(raw[8:8 + n])
    metadata, body = header.pop("__metadata__", {}), memoryview(raw)[8 + n:]
    if (end := max((v["data_offsets"][1] for v in header.values()), default=0)) != len(body):
        raise ValueError(f"its header describes {end} bytes of data, the file holds {len(body)}")
    arrays = {k: np.frombuffer(body[v["data_offsets"][0]:v["data_offsets"][1]], SAFETENSORS_DTYPES[v["dtype"]])
              .reshape(v["shape"]) for k, v in header.items()}
    return arrays, metadata


def atomic_safe_save(state: dict[str, Tensor], path: Path, meta: dict) -> None:
    """A safetensors file with JSON metadata, written to a temporary file, flushed and renamed over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_safetensors(state, str(tmp), {k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, path)
    except OSError as e:        # e.g. ENOSPC, a full disk
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({e.strerror}); free disk space or choose another --out. "
                        f"The previous file, if any, is untouched") from None
    except BaseException:       # e.g. a second Ctrl-C: the previous file is untouched; leave no stray temp file
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX), not just the file's bytes
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and the decoded metadata of a checkpoint, or a UserError saying what to do."""
    if path.is_dir() or not path.suffix:
        path = path / CHECKPOINT
    if not path.exists():
        run, model = path.parent, "hvae" if "hvae" in path.parent.name else "vlae"
        command = "python train.py --dataset mnist" + (" --model hvae" if model == "hvae" else "")
        if run != Path(f"out/mnist-{model}"):
            command += f" --out {run}"
        raise UserError(f"no checkpoint in {run}: train one first with `{command}`, or point at a run folder "
                        f"that holds {CHECKPOINT}")
    try:
        state, header = read_safetensors(path)
        meta = {k: json.loads(v) for k, v in header.items()}
        if "config" not in meta:
            raise ValueError("no config in its metadata")
    except Exception as e:  # a truncated or foreign file fails in many ways; all mean the same to the user
        raise UserError(f"{path} is not a readable checkpoint of this project ({type(e).__name__}: {e}); "
                        f"delete it and train again, or point at another run folder") from None
    return state, meta


def load_part(obj, state: dict[str, np.ndarray]) -> None:
    """Set obj's tensors (a model's weights(), or a dict of tensors such as checkpoint_tensors) to the arrays of the
    same names in state; KeyError or ValueError if one is missing or does not fit. Call it before a jit captures them:
    each tensor gets a new buffer."""
    for name, t in (obj if isinstance(obj, dict) else weights(obj)).items():
        a = state[name]
        if a.dtype == np.float16 and t.dtype == dtypes.float32:
            a = a.astype(np.float32)                  # a model stored in float16 (pretrained/) computes in float32
        # (a 0-d array would become a constant, not a buffer that training updates in place: give it one element)
        new = Tensor(a.reshape(-1).copy(), device=t.device).reshape(t.shape) if a.shape == t.shape else None
        if new is None or new.dtype != t.dtype:
            raise ValueError(f"{name} is {a.dtype} {a.shape}, the model's {t.dtype} {t.shape}")
        t.replace(new)


def default_run(run: str | None) -> Path:
    """--run when given; else the default run out/mnist-vlae if it holds a checkpoint, else the pretrained model (saying
    so in one line); with neither, out/mnist-vlae, whose missing checkpoint read_checkpoint explains."""
    if run:
        return Path(run)
    if (OWN_RUN / CHECKPOINT).exists() or not (PRETRAINED / CHECKPOINT).exists():
        return OWN_RUN
    print(f"no checkpoint in {OWN_RUN} (train one with `python train.py --dataset mnist`): using the pretrained model "
          f"in {os.path.relpath(PRETRAINED)}", file=sys.stderr)
    return PRETRAINED


def load_model(path: Path):
    """Rebuild a model from the config stored in a checkpoint and load its weights (for sample.py, evaluate.py)."""
    state, meta = read_checkpoint(path)
    model = build_model(ModelConfig(**meta["config"]))
    load_weights(model, state, path)
    return model, meta


def load_weights(model, state: dict[str, np.ndarray], path: Path, opt=None, totals: Tensor | None = None) -> None:
    """The checkpoint_tensors(model, opt, totals) from a checkpoint's arrays, or a UserError if they do not fit the
    model its config describes (a file edited or copied from another run)."""
    try:
        load_part(checkpoint_tensors(model, opt, totals), state)
    except (KeyError, ValueError) as e:
        raise UserError(f"{path} holds weights that do not fit the {model.cfg.model.upper()} its config describes "
                        f"({type(e).__name__}: {e}); point at another run folder") from None


def export_model(run: Path, out: Path) -> Path:
    """A run's model (weights and BatchNorm statistics, no optimizer state) in float16, with the run's config,
    flags, epoch, metrics and code version: the file shipped in pretrained/ (half the size; sample.py, evaluate.py
    and explore.py load it as float32)."""
    state, meta = read_checkpoint(run)
    model = {k: v.astype(np.float16) if v.dtype == np.float32 else v
             for k, v in state.items() if k.startswith("model.")}
    out.mkdir(parents=True, exist_ok=True)
    keep = {k: meta[k] for k in ("config", "train", "step", "epoch", "metrics", "code") if k in meta}
    atomic_safe_save({k: Tensor(v) for k, v in model.items()}, out / CHECKPOINT, keep | {"exported_from": str(run)})
    return out / CHECKPOINT


if __name__ == "__main__":     # python checkpoint.py RUN OUT: export RUN's model in float16 to OUT (pretrained/)
    print(f"wrote {export_model(Path(sys.argv[1]), Path(sys.argv[2]))}")
