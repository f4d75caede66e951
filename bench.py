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
import argparse, contextlib, json, os, platform, re, resource, shlex, subprocess, sys, tempfile, time
from pathlib import Path
from math import prod
import numpy as np

ROOT = Path(__file__).resolve().parent


def device_name(device: str) -> str:
    """A human name for the device: the CPU model, or the GPU's."""
    if device in ("CPU", "CLANG", "LLVM"):
        for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
            if line.startswith("model name"): return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} threads"
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} threads"
    if device.split(":")[0] == "CL":
        from tinygrad import Device
        return f"OpenCL: {Device[device].device_name}, {os.cpu_count()} threads"
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


def use_tinygrad_conv() -> None:
    """The --tinygrad-conv lever: tinygrad's own (transposed) convolutions instead of fast/'s matmul forms."""
    from tinygrad import nn
    from fast import layers
    layers.Conv4x4s2.__call__, layers.ConvTranspose4x4s2.__call__ = nn.Conv2d.__call__, nn.ConvTranspose2d.__call__


def trainer_for(size: str, model_name: str, batch: int, kernel_search: int | None):
    """What train.py sets up before its first step (after fast.enable(), unless --plain): the kernel search (if not
    done before for this network), a seeded model and its Trainer; with a fixed random batch. Returns (trainer, x,
    beta, seconds the search took, what it found: fast.search.search_slowest)."""
    from tinygrad import Tensor
    from train import Trainer
    from checkpoint import build_model
    from vlae import ModelConfig
    import fast
    cfg = ModelConfig(model=model_name, size=size)
    t0 = time.perf_counter()
    searched = fast.search_kernels(lambda: Trainer(build_model(cfg), lr=1e-3), cfg, batch, kernel_search)
    search_s = time.perf_counter() - t0
    Tensor.manual_seed(0)
    trainer = Trainer(build_model(cfg), lr=1e-3)
    x = Tensor(np.random.default_rng(0).random((batch, *cfg.image_shape), dtype=np.float32)).realize()
    return trainer, x, Tensor([1.0]).realize(), search_s, searched


