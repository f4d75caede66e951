"""tinygrad machinery, not the paper: the models' matrix products (matmul_nt, Linear), every jit (jit: on OpenCL its
kernels launched in one batch, CLGraph, and built in tinygrad's worker processes, build_ahead), the models run
jitted over numpy arrays at one batch size, compiled kernels kept between runs, kernel search on the slowest kernels
of a training step, per-kernel timing, and which device is a CPU. Nothing here changes what is computed (up to float
rounding), only how it runs and how fast.

    from kernels import generate_images, load_programs
    load_programs()                                          # kernels compiled by earlier runs
    images = generate_images(model, eps)                     # eps: numpy noise per layer (..., d_l) -> (..., C, H, W)
"""
from __future__ import annotations
import ctypes, importlib.metadata, json, math, os, pickle, re, sys, time
from dataclasses import replace
from pathlib import Path
# pocl (OpenCL on the CPU) prints "1 warning generated." for each kernel tinygrad compiles; -w silences its compiler
os.environ.setdefault("POCL_EXTRA_BUILD_FLAGS", "-w")
import numpy as np
import tinygrad.codegen, tinygrad.engine.worker, tinygrad.schedule
from tinygrad import Context, Device, Tensor, TinyJit, nn
from tinygrad.function import function
from tinygrad.codegen import do_to_program, to_program_key
from tinygrad.engine.jit import GraphRunner
from tinygrad.engine.worker import _init_worker
from tinygrad.engine.realize import ExecContext, get_call_arg_uops, pm_exec
from tinygrad.runtime.autogen import opencl as cl
from tinygrad.device import Compiler
from tinygrad.renderer.cstyle import OpenCLRenderer
from tinygrad.runtime.ops_cl import CLDevice, check, checked
from tinygrad.helpers import CACHEDB, CACHELEVEL, IMAGE, NOOPT, PARALLEL, TRAINING, ContextVar
from tinygrad.uop.ops import CallInfo, Ops, UOp


# ---------------------------------------------------------------------------------------------------------
# Matrix products with a backward pass written for tinygrad's kernels
# ---------------------------------------------------------------------------------------------------------

def grad_a_nt(g: Tensor, b: Tensor) -> Tensor: return g @ b.T.contiguous().T                # da = g @ b
def grad_b_nt(g: Tensor, a: Tensor) -> Tensor: return g.T.contiguous() @ a.T.contiguous().T  # db = g.T @ a


def _matmul_nt_grad(g: UOp, call: UOp) -> tuple[UOp, UOp]:
    """The gradients of y = a @ b.T given g = dL/dy: da = g @ b and db = g.T @ a, each written as a product whose
    two operands run along the summed axis in memory (x @ y.T, y contiguous), from transposed copies. Autograd's own
    da and db read b and a across that axis, and tinygrad's kernels for those run 2-4x slower than for this layout
    (10-18 GFLOP/s against 36-52 on OpenCL here, at the paper network's shapes; README, Performance); the copies
    cost far less. g and da are written out first, so that what produces g (a BatchNorm's backward, an
    overlap-add's gather) is not recomputed inside the product, and two products are not fused into one kernel."""
    a, b, g = Tensor(call.src[1]), Tensor(call.src[2]), Tensor(g).contiguous()
    return grad_a_nt(g, b).contiguous().uop, grad_b_nt(g, a).uop


@function(grad_fxn=_matmul_nt_grad)
def _matmul_nt(a: Tensor, b: Tensor) -> Tensor:
    return a.contiguous() @ b.contiguous().T


MATMUL_NT_MIN = 2 ** 26     # multiply-adds


