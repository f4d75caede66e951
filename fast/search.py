"""Per-kernel times of a captured jit, and tinygrad's kernel search (BEAM) on the slowest kernels of a training
step, kept in the program cache (fast.cache) so later runs search nothing."""
from __future__ import annotations
import json, re, sys, time
from dataclasses import replace
import numpy as np
import tinygrad.codegen
from tinygrad import Context, Device, Tensor, TinyJit
from tinygrad.codegen import do_to_program, to_program_key
from tinygrad.engine.realize import ExecContext, pm_exec
from tinygrad.helpers import NOOPT
from tinygrad.uop.ops import Ops, UOp
from fast.cache import _saved, save_programs


def step_calls(tjit: TinyJit) -> list[UOp]:
    """The calls a captured jit makes, in order, with each batch of a graph (CLGraph, or a GPU backend's) opened
    into its kernels: call.src[0] is the program, the rest its arguments (the jit's inputs as PARAMs)."""
    calls = []
    for call in tjit.captured.linear.src:
        graphed = call.src[0].op is Ops.CUSTOM_FUNCTION and call.src[0].arg == "graph"
        calls.extend(call.src[0].src[0].src if graphed else (call,))
    return calls


def plain(name: str) -> str:
    """A kernel's name without the terminal colours tinygrad gives it."""
    return re.sub(r"\x1b\[[0-9;]*m", "", name)


def kernel_times(tjit: TinyJit, inputs: tuple[Tensor, ...], reps: int = 2) -> list[tuple[float, UOp]]:
    """(seconds, call) for every kernel a captured jit runs, in order (call.src[0] is the compiled program, the rest
    its buffers): the kernels are replayed one at a time, each waited for, `reps` times, keeping each kernel's best
    time. `inputs` are the jit's Tensor arguments, in order. Replaying runs the step, so whatever the jit updates
    (weights, optimizer state) is updated again."""
    calls = step_calls(tjit)
    ctx = ExecContext({}, tuple(t.uop for t in inputs), update_stats=False, jit=True, wait=True)
    best = [float("inf")] * len(calls)
    for _ in range(reps):
        for i, call in enumerate(calls):
            best[i] = min(best[i], sum(et for et in pm_exec.rewrite(call, ctx) if et is not None))
    return list(zip(best, calls))


def step_program_times(make_trainer, x: Tensor, beta: Tensor) -> dict[int, list]:
    """{id(program): [seconds per step, calls per step, program]} for the kernels of a fresh trainer's training step
    (make_trainer()), after three steps (the first compiles and captures, then replays), each kernel timed as
    kernel_times does; its weights are updated."""
    trainer = make_trainer()
    for _ in range(3):
        trainer.step(x, beta).numpy()
    per_program: dict[int, list] = {}
    for sec, call in kernel_times(trainer.jit, (x, beta)):
        entry = per_program.setdefault(id(call.src[0]), [0.0, 0, call.src[0]])
        entry[0] += sec
        entry[1] += 1
    return per_program


def keep_faster(found: list, after: dict) -> list:
    """For each searched kernel (cache key, default program, searched program, ms per step before, calls per step),
    given the step timed again with the searched programs (step_program_times), put the default program back in
    tinygrad's kernel cache where the searched one was not faster. Returns (name, ms before, ms after, kept) each."""
    report = []
    for key, prg, searched, ms, calls in found:
        # per call, times the calls before: one program can run several kernels of the step (ASTs that lower to the
        # same code), and the search replaced the program of one of them
        sec, n, _ = after.get(id(searched), (float("inf"), 1, None))
        ms_after = 1e3 * sec / n * calls
        if not (kept := ms_after < ms):
            tinygrad.codegen.to_program_cache[key] = prg           # the default program was faster: keep it
        report.append((plain(prg.arg.name), ms, ms_after, kept))
    return report


def keep_if_step_faster(make_trainer, x: Tensor, beta: Tensor, found: list, report: list, reps: int = 9) -> tuple:
    """The whole training step with the searched kernels keep_faster kept, against the step with tinygrad's own
    programs back: two fresh trainers (make_trainer(), each captured with one set), stepping in turn `reps` times so
    that the machine's drift falls on both. Timed one by one, a searched kernel can look faster and the step still
    end slower (docs/performance.md); where the step with them is not faster (median), tinygrad's own programs are
    put back. Returns the report with `kept` updated, and the median seconds per step with and without."""
    cache = tinygrad.codegen.to_program_cache
    chosen = {key: cache[key] for key, *_ in found}                 # after keep_faster: searched or default
    trainers = {}
    for searched in (True, False):
        for key, prg, *_ in found:
            cache[key] = chosen[key] if searched else prg
        trainers[searched] = make_trainer()
        for _ in range(3):                                          # compile and capture, replay
            trainers[searched].step(x, beta).numpy()
    times: dict[bool, list] = {True: [], False: []}
    for _ in range(reps):
        for searched, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.step(x, beta).numpy()
            times[searched].append(time.perf_counter() - t0)
    with_them, without = float(np.median(times[True])), float(np.median(times[False]))
    faster = with_them < without
    for key, prg, *_ in found:
        cache[key] = chosen[key] if faster else prg
    return [(name, ms, ms_after, kept and faster) for name, ms, ms_after, kept in report], with_them, without