def measure(size: str, model_name: str, batch: int, steps: int, reps: int, kernel_search: int | None) -> dict:
    """One configuration, in this process: warm-up, steady-state training, sampling, GFLOP/s and memory."""
    from tinygrad import Tensor, Device, GlobalCounters
    from vlae import n_params
    from arrays import generate_jit
    from fast.search import step_calls
    trainer, x, beta, search_s, searched = trainer_for(size, model_name, batch, kernel_search)
    model, rng = trainer.model, np.random.default_rng(1)
    step = lambda: trainer.step(x, beta)

    t0 = time.perf_counter()
    for _ in range(3): step().numpy()                  # 1: compiles, captures and runs the jit, 2-3: replays
    warmup = time.perf_counter() - t0

    GlobalCounters.reset()
    step().numpy()
    flops = GlobalCounters.global_ops                  # FLOPs of one training step, as tinygrad's kernels count them
    kernels = len(step_calls(trainer.jit))            # (GlobalCounters counts a batch of kernels as one)
    per_step = [timed(step, steps) for _ in range(reps)]
    enqueue = []                 # how long the jitted step takes to hand its kernels to the device, before they ran
    for _ in range(steps):       # (each call starts on an idle device: timed() and every iteration end reading back)
        t0 = time.perf_counter()
        out = step()
        enqueue.append(time.perf_counter() - t0)
        out.numpy()

    eps = [Tensor(rng.standard_normal((batch, d), dtype=np.float32)).realize() for d in model.cfg.latent_dims]
    sample = lambda: generate_jit(model)(*eps)
    for _ in range(3): sample().numpy()
    per_sample = [timed(sample, steps) for _ in range(reps)]
    med = float(np.median(per_step))
    return {"size": size, "model": model_name, "framework": "tinygrad", "device": Device.DEFAULT,
            "device_name": device_name(Device.DEFAULT), "batch": batch, "params": n_params(model),
            "warmup_s": round(warmup, 1), "search_s": round(search_s, 1),
            "searched": [{"kernel": k, "ms_before": round(a, 2), "ms_after": round(b, 2), "kept": kept}
                         for k, a, b, kept in searched], "ms_per_step": round(1e3 * med, 1),
            "ms_per_step_min": round(1e3 * min(per_step), 1), "ms_per_step_max": round(1e3 * max(per_step), 1),
            "ms_to_enqueue_step": round(1e3 * float(np.median(enqueue)), 1),
            "images_per_s": round(batch / med, 1), "gflops": round(flops / med / 1e9, 1),
            "gflop_per_step": round(flops / 1e9, 2), "kernels_per_step": kernels,
            "sample_images_per_s": round(batch / float(np.median(per_sample)), 1),
            "device_mem_mb": round(GlobalCounters.mem_used / 2 ** 20),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def kernel_kind(name: str, out_shape: tuple, flops: float, nbytes: float) -> str:
    """A rough label for a kernel from what it computes: reductions (r_) that do many FLOPs per byte are the
    convolutions and matrix products; a small reduction output is a weight gradient or a norm statistic."""
    if not name.startswith("r_"): return "elementwise"
    if flops / max(nbytes, 1) >= 2: return "conv/matmul" if prod(out_shape) > 4096 else "weight grad"
    return "reduce"


def profile_step(size: str, model_name: str, batch: int, reps: int, top: int, kernel_search: int | None) -> dict:
    """Every kernel of one training step, timed alone (fast.search.kernel_times): the step the jit captured
    (train.Trainer's, as in train.py, after the same kernel search) is replayed one kernel at a time, waiting for
    each, `reps` times; each kernel's best time is kept. FLOPs and bytes are tinygrad's own estimates for the kernel
    (what DEBUG=2 prints)."""
    from tinygrad import Device
    from tinygrad.engine.realize import estimate_uop, get_call_arg_uops, get_call_outs_ins
    from fast.search import kernel_times, plain
    trainer, x, beta, _, _ = trainer_for(size, model_name, batch, kernel_search)
    step = lambda: trainer.step(x, beta)
    for _ in range(3): step().numpy()
    step_s = min(timed(step, 5) for _ in range(reps))
    kernels = []
    for sec, call in kernel_times(trainer.jit, (x, beta), reps):
        est, name, outs = estimate_uop(call), plain(call.src[0].arg.name), get_call_outs_ins(call)[0]
        out = tuple(get_call_arg_uops(call)[outs[0]].shape) if outs else ()
        kernels.append({"kernel": name, "ms": 1e3 * sec, "gflops": float(est.ops) / sec / 1e9 if sec else 0.0,
                        "gbs": float(est.mem) / sec / 1e9 if sec else 0.0, "out_shape": list(out),
                        "kind": kernel_kind(name, out, float(est.ops), float(est.mem))})
    total = sum(k["ms"] for k in kernels)
    for k in kernels: k["share"] = k["ms"] / total
    by_kind = {}
    for k in kernels:
        agg = by_kind.setdefault(k["kind"], {"kernels": 0, "ms": 0.0})
        agg["kernels"], agg["ms"] = agg["kernels"] + 1, agg["ms"] + k["ms"]
    small = [k for k in kernels if k["ms"] < 0.05]
    return {"size": size, "model": model_name, "framework": "tinygrad", "device": Device.DEFAULT,
            "batch": batch, "step_ms": 1e3 * step_s, "kernels_ms": total, "n_kernels": len(kernels),
            "small_kernels": len(small), "small_kernels_ms": sum(k["ms"] for k in small),
            "by_kind": by_kind, "top": sorted(kernels, key=lambda k: -k["ms"])[:top]}


def serve(size: str, model_name: str, batch: int, kernel_search: int | None) -> None:
    """bench.py --paired, in the measuring process: the training step set up and warmed up once; then for each line
    n read from stdin, n steps timed (timed()), and a line with the seconds per step. Ends at the end of its input."""
    trainer, x, beta, _, _ = trainer_for(size, model_name, batch, kernel_search)
    step = lambda: trainer.step(x, beta)
    for _ in range(3): step().numpy()
    from tinygrad import Device
    print(json.dumps({"device": Device.DEFAULT, "device_name": device_name(Device.DEFAULT)}), flush=True)
    for line in sys.stdin:
        print(timed(step, int(line)), flush=True)


class ChildFailed(Exception): pass


def child(argv: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench.py"), *argv], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        settings = " ".join(f"{k}={v}" for k, v in env.items()
                            if os.environ.get(k) != v and k not in ("CACHEDB", "POCL_CACHE_DIR"))
        raise ChildFailed(f"measuring {' '.join(argv[1:])} {settings} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def search_flag(args) -> list[str]:
    """--kernel-search for a measuring process: as given, else none (train.py's default for its device)."""
    return [] if args.kernel_search is None else ["--kernel-search", str(args.kernel_search)]


def parse_variant(spec: str) -> tuple[dict, list[str]]:
    """A --variant: KEY=VALUE words are environment settings for tinygrad (DEV=CL, BEAM=2, ...), the rest are flags
    for the measuring process (--batch 200, --tinygrad-conv, --plain)."""
    env, argv = {}, []
    for w in shlex.split(spec):
        if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w): env.update([w.split("=", 1)])
        else: argv.append(w)
    return env, argv


def bench_config(size: str, model: str, args, variant: str, tmp: str) -> tuple[dict, callable]:
    """Cold and cached warm-up in two processes sharing a fresh cache (in the folder tmp); the steady state from the
    second. Returns the row and a function that times the steady state again, in a new process (for --rounds)."""
    extra_env, extra_argv = parse_variant(variant)
    common = ["--child", "--size", size, "--model", model, "--batch", str(args.batch), "--steps", str(args.steps),
              "--reps", str(args.reps), *search_flag(args)]
    # tinygrad's cache and ours beside it, and pocl's own kernel cache (DEV=CL on a CPU): all empty at first
    env = os.environ | extra_env | {"CACHEDB": str(Path(tmp) / "cache.db"), "POCL_CACHE_DIR": str(Path(tmp) / "pocl")}
    cold = child(common + ["--steps", "1", "--reps", "1"] + extra_argv, env)
    warm = child(common + extra_argv, env)
    warm["warmup_cold_s"], warm["warmup_cached_s"] = cold["warmup_s"], warm.pop("warmup_s")
    warm["search_s"], warm["searched"] = cold["search_s"], cold["searched"]    # the second finds the search done
    warm["variant"] = variant
    return warm, lambda: child(common + extra_argv, env)


def torch_mirror(argv: list[str]) -> dict:
    """The JSON line bench/torch_mirror.py prints for these flags (the same network and step in PyTorch)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "torch_mirror.py"), *argv], capture_output=True,
                         text=True)
    if out.returncode != 0: raise RuntimeError(f"torch mirror failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def torch_row(size: str, model: str, args) -> dict:
    """The same network and step timed in PyTorch, on the same cores."""
    return torch_mirror(["--model", model, "--size", size, "--batch", str(args.batch), "--steps", str(args.steps),
                         "--reps", str(args.reps)]) | {"size": size, "model": model, "variant": ""}


def table(rows: list[dict]) -> str:
    head = ["size", "model", "framework", "settings", "train img/s", "vs PyTorch", "ms/step (min-max)", "GFLOP/s",
            "warm-up cold / cached s", "kernel search s", "sample img/s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        spread = f"{r['ms_per_step']:.1f} ({r['ms_per_step_min']:.1f}-{r['ms_per_step_max']:.1f})"
        warm = f"{r['warmup_cold_s']:.1f} / {r['warmup_cached_s']:.1f}" if "warmup_cold_s" in r else "-"
        settings = r.get("variant") or (f"{r['threads']} threads" if "threads" in r else f"DEV={r['device']}")
        ratio = f"{r['vs_torch']:.2f}x" if "vs_torch" in r else ("1x" if r["framework"].startswith("torch") else "-")
        if len(r.get("vs_torch_rounds", [])) > 1:                 # the median over rounds, and its spread
            ratio += f" ({min(r['vs_torch_rounds']):.2f}-{max(r['vs_torch_rounds']):.2f})"
        lines.append(f"| {r['size']} | {r['model']} | {r['framework']} | {settings} | {r['images_per_s']:.1f} | "
                     f"{ratio} | {spread} | "
                     f"{r.get('gflops', '-')} | {warm} | {r.get('search_s', '-')} | {r['sample_images_per_s']:.0f} | "
                     f"{r.get('peak_rss_mb', '-')} |")
    return "\n".join(lines)


class Server:
    """A measuring process of --paired (serve() here, or torch_mirror.py's): started once, asked for n timed steps
    at a time; it waits, idle, on its input in between."""
    def __init__(self, argv: list[str], env: dict, what: str):
        self.what = what
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.info = json.loads(self.read())

    def read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            last = (self.proc.stderr.read().strip().splitlines() or ["no output"])[-1]
            raise ChildFailed(f"measuring {self.what} failed: {last}")
        return line

    def steps(self, n: int) -> float:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return float(self.read())

    def __enter__(self): return self

    def __exit__(self, *exc) -> None:                       # end of input: it exits
        self.proc.stdin.close()
        self.proc.wait()


def paired_main(sizes: list[str], models: list[str], args) -> int:
    """bench.py --paired N: tinygrad and PyTorch, each in one long-lived process, timed in turn N times (--steps
    steps each, the order alternating), so that the machine's drift, which moves PyTorch's step by up to 80 % over
    minutes here (README, Performance), falls on both sides of each ratio. Reports each side's median step and the
    median and quartiles of the N ratios (kernel caches of earlier runs are used; the warm-up is not timed)."""
    rows = []
    for size in sizes:
        for model in models:
            for variant in args.variant or [""]:
                settings, extra = parse_variant(variant)
                env = os.environ | settings
                print(f"pairing {model} {size} {variant} with PyTorch ...", file=sys.stderr, flush=True)
                common = ["--size", size, "--model", model, "--batch", str(args.batch)]
                t_ours, t_theirs = [], []
                with Server([sys.executable, str(ROOT / "bench.py"), "--child", "--serve", *common,
                             *search_flag(args), *extra], env, f"{model} {size} {variant}") as ours, \
                        Server([sys.executable, str(ROOT / "bench" / "torch_mirror.py"), "--serve", *common],
                               os.environ.copy(), f"{model} {size} in PyTorch") as theirs:
                    pair = ((ours, t_ours), (theirs, t_theirs))
                    for i in range(args.paired):                # the order alternates
                        for srv, times in pair if i % 2 == 0 else reversed(pair):
                            times.append(srv.steps(args.steps))
                ratios = np.array(t_theirs) / np.array(t_ours)           # our speed as a share of PyTorch's
                rows.append({"size": size, "model": model, "variant": variant, "device": ours.info["device"],
                             "device_name": ours.info["device_name"], "torch": theirs.info, "pairs": args.paired,
                             "steps": args.steps, "ms_per_step": round(1e3 * float(np.median(t_ours)), 1),
                             "torch_ms_per_step": round(1e3 * float(np.median(t_theirs)), 1),
                             "vs_torch": round(float(np.median(ratios)), 3),
                             "vs_torch_quartiles": [round(float(q), 3) for q in np.percentile(ratios, [25, 75])],
                             "vs_torch_pairs": [round(float(r), 3) for r in ratios],
                             "ms_pairs": [[round(1e3 * a, 1), round(1e3 * b, 1)] for a, b in zip(t_ours, t_theirs)]})
                print(paired_table(rows[-1:]), file=sys.stderr)
    print(f"{time.strftime('%Y-%m-%d')}, {rows[0]['device_name']}, batch {args.batch}, {args.paired} pairs of "
          f"{args.steps} steps, tinygrad and PyTorch in turn")
    print(paired_table(rows))
    if args.json: Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def paired_table(rows: list[dict]) -> str:
    lines = ["| size | model | settings | tinygrad ms/step | PyTorch ms/step | vs PyTorch, median (quartiles) | "
             "pairs below 0.5x |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        q1, q3 = r["vs_torch_quartiles"]
        below = sum(x < 0.5 for x in r["vs_torch_pairs"])
        lines.append(f"| {r['size']} | {r['model']} | {r['variant'] or 'DEV=' + r['device']} | {r['ms_per_step']} | "
                     f"{r['torch_ms_per_step']} | {r['vs_torch']:.2f}x ({q1:.2f}-{q3:.2f}) | {below} of {r['pairs']} |")
    return "\n".join(lines)


def profile_main(sizes: list[str], models: list[str], args) -> int:
    """bench.py --profile: one child process per configuration (the kernel cache of earlier runs is used)."""
    profiles = []
    for size in sizes:
        for model in models:
            print(f"profiling {model} {size} ...", file=sys.stderr, flush=True)
            prof = child(["--child", "--profile", str(args.profile), "--size", size, "--model", model,
                          "--batch", str(args.batch), "--reps", str(args.reps), *search_flag(args)], dict(os.environ))
            if args.torch:
                prof["torch"] = torch_mirror(["--model", model, "--size", size, "--batch", str(args.batch),
                                              "--profile", str(args.profile)])
            print(profile_table(prof, prof.get("torch")) + "\n")
            profiles.append(prof)
    if args.json: Path(args.json).write_text(json.dumps(profiles, indent=1) + "\n")
    return 0


def profile_table(prof: dict, torch_prof: dict | None) -> str:
    """The profile as markdown: the step's time split by kind of kernel, the top kernels, PyTorch's top operators."""
    lines = [f"{prof['model']} {prof['size']}, batch {prof['batch']}, {prof['device']}: step {prof['step_ms']:.1f} ms "
             f"replayed by the jit; its {prof['n_kernels']} kernels timed one by one sum to "
             f"{prof['kernels_ms']:.1f} ms "
             f"({prof['small_kernels']} of them under 0.05 ms: {prof['small_kernels_ms']:.1f} ms)", "",
             "| kind | kernels | ms | share |", "|---|---|---|---|"]
    for kind, agg in sorted(prof["by_kind"].items(), key=lambda kv: -kv[1]["ms"]):
        lines.append(f"| {kind} | {agg['kernels']} | {agg['ms']:.1f} | {agg['ms'] / prof['kernels_ms']:.0%} |")
    lines += ["", "| kernel | kind | output elements | ms | share | GFLOP/s | GB/s |", "|---|---|---|---|---|---|---|"]
    for k in prof["top"]:
        lines.append(f"| `{k['kernel']}` | {k['kind']} | {'x'.join(map(str, k['out_shape']))} | {k['ms']:.2f} | "
                     f"{k['share']:.1%} | {k['gflops']:.1f} | {k['gbs']:.1f} |")
    if torch_prof:
        lines += ["", f"PyTorch ({torch_prof['framework']}, {torch_prof['threads']} threads): step "
                  f"{torch_prof['ms_per_step']:.1f} ms; operators by self time per step", "",
                  "| operator | calls | ms | share |", "|---|---|---|---|"]
        for o in torch_prof["ops"]:
            lines.append(f"| `{o['op']}` | {o['calls_per_step']:g} | {o['ms_per_step']:.2f} | {o['share']:.1%} |")
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
    p.add_argument("--rounds", type=int, default=1,
                   help="time each configuration (every variant, and PyTorch) this many times in turn, in new "
                        "processes, and report the median of each and of the ratios within a round: the same "
                        "computation drifts by 20-30 %% over minutes on a shared machine")
    p.add_argument("--paired", type=int, default=0, metavar="N",
                   help="instead of the speed table: tinygrad and the PyTorch mirror (needs torch), each in one "
                        "long-lived process, timed in turn N times, --steps steps each; the median and quartiles "
                        "of the N ratios")
    p.add_argument("--variant", action="append", default=None, metavar="SETTINGS",
                   help="time each configuration under each of these settings (repeatable): tinygrad environment "
                        "variables and measuring flags, e.g. --variant DEV=CPU --variant DEV=CL --variant "
                        "'DEV=CL --tinygrad-conv' --variant 'DEV=CL --batch 200' (default: one run as the "
                        "environment is)")
    p.add_argument("--kernel-search", type=int, default=None, metavar="N",
                   help="as train.py: kernel search on the N slowest kernels of the step before timing it (0: off; "
                        "default: train.py's)")
    p.add_argument("--tinygrad-conv", action="store_true",
                   help="measure with tinygrad's own convolutions in place of fast/'s matmul forms")
    p.add_argument("--plain", action="store_true", help="measure without the fast/ package (as train.py --plain)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="instead of the speed table: time each kernel of one training step and list the N slowest "
                        "(with --torch, also PyTorch's N slowest operators)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag in ("batch", "steps", "reps", "rounds", "profile", "kernel_search", "paired"):
        least = 0 if flag in ("profile", "kernel_search", "paired") else 1
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            print(f"error: --{flag.replace('_', '-')} must be >= {least} (got {getattr(args, flag)})", file=sys.stderr)
            return 2
    from vlae import SIZES
    from checkpoint import MODELS
    sizes, models = (args.size or "narrow,paper").split(","), args.model.split(",")
    for name, given, known in (("--size", sizes, SIZES), ("--model", models, MODELS)):
        if bad := [g for g in given if g not in known]:
            print(f"error: {name} {','.join(bad)}: choose from {', '.join(known)}", file=sys.stderr)
            return 2
    if args.child:
        if not args.plain:
            import fast
            fast.enable()
        if args.tinygrad_conv: use_tinygrad_conv()
        if args.serve:
            serve(args.size, args.model, args.batch, args.kernel_search)
        elif args.profile:
            print(json.dumps(profile_step(args.size, args.model, args.batch, args.reps, args.profile,
                                          args.kernel_search)))
        else: print(json.dumps(measure(args.size, args.model, args.batch, args.steps, args.reps, args.kernel_search)))
        return 0
    if args.torch or args.paired:
        try: import torch  # noqa: F401
        except ImportError:
            print(f"error: {'--paired' if args.paired else '--torch'} needs PyTorch (pip install torch); it is not a "
                  "requirement of this project",
                  file=sys.stderr)
            return 2
    try:
        if args.paired: return paired_main(sizes, models, args)
        return profile_main(sizes, models, args) if args.profile else speed_main(sizes, models, args)
    except ChildFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def speed_main(sizes: list[str], models: list[str], args) -> int:
    """bench.py's speed table: each configuration and variant in fresh processes, PyTorch beside them (--torch)."""
    rows = []
    for size in sizes:
        for model in models:
            with contextlib.ExitStack() as stack:
                config, again = [], []
                for variant in args.variant or [""]:
                    print(f"timing {model} {size} {variant} ...", file=sys.stderr, flush=True)
                    tmp = stack.enter_context(tempfile.TemporaryDirectory())
                    row, rerun = bench_config(size, model, args, variant, tmp)
                    config.append(row)
                    again.append(rerun)
                    print(table(config[-1:]), file=sys.stderr)
                if args.torch:
                    config.append(torch_row(size, model, args))
                    again.append(lambda: torch_row(size, model, args))
                    print(table(config[-1:]), file=sys.stderr)
                rounds = [[r["images_per_s"] for r in config]]
                for k in range(1, args.rounds):         # each configuration again, in turn (this machine drifts)
                    print(f"round {k + 1} of {args.rounds}: {model} {size} ...", file=sys.stderr, flush=True)
                    rounds.append([measure_again()["images_per_s"] for measure_again in again])
            per_round = np.array(rounds)                                   # (rounds, configurations)
            for i, r in enumerate(config):
                if args.rounds > 1:                                        # img/s and ms/step: over the rounds
                    r["images_per_s_rounds"] = per_round[:, i].tolist()
                    r["images_per_s"] = round(float(np.median(per_round[:, i])), 1)
                    ms = 1e3 * args.batch / per_round[:, i]
                    r["ms_per_step"], r["ms_per_step_min"], r["ms_per_step_max"] = (
                        round(float(f(ms)), 1) for f in (np.median, np.min, np.max))
                if args.torch and i < len(config) - 1:                     # the ratio within each round
                    ratios = per_round[:, i] / per_round[:, -1]
                    r["vs_torch"] = float(np.median(ratios))
                    r["vs_torch_rounds"] = [round(float(x), 3) for x in ratios]
            rows.extend(config)
    rounds = f", then of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"{time.strftime('%Y-%m-%d')}, {rows[0]['device_name']}, batch {args.batch}, "
          f"median of {args.reps} x {args.steps} steps{rounds}")
    print(table(rows))
    for r in rows:
        if r.get("searched"):                              # fast.search.search_slowest's report, per step
            print(f"\nkernel search, {r['size']} {r['model']} {r['variant']}: " + "; ".join(
                f"`{k['kernel']}` {k['ms_before']:.1f} -> {k['ms_after']:.1f} ms "
                f"({'kept' if k['kept'] else 'not kept'})"
                for k in r["searched"]))
    if args.json: Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
