"""Checkpoint save and load time: checkpoint.py's own safetensors writer and reader against tinygrad's
nn.state.safe_save / safe_load, on the state train.py saves (model weights, BatchNorm statistics, Adam moments).

    python bench/checkpoint_io.py --size medium,paper --reps 3 --json bench/results/checkpoint-io.json

Why checkpoint.py keeps its own: this is the measurement quoted in checkpoint.write_safetensors and the README.
"""
from __future__ import annotations
import argparse, json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tinygrad import Device, Tensor, nn
from tinygrad.nn.state import safe_load, safe_save
from vlae import VLAE, ModelConfig, weights
from checkpoint import optimizer_state, read_safetensors, write_safetensors


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="medium,paper", help="size presets, comma-separated (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the best time is kept (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.safetensors")
        for size in args.size.split(","):
            model = VLAE(ModelConfig(size=size))
            opt = nn.optim.Adam(list(weights(model).values()), lr=1e-3)
            state = {f"model.{k}": v for k, v in weights(model).items()}
            state |= {f"optim.{k}": v for k, v in optimizer_state(opt).items()}
            Tensor.realize(*state.values())
            row = {"size": size, "device": Device.DEFAULT, "tensors": len(state),
                   "megabytes": round(sum(t.nbytes() for t in state.values()) / 1e6, 1),
                   "ours_save_s": best_of(lambda: write_safetensors(state, path, {"k": "v"}), args.reps),
                   "ours_load_s": best_of(lambda: read_safetensors(path), args.reps),
                   "tinygrad_save_s": best_of(lambda: safe_save(state, path, {"k": "v"}), args.reps),
                   "tinygrad_load_s": best_of(lambda: {k: t.numpy() for k, t in safe_load(path).items()}, args.reps)}
            rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
