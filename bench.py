"""Speed of the VLAE and HVAE in tinygrad: training and sampling throughput, JIT warm-up, GFLOP/s, memory.

    python bench.py                                   # narrow and paper sizes, both models, default device
    python bench.py --size narrow --model vlae        # one configuration
    python bench.py --torch                           # also the PyTorch mirror (bench/torch_mirror.py; needs torch)
    DEV=CUDA python bench.py --size paper             # on a GPU (tinygrad's DEV, BEAM, ... apply as usual)

Each configuration runs in two fresh processes that share a new, empty tinygrad cache: the first measures JIT
warm-up cold (every kernel compiled), the second warm-up with the cache filled, then the steady state. Inputs are a
fixed random batch (seed 0); the steady state is `--reps` repetitions of `--steps` steps after warm-up, reported as
the median with the min-max spread. The train step is train.Trainer's, exactly what `python train.py` runs.
"""
from __future__ import annotations
import argparse, json, os, platform, resource, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parent


def device_name(device: str) -> str:
    """A human name for the device: the CPU model, or the GPU's."""
    if device in ("CPU", "CLANG", "LLVM"):
        for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
            if line.startswith("model name"): return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} threads"
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} threads"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().splitlines()
        if out: return out[0]
    except (OSError, subprocess.TimeoutExpired): pass
    return device


def timed(fn, n: int) -> float:
    """Seconds per call of fn over n calls; fn returns a Tensor that is synced (read back) once at the end."""
    t0 = time.perf_counter()
    for _ in range(n): out = fn()
    out.numpy()
    return (time.perf_counter() - t0) / n


def measure(size: str, model_name: str, batch: int, steps: int, reps: int) -> dict:
    """One configuration, in this process: warm-up, steady-state training, sampling, GFLOP/s and memory."""
    from tinygrad import Tensor, Device, GlobalCounters
    from train import Trainer, build_model
    from vlae import ModelConfig, load_programs, n_params
    load_programs()                                    # what train.py does: kernels kept by an earlier run, if any
    Tensor.manual_seed(0)
    model = build_model(ModelConfig(model=model_name, size=size))
    trainer = Trainer(model, lr=1e-3)
    rng = np.random.default_rng(0)
    x = Tensor(rng.random((batch, 1, 28, 28), dtype=np.float32)).realize()
    beta = Tensor([1.0]).realize()
    step = lambda: trainer.step(x, beta)

    t0 = time.perf_counter()
    for _ in range(3): step().numpy()                  # 1: runs and compiles, 2: captures the jit, 3: first replay
    warmup = time.perf_counter() - t0

    GlobalCounters.reset()
    step().numpy()
    flops = GlobalCounters.global_ops                  # FLOPs of one training step, as tinygrad's kernels count them
    kernels = GlobalCounters.kernel_count
    per_step = [timed(step, steps) for _ in range(reps)]

    eps = [Tensor(rng.standard_normal((batch, d), dtype=np.float32)).realize() for d in model.cfg.latent_dims]
    sample = lambda: model.generate_jit(eps)
    for _ in range(3): sample().numpy()
    per_sample = [timed(sample, steps) for _ in range(reps)]
    med = float(np.median(per_step))
    return {"size": size, "model": model_name, "framework": "tinygrad", "device": Device.DEFAULT,
            "device_name": device_name(Device.DEFAULT), "batch": batch, "params": n_params(model),
            "warmup_s": round(warmup, 1), "ms_per_step": round(1e3 * med, 1),
            "ms_per_step_min": round(1e3 * min(per_step), 1), "ms_per_step_max": round(1e3 * max(per_step), 1),
            "images_per_s": round(batch / med, 1), "gflops": round(flops / med / 1e9, 1),
            "gflop_per_step": round(flops / 1e9, 2), "kernels_per_step": kernels,
            "sample_images_per_s": round(batch / float(np.median(per_sample)), 1),
            "device_mem_mb": round(GlobalCounters.mem_used / 2 ** 20),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def child(argv: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench.py"), *argv], env=env, capture_output=True, text=True)
    if out.returncode != 0: raise RuntimeError(f"bench child {argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_config(size: str, model: str, args) -> list[dict]:
    """Cold and cached warm-up in two processes sharing a fresh cache; the steady state from the second."""
    common = ["--child", "--size", size, "--model", model, "--batch", str(args.batch), "--steps", str(args.steps),
              "--reps", str(args.reps)]
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"CACHEDB": str(Path(tmp) / "cache.db")}
        cold = child(common + ["--steps", "1", "--reps", "1"], env)
        warm = child(common, env)
    warm["warmup_cold_s"], warm["warmup_cached_s"] = cold["warmup_s"], warm.pop("warmup_s")
    rows = [warm]
    if args.torch:
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "torch_mirror.py"), "--model", model, "--size", size,
                              "--batch", str(args.batch), "--steps", str(args.steps), "--reps", str(args.reps)],
                             capture_output=True, text=True)
        if out.returncode != 0: raise RuntimeError(f"torch mirror failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]) | {"size": size, "model": model})
    return rows


def table(rows: list[dict]) -> str:
    head = ["size", "model", "framework", "train img/s", "ms/step (min-max)", "GFLOP/s", "warm-up cold / cached s",
            "sample img/s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        spread = f"{r['ms_per_step']:.1f} ({r['ms_per_step_min']:.1f}-{r['ms_per_step_max']:.1f})"
        warm = f"{r['warmup_cold_s']:.1f} / {r['warmup_cached_s']:.1f}" if "warmup_cold_s" in r else "-"
        lines.append(f"| {r['size']} | {r['model']} | {r['framework']} | {r['images_per_s']:.1f} | {spread} | "
                     f"{r.get('gflops', '-')} | {warm} | {r['sample_images_per_s']:.0f} | "
                     f"{r.get('peak_rss_mb', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Training and sampling speed of the VLAE and HVAE.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default=None, help="size preset(s), comma-separated (default: narrow,paper)")
    p.add_argument("--model", default="vlae,hvae", help="model(s), comma-separated")
    p.add_argument("--batch", type=int, default=100, help="images per step (the authors used 100)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the table shows the median and the spread")
    p.add_argument("--torch", action="store_true", help="also time the PyTorch mirror in bench/torch_mirror.py")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag in ("batch", "steps", "reps"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag} must be >= 1 (got {getattr(args, flag)})", file=sys.stderr)
            return 2
    from vlae import SIZES
    from train import MODELS
    sizes, models = (args.size or "narrow,paper").split(","), args.model.split(",")
    for name, given, known in (("--size", sizes, SIZES), ("--model", models, MODELS)):
        if bad := [g for g in given if g not in known]:
            print(f"error: {name} {','.join(bad)}: choose from {', '.join(known)}", file=sys.stderr)
            return 2
    if args.child:
        print(json.dumps(measure(args.size, args.model, args.batch, args.steps, args.reps)))
        return 0
    if args.torch:
        try: import torch  # noqa: F401
        except ImportError:
            print("error: --torch needs PyTorch (pip install torch); it is not a requirement of this project",
                  file=sys.stderr)
            return 2
    rows = []
    for size in sizes:
        for model in models:
            print(f"timing {model} {size} ...", file=sys.stderr, flush=True)
            rows += bench_config(size, model, args)
            print(table(rows[-1 - args.torch:]), file=sys.stderr)
    print(f"{time.strftime('%Y-%m-%d')}, {rows[0]['device']} ({rows[0]['device_name']}), batch {args.batch}, "
          f"median of {args.reps} x {args.steps} steps")
    print(table(rows))
    if args.json: Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