def matmul_nt(a: Tensor, b: Tensor) -> Tensor:
    """a @ b.T, (M, K) x (N, K) -> (M, N). Every matrix product of the models (Linear, the convolutions' im2col
    products) goes through it. From MATMUL_NT_MIN multiply-adds on, with the backward pass of _matmul_nt_grad (the
    same gradients up to float rounding); below, autograd's, because there the copies cost more than they save: all
    of the narrow network's products are below (its step took 16-20 % longer with them: README, Performance).
    Below, a long product with a small b (split_rows) gets b's gradient summed in two stages."""
    if a.shape[0] * a.shape[1] * b.shape[0] >= MATMUL_NT_MIN:
        return _matmul_nt(a, b)
    if (chunks := split_rows(a.shape[0], b.shape[0] * b.shape[1])) > 1:
        # the rows in `chunks` groups, each against its own (expanded) copy of b, whose gradient is written out
        # (contiguous_backward): b's gradient is summed per group, then over the groups (a test checks the numbers)
        (M, K), N = a.shape, b.shape[0]
        w = b.reshape(1, N, K).expand(chunks, N, K).contiguous_backward()
        return (a.reshape(chunks, M // chunks, K) @ w.transpose(1, 2)).reshape(M, N)
    return a @ b.T


SPLIT_MIN = 32          # rows per element of b from which its gradient is summed in two stages (split_rows)
SPLIT_MIN_MACS = 2 ** 21    # ... in a product of at least this many multiply-adds


def split_rows(m: int, b_size: int) -> int:
    """In how many groups of rows the gradient of a (m, K) @ b.T product with respect to b is summed first (1: not
    split). b's gradient is one sum over the m rows per element of b; tinygrad makes it one kernel with one work
    item per element, each summing m products in a row: with few elements and long sums, few work items to spread
    over the cores and long serial loops. The narrow network's first convolution and last transposed convolution
    have 256 weights each summed over 19600 rows (batch 100 x 14 x 14), `r_2_8_16_100_49_4`, 5.6 ms each at 3.5
    GFLOP/s on OpenCL (README, Performance). Split from SPLIT_MIN rows per element on (there 76; at medium and paper
    width the same layers have 1024 weights, 19 rows each: not split) and from SPLIT_MIN_MACS multiply-adds on (5.0
    million there; the tests' tiny networks are below: split, they only took longer to compile), into the largest
    divisor of m up to sqrt(m) groups (140 for 19600), unless VLAE_SPLIT=0."""
    if m < SPLIT_MIN * b_size or m * b_size < SPLIT_MIN_MACS or os.environ.get("VLAE_SPLIT", "1") == "0":
        return 1
    return max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)


_call_repr = CallInfo.__repr__


def _call_repr_by_name(info: CallInfo) -> str:
    """tinygrad keys a graph's schedule by its text, in which a custom gradient appears as its address (id), different
    in every process, so no schedule kept on disk would be found again. A schedule is made after the gradients are,
    so it does not depend on the gradient function: load_programs has tinygrad name matmul_nt's instead."""
    if info.grad_fxn is _matmul_nt_grad:
        return _call_repr(replace(info, grad_fxn=None)) + " matmul_nt"
    return _call_repr(info)


class Linear(nn.Linear):
    """nn.Linear (same weights, same names) computed through matmul_nt."""
    def __call__(self, x: Tensor) -> Tensor:
        return matmul_nt(x, self.weight) + self.bias


class BatchNorm(nn.BatchNorm):
    """nn.BatchNorm (same state, same names, the same function up to float rounding) whose sums over the batch and
    the image run in two stages, per image and then over the batch, in training. tinygrad makes a per-channel sum
    over (batch, height, width) one kernel with one work item per channel, which also recomputes what produced x
    (a transposed convolution's overlap-add, a ReLU's backward); the paper network's step had nine such kernels over
    64 x 19600 values, 52 ms (README, Performance). The per-image sums have B x C outputs to spread over the cores.
    In the backward pass too: scale and shift reach the images through a (B, C, 1, 1) tensor whose gradient is
    written out (contiguous_backward), so their gradients are summed per image first."""
    def calc_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 4 or (self.track_running_stats and not TRAINING):
            return super().calc_stats(x)                              # (the running statistics in evaluation)
        mean = x.mean(axis=(2, 3)).contiguous().mean(axis=0)
        y = x - mean.detach().reshape(1, -1, 1, 1)                     # d(var)/d(mean) = 0, as nn.BatchNorm's
        return mean, (y * y).mean(axis=(2, 3)).contiguous().mean(axis=0)

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or not TRAINING:
            return super().__call__(x)
        mean, var = self.calc_stats(x)
        if self.track_running_stats:                                  # as nn.BatchNorm
            self.running_mean.assign((1 - self.momentum) * self.running_mean + self.momentum * mean.detach())
            n = x.numel() / (x.numel() - x.shape[1])
            self.running_var.assign((1 - self.momentum) * self.running_var + self.momentum * n * var.detach())
            self.num_batches_tracked += 1
        scale = var.add(self.eps).rsqrt() * (self.weight if self.weight is not None else 1)
        shift = (self.bias if self.bias is not None else 0) - mean * scale
        def per_image(t: Tensor) -> Tensor:
            return t.reshape(1, -1, 1, 1).expand(x.shape[0], -1, 1, 1).contiguous_backward()
        return x * per_image(scale) + per_image(shift)                # (x - mean) / sqrt(var + eps) * weight + bias


# ---------------------------------------------------------------------------------------------------------
# Launching a jit's kernels: one batch per device on OpenCL
# ---------------------------------------------------------------------------------------------------------

class CLGraph(GraphRunner):
    """A captured jit's kernels on an OpenCL device, launched as one batch: what tinygrad's graphs do for CUDA and
    Metal (its GraphRunner), which it has none of for OpenCL. There, each replayed kernel goes through tinygrad's
    generic path, ~70 us of Python per kernel (resolving buffers, launch sizes, statistics, setting every argument):
    the narrow step's ~740 kernels took 52 ms to enqueue of a 96 ms step on pocl, and the Python thread holds one of
    the cores the kernels run on (README, Performance). Here each kernel gets its own cl_kernel with its arguments
    set once, when the jit is captured; a replay sets only the arguments that are the jit's inputs (they can be new
    buffers each call) and enqueues. The same kernels on the same buffers in the same in-order queue: the same
    numbers, bit for bit."""
    def __init__(self, linear: UOp, input_uops: tuple[UOp, ...] = ()):
        super().__init__(linear, input_uops)
        self.dev = Device[self.device]
        self.launches = []       # [cl_kernel, work dims, global size, local size] per kernel
        self.inputs = []         # [(argument index, input slot)] per kernel: the arguments set at each replay
        self.var_args = []       # {variable's index: (argument index, its C type)} per kernel
        self.kernels = []        # the cl_kernels, released with the graph
        zero = dict.fromkeys(self.vars, 0)
        for j, ((_, prg, bufs, device_vars), rt) in enumerate(zip(self.calls, self.runtimes)):
            kernel = checked(cl.clCreateKernel(rt.program, _kernel_name(rt.kernel), status := ctypes.c_int32()), status)
            self.kernels.append(kernel)
            globals_ = list(prg.arg.globals)                          # the call's arguments the program reads
            arg_of_slot = {slot: i for i, (_, slot, _, _) in enumerate(rt.signature)}
            vals, var_args = prg.arg.vals(zero | device_vars), {}
            for i, (_, slot, dt, _) in enumerate(rt.signature):
                if slot < len(globals_):
                    a = (b := bufs[globals_[slot]]).get_buf(b.device)
                else:                                                 # the program's variables follow its buffers
                    ctype = getattr(ctypes, f"c_int{dt.bitsize}")
                    var_args[slot - len(globals_)] = (i, ctype)
                    a = ctype(vals[slot - len(globals_)])
                check(cl.clSetKernelArg(kernel, i, ctypes.sizeof(a), ctypes.byref(a)))
            self.inputs.append([(arg_of_slot[globals_.index(pos)], inp) for pos, inp in self.uop_replace[j]
                                if pos in globals_])
            self.var_args.append(var_args)
            self.launches.append([kernel, *self._sizes(*prg.arg.launch_dims(zero | device_vars))])

    @staticmethod
    def _sizes(global_size, local_size) -> tuple:
        if local_size is not None:
            global_size = tuple(int(g * l) for g, l in zip(global_size, local_size))
        return (len(global_size), (ctypes.c_size_t * len(global_size))(*global_size),
                (ctypes.c_size_t * len(local_size))(*local_size) if local_size else None)

    def __call__(self, input_uops: tuple[UOp, ...], var_vals: dict[str, int], wait: bool = False) -> float | None:
        for (kernel, *_), inputs in zip(self.launches, self.inputs):
            for i, inp in inputs:
                a = (b := input_uops[inp].buffer).get_buf(b.device)
                check(cl.clSetKernelArg(kernel, i, ctypes.sizeof(a), ctypes.byref(a)))
        for j, i, v in self.updated_vars(var_vals):
            arg, ctype = self.var_args[j][i]
            check(cl.clSetKernelArg(self.launches[j][0], arg, ctypes.sizeof(a := ctype(v)), ctypes.byref(a)))
        for j, global_size, local_size in self.updated_launch_dims(var_vals):
            self.launches[j][1:] = self._sizes(global_size, local_size)
        n = len(self.launches)
        first, last = (cl.cl_event(), cl.cl_event()) if wait else (None, None)   # timed from first to last kernel
        for k, (kernel, dims, global_size, local_size) in enumerate(self.launches):
            event = last if k == n - 1 else first if k == 0 else None
            check(cl.clEnqueueNDRangeKernel(self.dev.queue, kernel, dims, None, global_size, local_size, 0, None,
                                            event))
        check(cl.clFlush(self.dev.queue))
        if not wait:
            return None
        started = first if n > 1 else last                             # one kernel: its own event
        check(cl.clWaitForEvents(1, last))
        start, end = ctypes.c_uint64(), ctypes.c_uint64()
        check(cl.clGetEventProfilingInfo(started, cl.CL_PROFILING_COMMAND_START, 8, ctypes.byref(start), None))
        check(cl.clGetEventProfilingInfo(last, cl.CL_PROFILING_COMMAND_END, 8, ctypes.byref(end), None))
        check(cl.clReleaseEvent(last))
        if n > 1:
            check(cl.clReleaseEvent(first))
        return (end.value - start.value) * 1e-9

    def __del__(self):
        for kernel in getattr(self, "kernels", []):
            cl.clReleaseKernel(kernel)

    @staticmethod
    def supports_uop(batch_devs, new_call: UOp) -> bool:
        """Kernels on one device whose arguments are plain buffers: no images (tinygrad's IMAGE setting; an image
        argument is made per launch) and no view of a jit input (it would be resolved once, at capture)."""
        return GraphRunner.supports_uop(batch_devs, new_call) and not IMAGE and not any(
            b.op is not Ops.PARAM and any(u.op is Ops.PARAM for u in b.toposort()) for b in get_call_arg_uops(new_call))


class CLBuildAhead(Compiler):
    """The OpenCL renderer's compiler in tinygrad's worker processes (build_ahead): it builds each kernel they lower
    with the OpenCL driver, through tinygrad's own CLCompiler (so into its CACHEDB, under the key the main process
    looks up), and passes the source on as the renderer's own compiler does. The main process then finds every
    binary built, in parallel, where it used to build them one by one."""
    def __init__(self, device: str):
        super().__init__(None)
        self.device, self.opened = device, None

    def compile(self, src: str) -> bytes:
        if self.opened is None:                                     # this worker's own context on the device
            self.opened = CLDevice(self.device)
        self.opened.cl_compiler.compile_cached(src)
        return src.encode()


def _init_build_worker() -> None:
    """tinygrad's worker set-up, then CLBuildAhead as every OpenCL renderer's compiler in this worker."""
    _init_worker()
    OpenCLRenderer.compiler = CLBuildAhead(os.environ["VLAE_CL_BUILD_DEVICE"])


def build_ahead() -> None:
    """On OpenCL, build kernels in tinygrad's worker processes (PARALLEL), not in the main one. tinygrad lowers
    kernels there, and then builds each OpenCL program in the main process, one after another, as it first runs
    it (CLProgram); on pocl that was 69 of the 97 s of a cold narrow-VLAE warm-up, on one core (README,
    Performance; builds in threads of one process do not overlap). The workers are tinygrad's, started with this
    module's set-up in place of its own. Needs tinygrad's compile cache (CACHEDB), where the main process finds
    the binaries; VLAE_CL_BUILD_AHEAD=0 turns it off."""
    dev = Device[Device.DEFAULT]
    if isinstance(dev, CLDevice) and dev.cl_compiler.cachekey is not None and PARALLEL.value > 0 \
            and os.environ.get("VLAE_CL_BUILD_AHEAD", "1") != "0" and tinygrad.engine.worker.worker_pool is None:
        os.environ["VLAE_CL_BUILD_DEVICE"] = Device.DEFAULT           # read by the workers, which inherit it
        tinygrad.engine.worker._init_worker = _init_build_worker      # the pool is made on first use, with this


def _kernel_name(kernel) -> bytes:
    size = ctypes.c_size_t()
    check(cl.clGetKernelInfo(kernel, cl.CL_KERNEL_FUNCTION_NAME, 0, None, ctypes.byref(size)))
    name = ctypes.create_string_buffer(size.value)
    check(cl.clGetKernelInfo(kernel, cl.CL_KERNEL_FUNCTION_NAME, size.value, name, None))
    return name.value


def jit(fn) -> TinyJit:
    """TinyJit(fn); on an OpenCL default device its kernels are launched in batches (CLGraph) unless
    VLAE_CL_GRAPH=0. Every jit of the project is made here (the training step, and through jitted the rest)."""
    if Device.DEFAULT.split(":")[0] == "CL" and os.environ.get("VLAE_CL_GRAPH", "1") != "0" \
            and Device[Device.DEFAULT].graph is None:
        Device[Device.DEFAULT].graph = CLGraph
    return TinyJit(fn)


def step_calls(tjit: TinyJit) -> list[UOp]:
    """The calls a captured jit makes, in order, with each batch of a graph (CLGraph, or a GPU backend's) opened
    into its kernels: call.src[0] is the program, the rest its arguments (the jit's inputs as PARAMs)."""
    calls = []
    for call in tjit.captured.linear.src:
        graphed = call.src[0].op is Ops.CUSTOM_FUNCTION and call.src[0].arg == "graph"
        calls.extend(call.src[0].src[0].src if graphed else (call,))
    return calls


# ---------------------------------------------------------------------------------------------------------
# The models over numpy arrays: jitted, at one batch size
# ---------------------------------------------------------------------------------------------------------

BATCH = 100                 # sampling and evaluation run at this batch size (padded): each jit compiles once


def jitted(obj, name: str, fn) -> TinyJit:
    """jit(fn), made on first use and kept on obj as the private attribute _<name>_jit, so that each function
    compiles once per model. vlae.weights() skips private attributes: what a jit captures never reaches a checkpoint."""
    if f"_{name}_jit" not in vars(obj):
        setattr(obj, f"_{name}_jit", jit(fn))
    return getattr(obj, f"_{name}_jit")


def batched(fn, arrays: list[np.ndarray]):
    """fn(list of (BATCH, ...) Tensors) -> Tensor or tuple of Tensors, applied to the rows of numpy arrays, the outputs
    concatenated as numpy. The last chunk is padded with copies of its last row, so every call has the same shape
    and a jitted fn compiles once."""
    n, outs = len(arrays[0]), []
    for i in range(0, n, BATCH):
        chunk = [a[i:i + BATCH] for a in arrays]
        pad = BATCH - len(chunk[0])
        if pad:
            chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
        ret = fn([Tensor(np.ascontiguousarray(c, dtype=np.float32)) for c in chunk])
        outs.append([r.numpy()[:BATCH - pad] for r in (ret if isinstance(ret, tuple) else (ret,))])
    cat = [np.concatenate(parts) for parts in zip(*outs)]
    return tuple(cat) if len(cat) > 1 else cat[0]


def generate_jit(model) -> TinyJit:
    """model.generate jitted (eval mode: BatchNorm uses its running statistics): noise Tensors per layer -> images."""
    return jitted(model, "generate", lambda *eps: model.generate(list(eps)).realize())


def generate_images(model, eps: list[np.ndarray]) -> np.ndarray:
    """Noise per layer, numpy arrays (..., d_l) with the same leading shape -> images (..., C, H, W): the means of
    r(x | z) in [0, 1] (for an HVAE, Eq. 15 with this noise)."""
    lead = eps[0].shape[:-1]
    images = batched(lambda e: generate_jit(model)(*e), [e.reshape(-1, e.shape[-1]) for e in eps])
    return images.reshape(*lead, *images.shape[1:])


def posterior_means(model, x: np.ndarray) -> list[np.ndarray]:
    """x (N, C, H, W) -> mu_l(x) (N, d_l) per layer (Eq. 13)."""
    run = jitted(model, "encode", lambda x: tuple(mu.realize() for mu, _ in model.encode(x)))
    return list(batched(lambda xb: run(xb[0]), [x]))


def reconstruct(model, x: np.ndarray) -> np.ndarray:
    """x (N, C, H, W) -> the images decoded from the posterior means mu_l(x)."""
    run = jitted(model, "reconstruct", lambda x: model.decode([mu for mu, _ in model.encode(x)]).realize())
    return batched(lambda xb: run(xb[0]), [x])


def elbo_parts(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example ELBO parts (N, 2+L): elbo, recon, kl_1..kl_L, for every row of x, and the images decoded from
    the posterior means (N, C, H, W)."""
    def parts(x: Tensor) -> tuple[Tensor, Tensor]:
        out = model.elbo(x)
        recon_mean = model.decode([mu for mu, _ in model.encode(x)])
        return Tensor.stack(out.elbo, out.recon, *out.kl, dim=1).realize(), recon_mean.realize()
    run = jitted(model, "evaluate", parts)
    return batched(lambda xb: run(xb[0]), [x])


def on_cpu(device: str) -> bool:
    """Whether a tinygrad device computes on the CPU: its CPU backends, and OpenCL run by a CPU driver such as pocl."""
    if device.split(":")[0] in ("CPU", "CLANG", "LLVM", "PYTHON"):
        return True
    if device.split(":")[0] != "CL":
        return False
    kind = ctypes.c_uint64()
    cl.clGetDeviceInfo(Device[device].cl_dev, cl.CL_DEVICE_TYPE, 8, ctypes.byref(kind), None)
    return bool(kind.value & cl.CL_DEVICE_TYPE_CPU)


# ---------------------------------------------------------------------------------------------------------
# Compiled kernels kept between runs
# ---------------------------------------------------------------------------------------------------------

def program_cache_path() -> Path | None:
    """Where compiled kernels are kept between runs: beside tinygrad's own cache (its CACHEDB), one file per tinygrad
    version. None when caching is off (VLAE_PROGRAM_CACHE=0, or tinygrad's CACHELEVEL=0)."""
    if os.environ.get("VLAE_PROGRAM_CACHE", "1") == "0" or CACHELEVEL.value < 1:
        return None
    return Path(CACHEDB).parent / f"vlae-programs-tinygrad-{importlib.metadata.version('tinygrad')}.pkl"


_saved = {"programs": 0, "schedules": 0, "searched": set(), "other_settings": {},    # what the file held when read
          "stat": None}                 # its (mtime, size) and the settings when this process last read or wrote it


def settings() -> str:
    """The tinygrad settings given in the environment (BEAM, NOOPT, ...): schedules are kept per settings."""
    return json.dumps(sorted((k, v) for k, v in os.environ.items() if k in ContextVar._cache))


def load_programs() -> None:
    """Fill tinygrad's in-memory caches of compiled kernels and of schedules from program_cache_path().
    tinygrad turns each kernel of a graph into source code and compiles it; its CACHEDB keeps only the compiler's
    output, so a new process still spends tens of seconds re-deriving the ~300 distinct kernels of a training step
    (the first steps of the narrow / medium VLAE on DEV=CPU took 43.5 / 29.8 s without this cache, 10.7 / 14.8 s with
    it: bench/results/warmup-program-cache-*.json). The programs are kept here, keyed as tinygrad keys them (the
    kernel's AST, the device's renderer and the settings that change code), so a cached program is only ever used for
    the kernel it was made from. Before that, tinygrad splits the step's graph into kernels (its schedule), most of
    what is left of the warm-up; it keeps the schedule of each graph in memory (schedule_cache, keyed by the graph's
    structure), and here on disk too, per settings (README, Performance). An unreadable file is ignored (and
    replaced). Every script calls this first; on OpenCL it also sets up build_ahead. A file this process has read
    or written already under the same settings, unchanged since, is not read again (its kernels are in memory: the
    tests call the scripts' main() over and over, and the file grows to megabytes: 1 s a read here at 12 MB)."""
    CallInfo.__repr__ = _call_repr_by_name
    build_ahead()
    if (path := program_cache_path()) is None or not path.exists():
        return
    try:
        if (_file_stat(path), settings()) == _saved["stat"]:
            return
        with open(path, "rb") as f:
            stat = _file_stat(f.fileno())                      # of the file being read
            saved = pickle.load(f)
        if "programs" not in saved:
            saved = {"programs": saved}                         # the format before search and schedules
        programs, searched = saved["programs"], set(saved.get("searched", []))
        schedules = saved.get("schedules", {})
    except Exception as e:
        print(f"note: ignoring the unreadable kernel cache {path} ({type(e).__name__}); it is rebuilt", file=sys.stderr)
        return
    program_cache, schedule_cache = tinygrad.codegen.to_program_cache, tinygrad.schedule.schedule_cache
    program_cache.update(programs)
    schedule_cache.update(schedules.pop(settings(), {}))
    _saved["programs"], _saved["schedules"] = len(program_cache), len(schedule_cache)
    _saved["searched"], _saved["other_settings"] = _saved["searched"] | searched, schedules
    _saved["stat"] = stat, settings()


def _file_stat(file: Path | int) -> tuple[int, int]:
    st = os.stat(file)
    return st.st_mtime_ns, st.st_size


def save_programs() -> None:
    """Write tinygrad's kernel and schedule caches to program_cache_path() if they grew or a search replaced kernels
    (atomically; a failure only costs speed)."""
    programs, schedules = dict(tinygrad.codegen.to_program_cache), dict(tinygrad.schedule.schedule_cache)
    path, searched = program_cache_path(), set(_saved["searched"])
    grew = len(programs) > _saved["programs"] or len(schedules) > _saved["schedules"]
    if path is None or not (grew or _saved.get("dirty")):
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            pickle.dump({"programs": programs, "searched": sorted(searched),
                         "schedules": {**_saved["other_settings"], settings(): schedules}}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
        _saved["programs"], _saved["schedules"], _saved["dirty"] = len(programs), len(schedules), False
        _saved["stat"] = _file_stat(path), settings()
    except (OSError, pickle.PicklingError):
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Per-kernel times and kernel search
# ---------------------------------------------------------------------------------------------------------

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
    end slower (the narrow VLAE on OpenCL: two kept kernels, 7.7 -> 5.1 and 7.6 -> 3.0 ms each alone, and the step
    89 -> 106 ms; README, Performance); where the step with them is not faster (median), tinygrad's own programs are
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
    saved with it (save_programs), so later runs compile nothing and search nothing. BEAM=2 over all ~300 distinct
    kernels of a step did not finish in 30 minutes here; a few kernels are most of the step (README, Performance),
    so searching those pays: each takes minutes (longer the slower it is). The search is greedy and starts from the
    kernel without tinygrad's hand-coded optimizations, so what it finds can be slower than those (the paper
    network's three slowest kernels on OpenCL: all three; README, Performance): the step is timed again with the
    searched kernels, and a searched kernel is kept only where it made its part of the step faster
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
