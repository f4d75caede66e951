"""Where the JIT warm-up goes: the set-up and first three training steps of a fresh process (the first compiles and
captures the jit, then two replays), timed and profiled with cProfile, or (--phases) timed by phase without the
profiler. Run it twice: the first run fills the caches (tinygrad's CACHEDB and ours beside it,
fast.cache), the second shows the cached warm-up.

    DEV=CPU python bench/warmup_profile.py --size narrow --model vlae           # prints step times and the top calls
    DEV=CPU VLAE_PROGRAM_CACHE=0 python bench/warmup_profile.py                 # without our kernel/schedule cache
    CACHEDB=/tmp/w/cache.db POCL_CACHE_DIR=/tmp/w/pocl DEV=CL python bench/warmup_profile.py --phases   # cold, by phase

--phases splits the time into tinygrad's lower_and_compile (lowering kernels in its worker processes, and there
compiling them too on the CPU backend or with fast.cl.build_ahead), OpenCL builds in this process (CLCompiler.compile,
where tinygrad builds OpenCL programs; none with build_ahead) and the rest (scheduling, capture, running).
"""
from __future__ import annotations
import argparse, cProfile, pstats, sys, time
from collections import defaultdict
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tinygrad.engine.realize as realize
import tinygrad.runtime.ops_cl as ops_cl
from bench import trainer_for
import fast
from fast.cache import save_programs

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--size", default="narrow")
p.add_argument("--model", default="vlae", choices=["vlae", "hvae"])
p.add_argument("--top", type=int, default=25, help="calls to list, by cumulative time (default %(default)s)")
p.add_argument("--phases", action="store_true", help="time the phases (no cProfile) instead of profiling")
args = p.parse_args()

phases, calls = defaultdict(float), defaultdict(int)


def timed(fn, phase):
    def run(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            phases[phase] += time.perf_counter() - t0
            calls[phase] += 1
    return run


if args.phases:     # compile_linear looks both up when called, so wrapping the module attributes reaches them
    realize.lower_and_compile = timed(realize.lower_and_compile, "lower_and_compile (tinygrad's workers)")
    ops_cl.CLCompiler.compile = timed(ops_cl.CLCompiler.compile, "OpenCL builds in this process")
t0 = time.perf_counter()
fast.enable()
trainer, x, beta, *_ = trainer_for(args.size, args.model, batch=100, kernel_search=0)   # as bench.py sets up a step
setup = time.perf_counter() - t0
profile, steps = cProfile.Profile(), []
if not args.phases:
    profile.enable()
for _ in range(3):
    t0 = time.perf_counter()
    trainer.step(x, beta).numpy()
    steps.append(time.perf_counter() - t0)
profile.disable()
save_programs()
total = setup + sum(steps)
print(f"{args.model} {args.size}: caches loaded and trainer built in {setup:.2f} s; steps 1-3 (compile and capture, "
      f"replay, replay) {' / '.join(f'{s:.2f}' for s in steps)} s{'' if args.phases else ' under cProfile'}, "
      f"{total:.2f} s in all")
if args.phases:
    for phase in phases:
        print(f"  {phase}: {phases[phase]:.1f} s ({calls[phase]} calls)")
    print(f"  the rest: {total - sum(phases.values()):.1f} s")
else:
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)
