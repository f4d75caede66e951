"""Where the JIT warm-up goes: the first three training steps of a fresh process (compile, capture, first replay),
timed and profiled with cProfile. Run it twice: the first run fills the caches (tinygrad's CACHEDB and ours beside
it, kernels.load_programs), the second shows the cached warm-up.

    DEV=CPU python bench/warmup_profile.py --size narrow --model vlae           # prints step times and the top calls
    DEV=CPU VLAE_PROGRAM_CACHE=0 python bench/warmup_profile.py                 # without our kernel/schedule cache
"""
from __future__ import annotations
import argparse, cProfile, pstats, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import trainer_for
from kernels import save_programs

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--size", default="narrow")
p.add_argument("--model", default="vlae", choices=["vlae", "hvae"])
p.add_argument("--top", type=int, default=25, help="calls to list, by cumulative time (default %(default)s)")
args = p.parse_args()
t0 = time.perf_counter()
trainer, x, beta, _ = trainer_for(args.size, args.model, batch=100, kernel_search=0)    # as bench.py sets up a step
setup = time.perf_counter() - t0
profile, steps = cProfile.Profile(), []
profile.enable()
for _ in range(3):
    t0 = time.perf_counter()
    trainer.step(x, beta).numpy()
    steps.append(time.perf_counter() - t0)
profile.disable()
save_programs()
print(f"{args.model} {args.size}: caches loaded and trainer built in {setup:.2f} s; steps 1-3 (compile, capture, "
      f"replay) {' / '.join(f'{s:.2f}' for s in steps)} s under cProfile, {sum(steps):.2f} s in all")
pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)
