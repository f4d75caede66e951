"""Speed, not the paper: how the models run fast with tinygrad on a CPU. Nothing here changes what is computed (up to
float rounding in the layers' forms); it only changes how it runs. One call switches it all on, in the entry scripts
(train.py, sample.py, evaluate.py, study.py, bench.py; off with --plain):

    import fast
    fast.enable()                  # before a model is built: checkpoint.build_model then calls fast.accelerate

What it does (docs/performance.md says why):
  fast.layers   the layers' fast forms (im2col convolutions, matrix products with their own backward pass, two-stage
                BatchNorm sums), swapped into a model in place (accelerate): the same Tensors under the same names
  fast.cl       on OpenCL, a jit's kernels launched as one batch (CLGraph), kernels built in worker processes
  fast.cache    compiled kernels and schedules kept on disk between runs
  fast.search   tinygrad's kernel search on a training step's slowest kernels (train.py --kernel-search)
  jit           the training step's jit: it captures on its first call and saves the compiled kernels after that
Importing this package loads none of them and changes nothing; each patch of a tinygrad internal is made by enable().
"""
from __future__ import annotations
import atexit, os
from tinygrad import TinyJit
from tinygrad.engine.jit import _TinyJit     # tinygrad 0.14.0: the class of TinyJit's jits (loaded by tinygrad)

ENABLED = False


def enable() -> None:
    """Switch the fast path on for this process (again: nothing)."""
    global ENABLED
    if ENABLED:
        return
    # pocl (OpenCL on the CPU) prints "1 warning generated." for each kernel it builds; -w silences its compiler
    os.environ.setdefault("POCL_EXTRA_BUILD_FLAGS", "-w")
    from fast import cache, cl
    cache.name_custom_gradients()
    cl.build_ahead()
    cl.install_graph()
    cache.load_programs()
    atexit.register(cache.save_programs)          # the kernels compiled by this run, for the next
    ENABLED = True


def accelerate(model):
    """When enabled, give the model's layers their fast forms (fast.layers.accelerate), in place. Returns model."""
    if ENABLED:
        from fast.layers import accelerate as swap
        swap(model)
    return model


class _CapturingJit(_TinyJit):
    """TinyJit whose first call captures: TinyJit runs a function once plainly before capturing it, so that state
    left lazy is made once and not replayed; the Trainer makes that state before its first step, so capturing at
    once saves one build of the graph and one run. After the capture, the compiled kernels are saved to disk."""
    def __init__(self, fn):
        super().__init__(fn)
        self.cnt = 1          # tinygrad 0.14.0: TinyJit.cnt counts calls, 0 runs plainly, 1 captures, from 2 replays

    def __call__(self, *args, **kwargs):
        ret = super().__call__(*args, **kwargs)
        if self.cnt == 2:
            from fast.cache import save_programs
            save_programs()
        return ret


def jit(fn) -> _TinyJit:
    """The training step's jit (fn's state must be realized before its first call); tinygrad's TinyJit when off."""
    return _CapturingJit(fn) if ENABLED else TinyJit(fn)


def search_kernels(make_trainer, cfg, batch_size: int, top: int | None) -> list:
    """Kernel search on the `top` slowest kernels of this network's training step (fast.search.search_slowest;
    None: its default for the device); nothing when not enabled."""
    if not ENABLED:
        return []
    import json
    from fast.search import default_kernel_search, search_slowest
    top = default_kernel_search() if top is None else top
    return search_slowest(make_trainer, (batch_size, *cfg.image_shape), top,
                          label=json.dumps(cfg.to_dict(), sort_keys=True))


def on_cpu(device: str) -> bool:
    """Whether a tinygrad device computes on the CPU (OpenCL run by pocl too): fast.cl.on_cpu."""
    from fast.cl import on_cpu as query
    return query(device)
