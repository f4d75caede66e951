"""OpenCL: a captured jit's kernels launched as one batch (CLGraph), kernels built in tinygrad's worker processes
(build_ahead), and whether a device computes on the CPU (on_cpu)."""
from __future__ import annotations
import ctypes, os
import tinygrad.engine.worker
from tinygrad import Device
from tinygrad.device import Compiler
from tinygrad.engine.jit import GraphRunner
from tinygrad.engine.realize import get_call_arg_uops
from tinygrad.engine.worker import _init_worker
from tinygrad.helpers import IMAGE, PARALLEL
from tinygrad.renderer.cstyle import OpenCLRenderer
from tinygrad.runtime.autogen import opencl as cl
from tinygrad.runtime.ops_cl import CLDevice, check, checked
from tinygrad.uop.ops import Ops, UOp


class CLGraph(GraphRunner):
    """A captured jit's kernels on an OpenCL device, launched as one batch: what tinygrad's graphs do for CUDA and
    Metal (its GraphRunner), which it has none of for OpenCL. There, each replayed kernel goes through tinygrad's
    generic launch path, tens of microseconds of Python per kernel, on a thread that holds one of the cores the
    kernels run on. Here each kernel gets its own cl_kernel with its arguments set once, when the jit is captured;
    a replay sets only the arguments that are the jit's inputs (they can be new buffers each call) and enqueues.
    The same kernels on the same buffers in the same in-order queue: the same numbers, bit for bit."""
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


def _kernel_name(kernel) -> bytes:
    size = ctypes.c_size_t()
    check(cl.clGetKernelInfo(kernel, cl.CL_KERNEL_FUNCTION_NAME, 0, None, ctypes.byref(size)))
    name = ctypes.create_string_buffer(size.value)
    check(cl.clGetKernelInfo(kernel, cl.CL_KERNEL_FUNCTION_NAME, size.value, name, None))
    return name.value


def install_graph() -> None:
    """CLGraph as the OpenCL default device's graph, so every TinyJit made from now on launches its kernels in one
    batch; VLAE_CL_GRAPH=0 leaves tinygrad's per-kernel launches."""
    if Device.DEFAULT.split(":")[0] == "CL" and os.environ.get("VLAE_CL_GRAPH", "1") != "0" \
            and Device[Device.DEFAULT].graph is None:
        # tinygrad 0.14.0: a device's .graph is the GraphRunner its jits batch kernels with; CLDevice has none
        Device[Device.DEFAULT].graph = CLGraph


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
    # tinygrad 0.14.0: the renderer's compiler is what the workers call on each lowered kernel's source
    OpenCLRenderer.compiler = CLBuildAhead(os.environ["VLAE_CL_BUILD_DEVICE"])


def build_ahead() -> None:
    """On OpenCL, build kernels in tinygrad's worker processes (PARALLEL), not in the main one: tinygrad lowers
    kernels there, then builds each OpenCL program in the main process, one after another on one core, as it first
    runs it. Needs tinygrad's compile cache (CACHEDB), where the main process finds the binaries;
    VLAE_CL_BUILD_AHEAD=0 turns it off."""
    dev = Device[Device.DEFAULT]
    if isinstance(dev, CLDevice) and dev.cl_compiler.cachekey is not None and PARALLEL.value > 0 \
            and os.environ.get("VLAE_CL_BUILD_AHEAD", "1") != "0" and tinygrad.engine.worker.worker_pool is None:
        os.environ["VLAE_CL_BUILD_DEVICE"] = Device.DEFAULT           # read by the workers, which inherit it
        # tinygrad 0.14.0: its worker pool is made on first use with engine.worker._init_worker; this one instead
        tinygrad.engine.worker._init_worker = _init_build_worker


def on_cpu(device: str) -> bool:
    """Whether a tinygrad device computes on the CPU: its CPU backends, and OpenCL run by a CPU driver such as pocl."""
    if device.split(":")[0] in ("CPU", "CLANG", "LLVM", "PYTHON"):
        return True
    if device.split(":")[0] != "CL":
        return False
    kind = ctypes.c_uint64()
    cl.clGetDeviceInfo(Device[device].cl_dev, cl.CL_DEVICE_TYPE, 8, ctypes.byref(kind), None)
    return bool(kind.value & cl.CL_DEVICE_TYPE_CPU)
