"""How fast tinygrad's kernels multiply matrices in each memory layout that a training step's products come in.

    DEV=CL python bench/matmul_layouts.py                  # the paper network's shapes; --torch adds PyTorch's times
    DEV=CL python bench/matmul_layouts.py --shapes 100x1024x1024 --torch

A layer y = x @ w.T (x: (M, K), w: (N, K)) needs three products per training step: y itself, whose two operands
both run along the summed axis K in memory ("x @ w.T"), and in the backward pass dx = dy @ w and dw = dy.T @ x,
which read w, or dy and x, across the summed axis. Each is timed as autograd writes it and as fast.layers.matmul_nt's
backward writes it (the product of transposed copies, copies included). Median of --reps runs of 10 products each,
after 3 to compile and capture.
"""
from __future__ import annotations
import argparse, sys, time
from pathlib import Path
import numpy as np
from tinygrad import Device, Tensor, TinyJit
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fast.layers import grad_a_nt, grad_b_nt

# (M, K, N) of the paper network's products at batch 100: a 1024-unit dense layer; the second convolution's im2col
# product (100 x 7 x 7 positions, 64 channels x 4 x 4 window, 128 filters); the dense layer on its 6272 features
SHAPES = "100x1024x1024,4900x1024x128,100x6272x1024"


def products(x, w, dy) -> dict:
    """The five products, on tinygrad Tensors or torch tensors (fast.layers' formulas use only what both have)."""
    return {"y = x @ w.T": lambda: x @ w.T,
            "dx = dy @ w (autograd)": lambda: dy @ w,
            "dx = dy @ w (matmul_nt: copy of w.T)": lambda: grad_a_nt(dy, w),
            "dw = dy.T @ x (autograd)": lambda: dy.T @ x,
            "dw = dy.T @ x (matmul_nt: copies of dy.T, x.T)": lambda: grad_b_nt(dy, x)}


def seconds(fn, reps: int, sync) -> float:
    for _ in range(3): fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(10): fn()
        sync()
        times.append((time.perf_counter() - t0) / 10)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES, help="comma-separated MxKxN (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is shown (default: %(default)s)")
    p.add_argument("--torch", action="store_true", help="also time each product in PyTorch (needs torch)")
    args = p.parse_args(argv)
    try:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
        assert all(len(s) == 3 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        p.error(f"--shapes takes sizes like 100x1024x1024 (M x K x N), comma-separated; got {args.shapes!r}")
    if args.torch:
        import torch
    torch_cols = " PyTorch: ms | GFLOP/s |" if args.torch else ""
    print(f"| M x K x N | product | tinygrad {Device.DEFAULT}: ms | GFLOP/s |{torch_cols}")
    print("|---|---|---|---|" + ("---|---|" if args.torch else ""))
    rng = np.random.default_rng(0)
    for M, K, N in shapes:
        arrays = [rng.standard_normal(s, dtype=np.float32) for s in ((M, K), (N, K), (M, N))]
        ours = products(*[Tensor(a).realize() for a in arrays])
        theirs = products(*[torch.from_numpy(a) for a in arrays]) if args.torch else {}
        for name, fn in ours.items():
            jit = TinyJit(lambda fn=fn: fn().realize())
            sec = seconds(jit, args.reps, Device[Device.DEFAULT].synchronize)
            row = f"| {M} x {K} x {N} | {name} | {1e3 * sec:.2f} | {2 * M * K * N / sec / 1e9:.1f} |"
            if args.torch:
                tsec = seconds(theirs[name], args.reps, lambda: None)
                row += f" {1e3 * tsec:.2f} | {2 * M * K * N / tsec / 1e9:.1f} |"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