def search_slowest(make_trainer, x_shape: tuple, top: int = 2, beam: int = 2, label: str = "") -> list:
    """tinygrad's kernel search (BEAM) on the `top` kernels that take the most time in a training step, once per
    network, batch and device: their searched programs replace the default ones in tinygrad's kernel cache and are
    saved with it (save_programs), so later runs compile nothing and search nothing. A search over every kernel of
    a step takes far too long; a few kernels are most of the step. The search is greedy and starts from the kernel
    without tinygrad's hand-coded optimizations, so what it finds can be slower than those: the step is timed again
    with the searched kernels, and a searched kernel is kept only where it made its part of the step faster
    (keep_faster), and then only if the whole step with those is faster too (keep_if_step_faster).
    make_trainer() builds a fresh train.Trainer; three to five are built and thrown away: one to time the kernels
    (which updates its weights), one whose step is scheduled but never run, for the kernels' unoptimized form that
    the search starts from, one to time the searched kernels, and two to time the whole step with and without.
    Returns (name, ms per step before, ms after, kept) of the kernels searched; [] when done before, or under NOOPT
    (no optimization). x_shape is the batch's; label names the network (its config)."""
    marker = json.dumps([label, Device.DEFAULT, str(Device[Device.DEFAULT].renderer.target), list(x_shape), top, beam])
    if NOOPT or top < 1 or marker in _saved["searched"]:
        return []
    t0 = time.perf_counter()
    x = Tensor(np.random.default_rng(0).random(x_shape, dtype=np.float32)).realize()
    beta = Tensor([1.0]).realize()
    slowest = sorted(step_program_times(make_trainer, x, beta).values(), key=lambda spc: -spc[0])[:top]
    with Context(TRAINING=1):
        linear = Tensor.schedule_linear(*make_trainer().step_tensors(x, beta)[0])
    unoptimized = {}                                                # id(default program) -> (cache key, AST, renderer)
    for call in linear.src:
        if call.op is Ops.CALL and call.src[0].op is Ops.SINK:
            renderer = Device[call.device if isinstance(call.device, str) else call.device[0]].renderer
            key = to_program_key(call.src[0], renderer)
            if (prg := tinygrad.codegen.to_program_cache.get(key)) is not None:
                unoptimized[id(prg)] = (key, call.src[0], renderer)
    found = []                                          # (cache key, default program, searched, ms before, calls)
    for sec, calls, prg in slowest:
        if id(prg) not in unoptimized:
            continue                     # not a kernel of the step's own graph
        key, ast, renderer = unoptimized[id(prg)]
        searched = do_to_program(ast.replace(arg=replace(ast.arg, beam=beam)), renderer)
        tinygrad.codegen.to_program_cache[key] = searched
        found.append((key, prg, searched, 1e3 * sec, calls))
    report = keep_faster(found, step_program_times(make_trainer, x, beta) if found else {})
    step = ""
    if any(kept for *_, kept in report):
        report, with_them, without = keep_if_step_faster(make_trainer, x, beta, found, report)
        step = f"; the whole step {1e3 * without:.1f} -> {1e3 * with_them:.1f} ms with those kept"
    _saved["searched"].add(marker)
    _saved["dirty"] = True
    save_programs()
    print(f"searched the {len(report)} slowest kernels of the training step in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{name} {ms:.1f} -> {ms_after:.1f} ms" for name, ms, ms_after, _ in report)
          + f" per step{step}; kept {sum(r[3] for r in report)} of them (tinygrad's own kernel where the searched one "
          f"or the step with it was no faster), for later runs too (--kernel-search 0 skips this)", file=sys.stderr,
          flush=True)
    return report


def default_kernel_search() -> int:
    """How many of the step's slowest kernels to search when --kernel-search is not given: none on OpenCL run by a
    CPU (pocl), where the search kept nothing at `medium` or `paper` width and made `narrow`'s step no faster
    (docs/performance.md); 2 elsewhere."""
    from fast.cl import on_cpu
    return 0 if Device.DEFAULT.split(":")[0] == "CL" and on_cpu(Device.DEFAULT) else 2
