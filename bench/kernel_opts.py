"""One matrix product's kernel under tinygrad's code generation choices: its hand-coded heuristics, the kernel
search (BEAM) from the unoptimized kernel, and optimizations given by hand, each timed on its own (GFLOP/s), with
PyTorch's product on 1 and 2 threads next to it (--torch). It shows how fast tinygrad's kernels for the step's
products can get on a device, whatever picks their optimizations (README, Performance).

    python bench/kernel_opts.py 100x1024x1024 --layout nn --opts "THREAD:1:2,UPCAST:0:4,UPCAST:1:16" --torch
    DEV=CL python bench/kernel_opts.py 100x1024x1024 --beam 2      # minutes: every candidate is compiled by pocl

MxKxN: out (M, N) = a (M, K) times b; --layout nt: b is (N, K) and out = a @ b.T (fast.layers.matmul_nt's forward),
nn: b is (K, N), tn: a is stored (K, M). An --opts list is OP:AXIS:AMOUNT items (tinygrad's OptOps: UPCAST,
UNROLL, LOCAL, THREAD, SWAP, ...), applied in order to the kernel's axes (M, N, K).
"""
import argparse, sys, time
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fast.search import plain                                          # a kernel's name without tinygrad's colours


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", help="MxKxN, e.g. 100x1024x1024")
    p.add_argument("--layout", choices=("nt", "nn", "tn"), default="nt")
    p.add_argument("--opts", action="append", default=[], help="OP:AXIS:AMOUNT,... (repeatable)")
    p.add_argument("--beam", type=int, default=0, help="also tinygrad's kernel search with this beam width")
    p.add_argument("--torch", action="store_true", help="PyTorch's product of the same shape, 1 and 2 threads")
    args = p.parse_args()
    try:
        m, k, n = (int(v) for v in args.shape.split("x"))
    except ValueError:
        p.error(f"shape {args.shape!r}: give MxKxN, e.g. 100x1024x1024")
    from tinygrad import Device, Tensor
    from tinygrad.codegen import do_to_program
    from tinygrad.codegen.opt import Opt, OptOps
    from tinygrad.codegen.opt.postrange import args_from_ast
    from tinygrad.codegen.opt.search import _time_program
    from tinygrad.uop.ops import Ops
    a = Tensor.rand(k, m).realize().T if args.layout == "tn" else Tensor.rand(m, k).realize()
    out = a @ (Tensor.rand(n, k).realize().T if args.layout == "nt" else Tensor.rand(k, n).realize())
    ast = [c for c in Tensor.schedule_linear(out).src if c.op is Ops.CALL and c.src[0].op is Ops.SINK][-1].src[0]
    renderer = Device[Device.DEFAULT].renderer
    bufs, var_vals = args_from_ast(ast, Device.DEFAULT)
    bufs = [b.ensure_allocated() for b in bufs]
    flop = 2 * m * n * k
    print(f"{args.shape} layout {args.layout} on {Device.DEFAULT}, {flop / 1e9:.3f} GFLOP")

    def row(label: str, info) -> None:
        t0 = time.perf_counter()
        try:
            prg = do_to_program(ast.replace(arg=info), renderer)
        except Exception as e:                       # an optimization that does not apply to this kernel
            print(f"| {label} | - | {type(e).__name__}: {str(e)[:80]} |")
            return
        built = time.perf_counter() - t0
        best = min(_time_program(prg, var_vals, bufs, allow_test_size=False, cnt=7))
        name = plain(prg.arg.name)
        print(f"| {label} | `{name}` | {1e3 * best:.2f} ms | {flop / best / 1e9:.1f} GFLOP/s | "
              f"built in {built:.1f} s |", flush=True)

    print("| optimizations | kernel | time | GFLOP/s | compile (and search) |\n|---|---|---|---|---|")
    row("tinygrad's heuristics (default)", ast.arg)
    for spec in args.opts:
        opts = []
        for item in spec.split(","):
            op, axis, amount = item.split(":")
            opts.append(Opt(getattr(OptOps, op), int(axis), int(amount)))
        row(f"`{spec}`", replace(ast.arg, opts_to_apply=tuple(opts)))
    if args.beam:
        row(f"kernel search, BEAM={args.beam}", replace(ast.arg, beam=args.beam))
    if args.torch:
        import torch
        ta = torch.rand(k, m).T if args.layout == "tn" else torch.rand(m, k)
        tb = torch.rand(n, k).T if args.layout == "nt" else torch.rand(k, n)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for _ in range(3): ta @ tb
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                ta @ tb
                times.append(time.perf_counter() - t0)
            print(f"| PyTorch {torch.__version__}, {threads} thread{'s' * (threads > 1)} | - | "
                  f"{1e3 * min(times):.2f} ms | {flop / min(times) / 1e9:.1f} GFLOP/s | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
