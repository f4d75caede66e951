"""Tests for the VLAE project: math against independent references, shapes, gradients, checkpoints, data, training,
and the figures of sample.py.

    VLAE_DATA=/path/to/data python -m pytest -q test_vlae.py

tinygrad compiles every new graph (tens of seconds on a CPU), so the models here are `tiny`, and kernels are
compiled without tinygrad's kernel optimizations (NOOPT=1: same math, half the compile time; set NOOPT=0 to
test the optimized kernels instead).
"""
import os
os.environ.setdefault("NOOPT", "1")   # before tinygrad is imported: it reads its settings once
# the CPU backend is the reference the tests hold the code to (bit-exact resume); where pocl is installed tinygrad
# would pick OpenCL instead, whose compiles cost twice as long. DEV=CL (or CUDA, ...) runs the suite there;
# test_opencl_backend_trains_saves_and_sweeps_like_the_cpu checks the OpenCL path against the CPU in any case.
os.environ.setdefault("DEV", "CPU")
import dataclasses, errno, gzip, hashlib, json, math, re, shutil, signal, struct, subprocess, sys, time, zlib
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from tinygrad import Tensor, Context, Device, nn
from tinygrad.nn.state import get_state_dict
from tinygrad.uop.ops import Ops
import checkpoint
import data
import arrays
import evaluate
import fast
import fast.cache, fast.layers, fast.search
import files
import sample
import train
import vlae
from vlae import VLAE, ModelConfig, gaussian_kl, gaussian_log_prob, log_likelihood, n_params
from hvae import HVAE

TINY = dict(size="tiny")


def tiny(**kw) -> VLAE:
    Tensor.manual_seed(0)
    return VLAE(ModelConfig(**(TINY | kw)))


def mnist_folder() -> Path:
    """The MNIST folder the data loader finds ($VLAE_DATA, ./data); skip the test if there is none."""
    roots = data.data_roots()
    folder = files.find_folder(roots, "mnist", data.MNIST_FILES)
    if not all((folder / (f + ".gz")).exists() or (folder / f).exists() for f in data.MNIST_FILES):
        if os.environ.get("VLAE_DATA"): pytest.fail(f"VLAE_DATA={os.environ['VLAE_DATA']} holds no MNIST files")
        pytest.skip("no MNIST copy found (set VLAE_DATA)")
    return folder


# --------------------------------------------------------------------------------------------- math

def test_kl_matches_monte_carlo():
    """Closed-form KL(N(mu, sigma^2) || N(0, I)) against E_q[log q(z) - log p(z)] from 200k samples."""
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(3, 4)).astype(np.float32)
    sigma = rng.uniform(0.2, 1.5, size=(3, 4)).astype(np.float32)
    kl = gaussian_kl(Tensor(mu), Tensor(sigma)).numpy()
    z = mu + sigma * rng.normal(size=(200_000, 3, 4))
    log_q = -0.5 * ((z - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
    log_p = -0.5 * z ** 2 - 0.5 * np.log(2 * np.pi)
    mc = (log_q - log_p).sum(-1).mean(0)
    np.testing.assert_allclose(kl, mc, rtol=0.02, atol=0.02)
    assert (kl > 0).all()


def test_log_densities_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(2, 1, 3, 3)).astype(np.float32)
    logits = rng.normal(size=(2, 1, 3, 3)).astype(np.float32)
    p = 1 / (1 + np.exp(-logits))
    cfg = ModelConfig(likelihood="gaussian", sigma_x=0.3)
    want = np.log(np.exp(-0.5 * ((x - p) / 0.3) ** 2) / (0.3 * np.sqrt(2 * np.pi))).reshape(2, -1).sum(1)
    np.testing.assert_allclose(log_likelihood(Tensor(x), Tensor(logits), cfg).numpy(), want, rtol=1e-5)
    xb = (x > 0.5).astype(np.float32)
    want = (xb * np.log(p) + (1 - xb) * np.log(1 - p)).reshape(2, -1).sum(1)
    cfg = ModelConfig(likelihood="bernoulli")
    np.testing.assert_allclose(log_likelihood(Tensor(xb), Tensor(logits), cfg).numpy(), want, rtol=1e-5)
    # extreme logits must not overflow
    big = Tensor(np.full((1, 1, 2, 2), 200.0, np.float32))
    assert np.isfinite(log_likelihood(Tensor(np.zeros((1, 1, 2, 2), np.float32)), big, cfg).numpy()).all()
    # gaussian_log_prob integrates N(0,1) correctly at 0
    np.testing.assert_allclose(gaussian_log_prob(Tensor.zeros(1, 1), Tensor.zeros(1, 1), Tensor.ones(1, 1)).numpy(),
                               [-0.5 * np.log(2 * np.pi)], rtol=1e-6)


# --------------------------------------------------------------------------------------------- model

@pytest.mark.parametrize("dims", [(1, 3), (2, 3, 4), (4, 2, 3, 1)])
def test_shapes_for_2_3_4_layers(dims):
    model = tiny(latent_dims=dims)
    x = Tensor(np.random.default_rng(0).uniform(size=(5, 1, 28, 28)).astype(np.float32))
    post = model.encode(x)
    assert [(mu.shape, s.shape) for mu, s in post] == [((5, d), (5, d)) for d in dims]
    assert all((s.numpy() > 0).all() for _, s in post)
    assert model.decode([mu for mu, _ in post]).shape == (5, 1, 28, 28)
    out = model.elbo(x)
    assert out.elbo.shape == out.recon.shape == (5,) and len(out.kl) == len(dims)


def test_elbo_matches_numpy_and_the_importance_weights():
    """Eq. 14 checked from outside: the KL terms against numpy's closed form on the encoder's (mu, sigma), and the
    ELBO's mean over many draws of z against the mean of the importance weights log p(x|z) + log p(z) - log q(z|x)
    (log_weight, which samples the KL instead): the two estimate the same number, so a wrong sign or a missing
    term in either moves them apart by more than the Monte Carlo error."""
    model, n = tiny(), 150          # (n = 150 draws: |difference| / se <= 2.4 over 5 seeds, a flipped KL sign ~35)
    x = np.random.default_rng(0).uniform(size=(4, 1, 28, 28)).astype(np.float32)
    many = np.repeat(x, n, axis=0)                                      # each image n times: n draws of z in one batch
    out, posterior = model.elbo(Tensor(many)), model.encode(Tensor(many))
    Tensor.realize(out.elbo, *out.kl, *[t for mu_sigma in posterior for t in mu_sigma])      # one schedule
    for (mu, sigma), kl in zip(posterior, out.kl):
        mu, sigma = mu.numpy().astype(np.float64), sigma.numpy().astype(np.float64)
        np.testing.assert_allclose(kl.numpy(), 0.5 * (mu ** 2 + sigma ** 2 - 1 - np.log(sigma ** 2)).sum(1), rtol=1e-4)
    elbo = out.elbo.numpy().reshape(4, n)
    rng = np.random.default_rng(1)
    eps = [Tensor(rng.standard_normal((4 * n, d)).astype(np.float32)) for d in model.cfg.latent_dims]
    log_w = model.log_weight(Tensor(many), eps).numpy().reshape(4, n)
    se = np.sqrt(elbo.var(1) / n + log_w.var(1) / n)
    assert (np.abs(elbo.mean(1) - log_w.mean(1)) < 4 * se + 1e-3).all(), (elbo.mean(1), log_w.mean(1), se)
    assert (elbo.mean(1) != 0).all() and np.isfinite(elbo).all()


@pytest.mark.parametrize("min_macs, split_min", [(0, None), (None, None), (None, 0)])
def test_fast_layers_equal_tinygrads(min_macs, split_min, monkeypatch):
    """fast.layers' Conv4x4s2 and ConvTranspose4x4s2 (im2col / matmul + overlap-add) give tinygrad's Conv2d and
    ConvTranspose2d outputs and gradients, with the same weights; so does its Linear nn.Linear's, on an input that is
    a transposed view. With min_macs=0 every product takes matmul_nt's own backward pass, else (these sizes)
    autograd's; with split_min=0 the convolutions' weight gradients are summed in groups of rows first (split_rows).
    The transposed convolution writes its patches' gradient out (write_patch_grad) in the first two cases and leaves
    it lazy in the third."""
    fl = fast.layers
    if min_macs is not None: monkeypatch.setattr(fl, "MATMUL_NT_MIN", min_macs)
    if split_min is not None:                             # both of split_rows' thresholds
        monkeypatch.setattr(fl, "SPLIT_MIN", split_min)
        monkeypatch.setattr(fl, "SPLIT_MIN_MACS", split_min)
    # narrow's first conv (256 weights over 19600 rows) is split, medium's (1024 weights) is not
    assert fl.split_rows(24, 240) == (4 if split_min == 0 else 1) and fl.split_rows(19600, 256) == 140
    assert fl.split_rows(19600, 1024) == (140 if split_min == 0 else 1)
    rng = np.random.default_rng(0)
    normal = lambda *shape: Tensor(rng.standard_normal(shape, dtype=np.float32))
    transposed = fl.ConvTranspose4x4s2(3, 5, 4, stride=2, padding=1)
    transposed.write_patch_grad = split_min is None
    cases = ((fl.Conv4x4s2(3, 5, 4, stride=2, padding=1), nn.Conv2d(3, 5, 4, stride=2, padding=1),
              normal(2, 3, 8, 6), normal(2, 5, 4, 3)),
             (transposed, nn.ConvTranspose2d(3, 5, 4, stride=2, padding=1), normal(2, 3, 4, 3), normal(2, 5, 8, 6)),
             (fl.Linear(6, 4), nn.Linear(6, 4), normal(6, 7).T, normal(7, 4)))
    for ours, ref, x, up in cases:
        ref.weight, ref.bias = ours.weight, ours.bias
        results = []
        for layer in (ours, ref):
            y = layer(x)
            results.append([y, *(y * up).sum().gradient(x, ours.weight, ours.bias)])
        for a, b in zip(*results): np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_fast_batchnorm_equals_tinygrads():
    """fast.layers.BatchNorm (sums per image, then over the batch) gives nn.BatchNorm's outputs, gradients and running
    statistics in training, and its outputs in evaluation, on images and on vectors."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: Tensor(rng.standard_normal(shape, dtype=np.float32))
    for shape in ((4, 5, 6, 3), (7, 5)):
        x, up, weight, bias = normal(*shape) * 3 + 1, normal(*shape), normal(5), normal(5)
        results = []
        for layer in (fast.layers.BatchNorm(5), nn.BatchNorm(5)):
            layer.weight, layer.bias = weight, bias
            with Context(TRAINING=1):
                y = layer(x)
                results.append([y, *(y * up).sum().gradient(x, weight, bias)])
            with Context(TRAINING=0):
                results[-1] += [layer.running_mean, layer.running_var, layer(x)]
        for a, b in zip(*results): np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


FAST_TOLERANCE = 1e-4     # fast path against plain: max |difference| <= this x the largest |value| (fast_against_plain)


def fast_against_plain(size: str, batch: int, model: str = "vlae") -> dict:
    """The same model (seed 0) plain and with fast.layers' forms (accelerate), on one batch and one draw of z, in
    training mode: {name: max |fast - plain| / max |plain|} over the per-example ELBO, the loss train.py minimises
    (KL weight 0.5), every parameter's gradient (over the largest gradient entry of the network) and the BatchNorm
    running statistics after the step."""
    x = Tensor(np.random.default_rng(0).uniform(size=(batch, 1, 28, 28)).astype(np.float32))
    results = []
    for accelerated in (False, True):
        Tensor.manual_seed(0)
        net = checkpoint.MODELS[model](ModelConfig(model=model, size=size, latent_dims=(2, 2)))   # every layer kind
        rng = np.random.default_rng(0)          # init_weights' N(0, 0.02) drawn in numpy: no random kernels to compile
        for k, t in sorted(vlae.weights(net).items()):
            if k.endswith(".weight") and t.ndim >= 2: t.replace(Tensor(rng.normal(0, 0.02, t.shape).astype(np.float32)))
        if accelerated: fast.layers.accelerate(net)
        state = vlae.weights(net)
        params = {k: t for k, t in state.items() if "running" not in k and "num_batches" not in k}
        Tensor.manual_seed(1)
        with Context(TRAINING=1):
            out = net.elbo(x)
            loss = (0.5 * Tensor.stack(*out.kl, dim=1).mean(axis=0)).sum() - out.recon.mean()
            grads = dict(zip((f"grad {k}" for k in params), loss.gradient(*params.values())))
            tensors = {"elbo": out.elbo, "loss": loss, **grads} | {k: t for k, t in state.items() if "running" in k}
            Tensor.realize(*tensors.values())
        results.append({k: t.numpy().astype(np.float64) for k, t in tensors.items()})
    plain, fast_ = results
    assert plain.keys() == fast_.keys() and len(plain) > 2 + len(params)
    # a gradient against the network's largest gradient entry: the biases before a BatchNorm have a gradient of
    # exactly 0 in exact arithmetic, rounding-sized in either form
    largest_grad = max(np.abs(v).max() for k, v in plain.items() if k.startswith("grad "))
    scale = {k: largest_grad if k.startswith("grad ") else max(np.abs(v).max(), 1e-30) for k, v in plain.items()}
    return {k: float(np.abs(fast_[k] - plain[k]).max() / scale[k]) for k in plain}


@pytest.mark.parametrize("dev, size, batch, noopt", [("CPU", "tiny", 4, "0"), ("CL", "narrow", 8, "1")])
def test_fast_path_computes_the_plain_function(dev, size, batch, noopt):
    """The contract of fast/: a network with fast.layers' forms computes the plain network's function: the per-example
    ELBO, the loss, every parameter's gradient and the BatchNorm running statistics, each within FAST_TOLERANCE
    (fast_against_plain). In a fresh process: the tiny VLAE on DEV=CPU with tinygrad's kernel optimizations on
    (NOOPT=0), the narrow one on DEV=CL (pocl) without."""
    if dev == "CL": need_opencl()
    code = (f"import json, fast, test_vlae; fast.enable(); "           # (enable: kernels built in parallel on CL)
            f"print(json.dumps(test_vlae.fast_against_plain({size!r}, {batch})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                          env=os.environ | {"DEV": dev, "NOOPT": noopt})
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(err.values()) <= FAST_TOLERANCE, sorted(err.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.parametrize("model", ["vlae", "hvae"])
def test_fast_layers_take_every_layer_with_the_same_weights(model):
    """fast.layers.accelerate gives every tinygrad layer of either model its fast form, in place: the same Tensors
    under the same names (so checkpoints and the PyTorch mirror's state dicts load either way)."""
    Tensor.manual_seed(0)
    net = checkpoint.MODELS[model](ModelConfig(model=model, size="tiny"))
    before = vlae.weights(net)
    fast.layers.accelerate(net)
    after = vlae.weights(net)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    owners = []
    def walk(obj):
        if isinstance(obj, list): [walk(o) for o in obj]
        elif isinstance(obj, (nn.Linear, nn.BatchNorm, nn.Conv2d, nn.ConvTranspose2d)): owners.append(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, Tensor): [walk(v) for v in vars(obj).values()]
    walk(net)
    assert owners and all(type(o).__module__ == "fast.layers" for o in owners), \
        sorted({type(o).__name__ for o in owners if type(o).__module__ != "fast.layers"})
    transposed = [o for o in owners if isinstance(o, fast.layers.ConvTranspose4x4s2)]
    assert [o.write_patch_grad for o in transposed] == [True] * (len(transposed) - 1) + [False]   # BN follows


def test_importing_the_models_loads_no_speed_machinery():
    """vlae.py and hvae.py read as the paper: importing them loads no fast/ module and no tinygrad module beyond what
    `import tinygrad, tinygrad.nn` loads, and changes no environment variable."""
    code = """import json, os, sys
env = dict(os.environ)
import tinygrad, tinygrad.nn
before = set(sys.modules)
import vlae, hvae
new = sorted(m for m in set(sys.modules) - before if m.startswith(("tinygrad", "fast", "kernels")))
print(json.dumps({"new": new, "env_changed": dict(os.environ) != env}))"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"new": [], "env_changed": False}


def test_program_cache_is_loaded_only_when_trusted(tmp_path, monkeypatch, capsys):
    """The kernel cache is a pickle, which runs code when read: a cache file or folder that others may write is
    ignored (and not written to), with one line on stderr saying why."""
    import stat as st
    monkeypatch.setattr(fast.cache, "CACHEDB", str(tmp_path / "cache.db"))
    monkeypatch.setattr(fast.cache, "_untrusted", set())
    path = fast.cache.program_cache_path()
    path.write_bytes(b"not a pickle: reading it would print a note")
    for folder_mode, file_mode in ((0o777, 0o644), (0o755, 0o666)):
        monkeypatch.setattr(fast.cache, "_untrusted", set())
        tmp_path.chmod(folder_mode)
        path.chmod(file_mode)
        monkeypatch.setattr(fast.cache, "_saved", {"programs": 0, "schedules": 0, "searched": set(),
                                                   "other_settings": {}, "stat": None, "dirty": True})
        fast.cache.load_programs()
        fast.cache.save_programs()
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "ignoring the kernel cache" in err[0] and "unreadable" not in err[0], err
        assert path.read_bytes().startswith(b"not a pickle")                  # not replaced either
    tmp_path.chmod(0o700)
    path.chmod(0o600)
    fast.cache.load_programs()
    assert "ignoring the unreadable kernel cache" in capsys.readouterr().err         # trusted: read (and unreadable)


def test_program_cache_round_trip(tmp_path, monkeypatch, capsys):
    """Compiled kernels saved by one run are used by the next (tinygrad does not lower them again), and so are
    schedules, under the same settings only; an unreadable cache file is ignored with a note, and VLAE_PROGRAM_CACHE=0
    turns the cache off."""
    import tinygrad.codegen, tinygrad.schedule
    monkeypatch.setattr(fast.cache, "CACHEDB", str(tmp_path / "cache.db"))
    monkeypatch.setattr(tinygrad.codegen, "to_program_cache", {})
    schedules = tinygrad.schedule.schedule_cache        # (emptied in place: tinygrad's rewrite rules hold this dict)
    kept = dict(schedules)
    schedules.clear()
    try:
        program_cache_round_trip(tmp_path, monkeypatch, capsys, schedules)
    finally:
        schedules.update(kept)


def program_cache_round_trip(tmp_path, monkeypatch, capsys, schedules):
    import tinygrad.codegen
    monkeypatch.setattr(fast.cache, "_saved", {"programs": 0, "schedules": 0, "searched": set(), "other_settings": {},
                                            "stat": None})
    x = Tensor(np.arange(12, dtype=np.float32).reshape(3, 4))
    np.testing.assert_allclose((x * 3 + 1).sum(axis=1).numpy(), [22, 70, 118])
    fast.cache.save_programs()
    path = fast.cache.program_cache_path()
    assert path.parent == tmp_path and path.exists() and len(tinygrad.codegen.to_program_cache) > 0
    saved = set(schedules)
    assert len(saved) > 0
    tinygrad.codegen.to_program_cache.clear()
    schedules.clear()
    fast.cache.load_programs()                     # the file this process wrote, unchanged: not read again
    assert len(tinygrad.codegen.to_program_cache) == 0 and len(schedules) == 0
    fast.cache._saved["stat"] = None                                       # from here on, as a new process
    monkeypatch.setenv("BEAM", "3")                                     # other settings: their own schedules
    fast.cache.load_programs()
    assert len(tinygrad.codegen.to_program_cache) > 0 and len(schedules) == 0
    monkeypatch.delenv("BEAM")
    fast.cache.load_programs()
    assert set(schedules) == saved                                       # (keyed by the graph's structure)
    def no_lowering(*args): raise AssertionError("a cached kernel was lowered again")
    monkeypatch.setattr(tinygrad.codegen, "do_to_program", no_lowering)
    y = Tensor(np.ones((3, 4), dtype=np.float32))
    np.testing.assert_allclose((y * 3 + 1).sum(axis=1).numpy(), [16, 16, 16])     # same kernels, new data
    # a graph through matmul_nt (a custom gradient) has the same text in every process: no address in it
    fast.cache.name_custom_gradients()
    call = next(u for u in fast.layers._matmul_nt(x, y).uop.toposort() if u.op is Ops.FUNCTION).arg
    assert "matmul_nt" in repr(call) and str(id(fast.layers._matmul_nt_grad)) not in repr(call)
    path.write_bytes(b"not a pickle")
    fast.cache.load_programs()
    assert "ignoring the unreadable kernel cache" in capsys.readouterr().err
    monkeypatch.setenv("VLAE_PROGRAM_CACHE", "0")
    assert fast.cache.program_cache_path() is None


def test_kernel_search_keeps_a_kernel_only_where_it_is_faster(monkeypatch):
    """After the search, search_slowest times the step again with the searched kernels (fast.search.step_program_times)
    and fast.search.keep_faster puts tinygrad's default program back where the searched one was not faster per call (a
    greedy BEAM from the unoptimized kernel can end slower than tinygrad's heuristics). Programs stand in as named
    objects here: a real search takes minutes."""
    import tinygrad.codegen
    from types import SimpleNamespace
    program = lambda name: SimpleNamespace(arg=SimpleNamespace(name=name))
    cache = {}
    monkeypatch.setattr(tinygrad.codegen, "to_program_cache", cache)
    found = []                                # (key, default, searched, ms per step before, calls per step before)
    for i, (ms_before, calls, sec_after, calls_after) in enumerate([(10.0, 2, 0.004, 2), (10.0, 2, 0.012, 2),
                                                                   (10.0, 3, 0.003, 1), (10.0, 3, 0.004, 1)]):
        default, searched = program(f"r_{i}"), program(f"searched_{i}")
        cache[("key", i)] = searched                  # what the search left in the cache
        found.append((("key", i), default, searched, ms_before, calls, sec_after, calls_after))
    found.append((("key", 9), program("r_9"), program("searched_9"), 10.0, 1, None, None))   # not run again
    cache[("key", 9)] = found[-1][2]
    after = {id(f[2]): [f[5], f[6], f[2]] for f in found if f[5] is not None}
    report = fast.search.keep_faster([f[:5] for f in found], after)
    assert [(name, kept) for name, _, _, kept in report] == [("r_0", True), ("r_1", False), ("r_2", True),
                                                             ("r_3", False), ("r_9", False)]
    assert [round(r[2], 6) for r in report[:4]] == [4.0, 12.0, 9.0, 12.0]      # per call, times the calls before
    assert [cache[("key", i)] for i in (0, 1, 2, 3, 9)] == [found[0][2], found[1][1], found[2][2], found[3][1],
                                                             found[4][1]]


@pytest.mark.parametrize("searched_ms, kept", [(1.0, True), (6.0, False)])
def test_kernel_search_keeps_kernels_only_where_the_whole_step_is_faster(monkeypatch, searched_ms, kept):
    """fast.search.keep_if_step_faster: two trainers, one captured with the searched programs in tinygrad's kernel cache
    and one with the default ones, step in turn; the searched programs stay only if the step with them is faster
    (a real search takes minutes: here a trainer's step sleeps as long as its programs take)."""
    import tinygrad.codegen
    from types import SimpleNamespace
    cache = {}
    monkeypatch.setattr(tinygrad.codegen, "to_program_cache", cache)
    default, searched = SimpleNamespace(ms=3.0), SimpleNamespace(ms=searched_ms)
    cache["key"] = searched                               # what keep_faster left there
    class Trainer:                                        # as train.Trainer: the programs are fixed when it is made
        def __init__(self): self.ms = cache["key"].ms
        def step(self, x, beta):
            time.sleep(self.ms / 1e3)
            return SimpleNamespace(numpy=lambda: None)
    report, with_them, without = fast.search.keep_if_step_faster(Trainer, None, None,
                                                                [("key", default, searched, 9, 1)],
                                                                [("r_0", 9.0, 2.0, True)], reps=5)
    assert report == [("r_0", 9.0, 2.0, kept)] and (with_them < without) == kept
    assert cache["key"] is (searched if kept else default) and without >= 3e-3 and with_them >= searched_ms / 1e3


@pytest.mark.parametrize("combiner", ["concat", "gated"])
def test_gradients_reach_every_layer(combiner):
    model = tiny(combiner=combiner)
    params = {k: t for k, t in get_state_dict(model).items() if t.is_param and "running" not in k}
    for t in params.values(): t.requires_grad = True
    x = Tensor(np.random.default_rng(0).uniform(size=(4, 1, 28, 28)).astype(np.float32))
    with Context(TRAINING=1):
        (-model.elbo(x).elbo.mean()).backward()
    grads = {k: t.grad for k, t in params.items()}
    Tensor.realize(*[g for g in grads.values() if g is not None])
    missing = [k for k, g in grads.items() if g is None or not np.abs(g.numpy()).sum() > 0]
    assert not missing, f"no gradient reaches {missing}"
    assert (len(model.gate) == 2) == (combiner == "gated")
    if combiner == "gated": np.testing.assert_allclose(model.gate[0].numpy(), 0.1)


def test_generated_images_are_a_function_of_the_noise():
    """arrays.generate_images: noise of any leading shape, padded to the jit's batch, gives the same images as the
    model's own generate on those rows."""
    model = tiny()
    eps = [np.random.default_rng(3).standard_normal((2, 3, 2)).astype(np.float32) for _ in range(3)]
    a = arrays.generate_images(model, eps)
    assert a.shape == (2, 3, 1, 28, 28) and ((a >= 0) & (a <= 1)).all()
    b = model.generate([Tensor(e.reshape(6, 2)) for e in eps]).numpy().reshape(a.shape)
    np.testing.assert_allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------------------------- HVAE

def tiny_hvae(**kw) -> HVAE:
    Tensor.manual_seed(0)
    return HVAE(ModelConfig(**(TINY | {"model": "hvae"} | kw)))


def test_hvae_elbo_parts_add_up_and_match_eq5():
    model = tiny_hvae(latent_dims=(2, 3, 4))
    x = Tensor(np.random.default_rng(0).uniform(size=(4, 1, 28, 28)).astype(np.float32))
    Tensor.manual_seed(5)
    out = model.elbo(x)
    elbo, recon, kl = out.elbo.numpy(), out.recon.numpy(), np.stack([k.numpy() for k in out.kl])
    assert np.isfinite(elbo).all() and kl.shape == (3, 4)
    np.testing.assert_allclose(elbo, recon - kl.sum(0), rtol=1e-5, atol=1e-3)
    # the same z path through the densities by hand: log p(x|z1) + sum log p(z_l|z_l+1) + log p(zL) - sum log q
    Tensor.manual_seed(5)
    zs, log_q, h = [], 0, x
    for q in model.q:
        mu, sigma = h.sequential(q)
        z = mu + sigma * Tensor.randn(*mu.shape)
        log_q, h = log_q + gaussian_log_prob(z, mu, sigma).numpy(), z
        zs.append(z)
    log_p = sum(gaussian_log_prob(z, mu, s).numpy() for z, (mu, s) in zip(zs, model.prior_params(zs)))
    log_p = log_p - 0.5 * (zs[-1].numpy() ** 2).sum(1) - 4 * 0.5 * np.log(2 * np.pi)   # p(z_3) = N(0, I_4)
    want = log_likelihood(x, model.decode_logits(zs), model.cfg).numpy() + log_p - log_q
    np.testing.assert_allclose(elbo, want, rtol=1e-4, atol=1e-2)


def test_hvae_params_within_25_percent_of_vlae():
    for size in ("tiny", "narrow", "paper"):
        a, b = n_params(VLAE(ModelConfig(size=size))), n_params(HVAE(ModelConfig(model="hvae", size=size)))
        assert 0.75 <= b / a <= 1.25, (size, a, b)


def perturbed(model, parts):
    for t in get_state_dict(parts).values():
        if t.is_param: t.replace((t * 1.5 + 0.1).realize())
    return model


def test_gibbs_chain_ignores_upper_layers():
    model = tiny_hvae()
    Tensor.manual_seed(7)
    chain = model.gibbs_chain(4, steps=3)
    assert chain.shape == (4, 4, 1, 28, 28) and ((chain >= 0) & (chain <= 1)).all()
    assert not np.array_equal(chain[1], chain[2])
    # perturb every weight of q(z_l+1 | z_l) and p(z_l | z_l+1): the seeded chain is unchanged
    model = tiny_hvae()
    perturbed(model, {"q": model.q[1:], "p": model.p})
    Tensor.manual_seed(7)
    np.testing.assert_array_equal(model.gibbs_chain(4, steps=3), chain)
    # ... while perturbing q(z_1 | x) does change it (the check above can fail)
    model = tiny_hvae()
    perturbed(model, model.q[0])
    Tensor.manual_seed(7)
    assert not np.allclose(model.gibbs_chain(4, steps=3)[1:], chain[1:])
    # started from data, with the mean option
    x0 = Tensor(np.random.default_rng(0).uniform(size=(2, 1, 28, 28)).astype(np.float32))
    assert model.gibbs_chain(x0, steps=2, sample_x=False).shape == (3, 2, 1, 28, 28)


def test_hvae_fixed_eps_and_one_layer_resampling():
    model = tiny_hvae()
    for t in get_state_dict(model.p).values():          # N(0, 0.02) weights make z_1 depend on z_3 below
        if t.is_param and t.ndim == 2: t.replace((t * 20).realize())   # float32 resolution: scale them up
    rng = np.random.default_rng(0)
    eps = [Tensor(rng.standard_normal((5, 2)).astype(np.float32)) for _ in range(3)]
    np.testing.assert_array_equal(model.generate(eps).numpy(), model.generate(eps).numpy())
    base = [z.numpy() for z in model.generate_latents(eps)]
    for layer in range(3):
        new = list(eps)
        new[layer] = Tensor(rng.standard_normal((5, 2)).astype(np.float32))
        zs = [z.numpy() for z in model.generate_latents(new)]
        for k in range(3):
            changed = not np.array_equal(zs[k], base[k])
            assert changed == (k <= layer), f"resampling eps_{layer + 1} {'changed' if changed else 'kept'} z_{k + 1}"


# --------------------------------------------------------------------------------------------- data

def test_mnist_loader_on_real_files():
    folder = mnist_folder()
    ds = data.load_dataset("mnist", str(folder))
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == np.float32 and ds.train_x.min() == 0.0 and ds.train_x.max() == 1.0
    # the published class counts of MNIST
    assert np.bincount(ds.train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(ds.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    xb, yb = next(data.batches(ds.train_x, ds.train_y, 32, seed=0, epoch=0))
    xb2, _ = next(data.batches(ds.train_x, ds.train_y, 32, seed=0, epoch=0))
    xb3, _ = next(data.batches(ds.train_x, ds.train_y, 32, seed=0, epoch=1))
    assert xb.shape == (32, 1, 28, 28) and yb.shape == (32,)
    np.testing.assert_array_equal(xb, xb2)
    assert not np.array_equal(xb, xb3)
    xbin, _ = next(data.batches(ds.train_x, ds.train_y, 32, seed=0, epoch=0, binarize=True))
    assert set(np.unique(xbin)) <= {0.0, 1.0} and abs(xbin.mean() - xb.mean()) < 0.03


@pytest.fixture
def mnist_copy(tmp_path):
    """A writable copy of the MNIST folder (label files only need to be real; images are copied too)."""
    src = mnist_folder()
    dst = tmp_path / "mnist"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("README*"))
    return dst


def test_truncated_file_gives_clear_error(mnist_copy):
    f = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz is truncated"):
        data.load_dataset("mnist", str(mnist_copy.parent))


def test_corrupt_file_gives_clear_error(mnist_copy):
    f = mnist_copy / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[500] = (raw[500] + 1) % 10                     # one wrong label: still a valid idx file
    f.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.DataError, match=r"is corrupt: md5 .* expected 27ae3e4e"):
        data.load_dataset("mnist", str(mnist_copy.parent))


def test_wrong_magic_gives_clear_error():
    with pytest.raises(data.DataError, match="bad magic .*: replace it"):
        files.parse_idx(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", "x")
    with pytest.raises(data.DataError, match="truncated inside its header"):
        files.parse_idx(b"\x00\x00\x08\x03\x00\x00\x00\x01", "x")


def test_missing_files_without_network_give_clear_error(tmp_path):
    mirror = tmp_path / "no-such-mirror"
    with pytest.raises(data.DataError, match="could not be downloaded"):
        data.load_mnist([tmp_path / "data"], mirrors=[mirror.as_uri() + "/"])


def test_download_from_mirror(tmp_path):
    """The download path, run against a local file:// mirror holding the .gz files."""
    mirror = mnist_folder()
    if not all((mirror / (f + ".gz")).exists() for f in data.MNIST_FILES): pytest.skip("mirror needs .gz files")
    ds = data.load_mnist([tmp_path / "data"], mirrors=[mirror.resolve().as_uri() + "/"])
    assert len(ds.test_y) == 10000 and (tmp_path / "data/mnist/t10k-labels-idx1-ubyte.gz").exists()


def idx_gz(path: Path, arr: np.ndarray) -> bytes:
    """Write arr as a gzipped unsigned-byte idx file (magic 0x0000080n, big-endian sizes, data); return its bytes."""
    raw = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + arr.astype(np.uint8).tobytes()
    path.write_bytes(gz := gzip.compress(raw))
    return gz


def test_fashion_mnist_download_md5_of_gz_and_errors(tmp_path, monkeypatch):
    """Fashion-MNIST's published md5s are of the .gz files: checked on a .gz, not on an uncompressed copy."""
    rng, mirror = np.random.default_rng(0), tmp_path / "mirror"
    mirror.mkdir()
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)), "train-labels-idx1-ubyte": np.arange(5),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28)), "t10k-labels-idx1-ubyte": np.arange(3) + 7}
    for name, arr in arrays.items():
        monkeypatch.setitem(data.FASHION_FILES, name, hashlib.md5(idx_gz(mirror / (name + ".gz"), arr)).hexdigest())
    ds = data.load_fashion_mnist([tmp_path / "data"], mirrors=[mirror.as_uri() + "/"])     # downloads from file://
    assert ds.name == "fashion-mnist" and ds.train_x.shape == (5, 1, 28, 28) and ds.test_x.shape == (3, 1, 28, 28)
    assert ds.train_x.dtype == np.float32 and ds.test_y.tolist() == [7, 8, 9]
    np.testing.assert_array_equal(ds.train_x[:, 0] * 255, arrays["train-images-idx3-ubyte"])
    folder = tmp_path / "data/fashion-mnist"
    labels = folder / "t10k-labels-idx1-ubyte"
    labels.write_bytes(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    assert data.load_dataset("fashion-mnist", str(tmp_path / "data")).test_y.tolist() == [7, 8, 9]   # unchecked
    idx_gz(folder / "t10k-labels-idx1-ubyte.gz", np.arange(3))                                      # re-gzipped
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte.gz is corrupt: md5 of the .gz file .* expected"):
        data.load_dataset("fashion-mnist", str(tmp_path / "data"))
    with pytest.raises(data.DataError, match="could not be downloaded"):
        data.load_fashion_mnist([tmp_path / "empty"], mirrors=[(tmp_path / "no-such-mirror").as_uri() + "/"])


def mat_file(variables: dict, compress: bool) -> bytes:
    """A MATLAB v5 .mat file written from the format spec, independently of files.read_mat: a 128-byte header, then
    per variable an miMATRIX element (flags, dimensions, name, column-major data), zlib-compressed in an miCOMPRESSED
    element if asked. Names of <= 4 bytes use the small element format, as the spec has MATLAB write them. A variable
    given as (array, stored dtype) is stored in a smaller type than its class, which the spec allows (scipy's loadmat
    has its mat_dtype option for it): a double y of small integers stored as uint8."""
    mx_class = {np.dtype(np.uint8): 9, np.dtype(np.float64): 6}
    mi_type = {np.dtype(np.int8): 1, np.dtype(np.uint8): 2, np.dtype(np.int32): 5, np.dtype(np.uint32): 6,
               np.dtype(np.float64): 9}

    def element(dtype, payload: bytes) -> bytes:
        mtype = mi_type[np.dtype(dtype)]
        if len(payload) <= 4: return struct.pack("<HH", mtype, len(payload)) + payload.ljust(4, b"\0")   # small
        return struct.pack("<II", mtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)
    out = [b"MATLAB 5.0 MAT-file, written by test_vlae.py".ljust(116) + bytes(8) + struct.pack("<H", 0x0100) + b"IM"]
    for name, value in variables.items():
        arr, stored = value if isinstance(value, tuple) else (value, value.dtype)
        body = (element(np.uint32, struct.pack("<II", mx_class[arr.dtype], 0)) +
                element(np.int32, np.array(arr.shape, "<i4").tobytes()) +
                element(np.int8, name.encode()) + element(stored, arr.astype(stored).tobytes(order="F")))
        matrix = struct.pack("<II", 14, len(body)) + body                                     # 14: miMATRIX
        out.append(struct.pack("<II", 15, len(z := zlib.compress(matrix))) + z if compress else matrix)  # 15: zlib
    return b"".join(out)


def svhn_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), rng.integers(1, 11, (n, 1)).astype(np.float64)


@pytest.mark.parametrize("compress", [False, True])
def test_read_mat_matches_the_writer(compress):
    X, y = svhn_like(4, 0)
    arrays = files.read_mat(mat_file({"X": X, "y": (y, np.uint8), "y2": y}, compress), "t.mat")
    assert sorted(arrays) == ["X", "y", "y2"] and arrays["X"].dtype == np.uint8 and arrays["y"].dtype == np.float64
    for name, want in (("X", X), ("y", y), ("y2", y)):
        assert arrays[name].shape == want.shape
        np.testing.assert_array_equal(arrays[name], want)


@pytest.fixture
def svhn_root(tmp_path, monkeypatch):
    """A data root with svhn/train_32x32.mat (plain elements, y stored as doubles) and test_32x32.mat (compressed,
    y stored as uint8), the md5 table pointed at these files; returns (root, train X, train y)."""
    (folder := tmp_path / "svhn").mkdir()
    X, y = svhn_like(6, 1)
    y[:2] = 10                                                               # the digit 0
    for name, variables, compress in (("train_32x32.mat", {"X": X, "y": y}, False),
                                      ("test_32x32.mat", {"X": svhn_like(3, 2)[0], "y": (svhn_like(3, 2)[1], np.uint8)},
                                       True)):
        (folder / name).write_bytes(raw := mat_file(variables, compress))
        monkeypatch.setitem(data.SVHN_FILES, name, hashlib.md5(raw).hexdigest())
    return tmp_path, X, y


def test_svhn_loader(svhn_root):
    root, X, y = svhn_root
    ds = data.load_dataset("svhn", str(root))
    assert ds.train_x.shape == (6, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32) and ds.image_shape == (3, 32, 32)
    assert ds.train_x.dtype == np.float32 and 0 <= ds.train_x.min() and ds.train_x.max() <= 1
    # x[n, c, i, j] is MATLAB's X(i, j, c, n): row i, column j
    np.testing.assert_array_equal(ds.train_x * 255, X.transpose(3, 2, 0, 1).astype(np.float32))
    assert ds.train_y.tolist() == [0, 0] + y[2:, 0].astype(int).tolist() and ds.train_y.dtype == np.int64
    assert 0 <= ds.test_y.min() and ds.test_y.max() <= 9


def test_svhn_errors_are_clear(svhn_root, monkeypatch, tmp_path):
    root, X, y = svhn_root
    train = root / "svhn/train_32x32.mat"
    raw = train.read_bytes()
    with pytest.raises(data.DataError, match="is truncated or not a valid .mat file"):
        files.read_mat(raw[:len(raw) - 100], train)
    with pytest.raises(data.DataError, match="is truncated or not a valid .mat file"):               # zlib stream cut
        files.read_mat(mat_file({"X": X}, compress=True)[:-20], train)
    with pytest.raises(data.DataError, match="is not a MATLAB v5 .mat file"):
        files.read_mat(b"\x00" * 200, train)
    with pytest.raises(data.DataError, match="MATLAB 7.3 .* re-save it with -v7"):
        files.read_mat(b"MATLAB 7.3 MAT-file" + bytes(600), train)
    train.write_bytes(raw[:-100])                                                    # the md5 check comes first
    with pytest.raises(data.DataError, match=r"train_32x32.mat is corrupt: md5 is \w+, expected .*: delete it"):
        data.load_dataset("svhn", str(root))
    train.write_bytes(mat_file({"X": X[:, :, :2], "y": y}, compress=False))         # valid .mat, wrong contents
    monkeypatch.setitem(data.SVHN_FILES, "train_32x32.mat", hashlib.md5(train.read_bytes()).hexdigest())
    with pytest.raises(data.DataError, match=r"holds .*, not X \(32x32x3xN uint8\)"):
        data.load_dataset("svhn", str(root))
    with pytest.raises(data.DataError, match="could not be downloaded .*: download them from http://ufldl"):
        data.load_svhn([tmp_path / "empty"], mirrors=[(tmp_path / "no-such-mirror").as_uri() + "/"])


def celeba_jpegs(folder: Path, n: int, start: int = 1) -> list[np.ndarray]:
    """n JPEGs of 178x218 named like CelebA's: the central 108x108 one colour, the border another; returns the
    colours."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = []
    for i in range(start, start + n):
        colour = np.array([(37 * i) % 256, (91 * i) % 256, (151 * i) % 256], np.uint8)
        img = np.full((218, 178, 3), 255 - colour, np.uint8)
        img[55:55 + 108, 35:35 + 108] = colour                 # the authors' crop: rows 55.., columns 35..
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=95, subsampling=0)     # 4:4:4: no colour bleed
        colours.append(colour)
    return colours


def test_celeba_loader_cache_and_split(tmp_path, monkeypatch):
    colours = celeba_jpegs(tmp_path / "celeba/img_align_celeba", 12)
    t0 = time.perf_counter()
    ds = data.load_dataset("celeba", str(tmp_path))
    first = time.perf_counter() - t0
    assert ds.train_x.shape == (10, 3, 64, 64) and ds.test_x.shape == (2, 3, 64, 64)    # the last 10%, rounded up
    assert ds.train_x.dtype == np.uint8 and not ds.labelled and not ds.train_y.any() and ds.image_shape == (3, 64, 64)
    x = np.concatenate([ds.train_x, ds.test_x]).astype(int)
    # the crop keeps only the centre: every pixel, edges included, is within JPEG noise of its image's colour
    assert np.abs(x - np.array(colours)[:, :, None, None]).max() <= 8
    xb, yb = next(data.batches(ds.train_x, ds.train_y, 4, seed=0, epoch=0))
    assert xb.dtype == np.float32 and xb.shape == (4, 3, 64, 64) and 0 <= xb.min() and xb.max() <= 1
    np.testing.assert_array_equal(data.as_float(ds.test_x), ds.test_x / np.float32(255))
    caches = list((tmp_path / "celeba").glob("img_align_celeba.64x64.*.npy"))
    assert len(caches) == 1 and not list((tmp_path / "celeba").glob("*.part"))

    def no_decoding(path, crop, size): raise AssertionError(f"{path} decoded again")
    with monkeypatch.context() as m:
        m.setattr(files, "decode_jpeg", no_decoding)
        t0 = time.perf_counter()
        again = data.load_dataset("celeba", str(tmp_path))
        assert time.perf_counter() - t0 < max(0.5, first)
    np.testing.assert_array_equal(again.train_x, ds.train_x)

    celeba_jpegs(tmp_path / "celeba/img_align_celeba", 1, start=13)           # a new file: decode all, new cache
    decoded = []
    decode = files.decode_jpeg
    monkeypatch.setattr(files, "decode_jpeg", lambda path, *a: decoded.append(path) or decode(path, *a))
    grown = data.load_dataset("celeba", str(tmp_path))
    assert len(decoded) == 13 and len(grown.train_x) + len(grown.test_x) == 13
    assert [c.name for c in (tmp_path / "celeba").glob("*.npy")] != [caches[0].name]     # the old cache is gone
    assert len(list((tmp_path / "celeba").glob("*.npy"))) == 1


def test_celeba_partition_file_and_errors(tmp_path, monkeypatch):
    folder = tmp_path / "celeba"
    with pytest.raises(data.DataError, match="download img_align_celeba.zip by hand .*kaggle"):
        data.load_dataset("celeba", str(tmp_path))
    folder.mkdir()
    (folder / "img_align_celeba.zip").write_bytes(b"PK")
    with pytest.raises(data.DataError, match="img_align_celeba.zip is not unzipped: run `unzip"):
        data.load_dataset("celeba", str(tmp_path))
    (folder / "img_align_celeba").mkdir()
    with pytest.raises(data.DataError, match="holds no .jpg files: unzip img_align_celeba.zip"):
        data.load_dataset("celeba", str(tmp_path))
    celeba_jpegs(folder / "img_align_celeba", 4)
    partition = folder / "list_eval_partition.txt"
    partition.write_text("000001.jpg 0\n000002.jpg 2\n000003.jpg 1\n000004.jpg 0\n")
    with pytest.raises(data.DataError, match=r"list_eval_partition.txt is corrupt: md5 is \w+, expected d32c9cbf"):
        data.load_dataset("celeba", str(tmp_path))
    monkeypatch.setattr(data, "CELEBA_PARTITION_MD5", hashlib.md5(partition.read_bytes()).hexdigest())
    ds = data.load_dataset("celeba", str(tmp_path))                          # partitions 0 and 1 train, 2 tests
    assert len(ds.train_x) == 3 and len(ds.test_x) == 1
    np.testing.assert_array_equal(ds.test_x[0], files.decode_jpeg(folder / "img_align_celeba/000002.jpg", 108, 64))
    (folder / "img_align_celeba/000005.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    partition.unlink()
    with pytest.raises(data.DataError, match="000005.jpg is not a readable image .*: delete it"):
        data.load_dataset("celeba", str(tmp_path))


@pytest.mark.parametrize("dataset", ["svhn", "celeba"])
def test_four_layer_configurations_train_on_colour_data(dataset, svhn_root, tmp_path):
    """The paper's 4-layer settings (SVHN: codes 5/5/5/10, CelebA: 10 x 4) train on the synthetic files above:
    a finite loss every step, a checkpoint with the right config, and colour PNGs. (tiny network, a few steps)"""
    root = svhn_root[0]
    if dataset == "celeba": celeba_jpegs(root / "celeba/img_align_celeba", 8)
    out = tmp_path / "run"
    metrics = run_train(["--dataset", dataset, "--data-dir", str(root), "--size", "tiny", "--epochs", "1",
                         "--batch-size", "2", "--log-every", "1", "--out", str(out)])
    shape, dims = {"svhn": ((3, 32, 32), [5, 5, 5, 10]), "celeba": ((3, 64, 64), [10, 10, 10, 10])}[dataset]
    assert metrics["step"] == 3 and np.isfinite(metrics["test_elbo"]) and len(metrics["test_kl"]) == 4
    cfg = checkpoint.read_checkpoint(out / "checkpoint.safetensors")[1]["config"]
    assert list(cfg["latent_dims"]) == dims and tuple(cfg["image_shape"]) == shape
    log = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["train_log"]
    assert len(log) == 3 and all(np.isfinite([p["loss"], *p["kl"]]).all() and len(p["kl"]) == 4 for p in log)
    with Image.open(out / "samples.png") as img: assert img.mode == "RGB"


def test_unknown_dataset_lists_all_four():
    with pytest.raises(data.DataError, match="'cifar': choose one of mnist, fashion-mnist, svhn, celeba$"):
        data.load_dataset("cifar")


# --------------------------------------------------------------------------------------------- training

def run_train(argv):
    args = train.parse_args(argv)
    return train.train(args)


def assert_one_line_errors(main, cases, capsys, extra=()):
    """Each (argv, pattern): main(argv + extra) exits with code 2 and prints exactly one line, matching pattern."""
    for argv, pattern in cases:
        assert main(argv + list(extra)) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(pattern, err[0]), err


def copy_run(run: Path, folder: Path, **meta) -> Path:
    """folder/checkpoint.safetensors: the run's checkpoint with some of its metadata replaced (the header rewritten
    by hand, the tensor bytes kept)."""
    raw = (run / checkpoint.CHECKPOINT).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] |= {k: json.dumps(v) for k, v in meta.items()}
    head = json.dumps(header).encode()
    folder.mkdir()
    (folder / checkpoint.CHECKPOINT).write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n:])
    return folder


def test_bad_flags_exit_with_one_line(run, capsys, tmp_path):
    cases = [(["--epochs", "0"], "--epochs must be >= 1"), (["--epochs", "-1"], "--epochs must be >= 1"),
             (["--batch-size", "0"], "--batch-size must"), (["--lr", "-1"], "--lr must be > 0"),
             (["--lr", "0"], "--lr must be > 0"), (["--latent-dims", "2,x"], "not a comma-separated"),
             (["--latent-dims", "2"], "at least 2 layers"), (["--latent-dims", "2,0"], "each of size >= 1"),
             (["--dataset", "cifar"], "unknown dataset")]
    assert_one_line_errors(train.main, [(a, re.escape(m)) for a, m in cases], capsys, ["--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()

    # --resume with flags that contradict the checkpoint, or weights that do not fit its config: nothing is written
    _, meta = checkpoint.read_checkpoint(run)
    flags = meta["train"] | {"batch_size": 50, "seed": 0, "subset": 1000, "epochs": 1}
    ok = copy_run(run, tmp_path / "ok", train=flags)
    wrong = copy_run(run, tmp_path / "wrong", train=flags, config=meta["config"] | {"model": "hvae"})
    files = folder_contents(tmp_path)
    cases = [(["--out", str(ok), "--batch-size", "100"], "trained with --batch-size 50, not 100; drop that flag"),
             (["--out", str(ok), "--seed", "1"], "trained with --seed 0, not 1"),
             (["--out", str(ok), "--model", "hvae"], "trained with model=vlae, not hvae"),
             (["--out", str(ok), "--latent-dims", "2,2"], r"latent_dims=\(2, 2, 2\), not \(2, 2\)"),
             (["--out", str(wrong), "--model", "hvae"], "holds weights that do not fit the HVAE"),
             (["--out", str(tmp_path / "none")], "no checkpoint in")]
    assert_one_line_errors(train.main, cases, capsys, ["--resume"])
    assert_one_line_errors(train.main, [(["--out", str(ok)], "already exists: pass --resume")], capsys)
    assert folder_contents(tmp_path) == files


def test_missing_checkpoint_gives_clear_error(tmp_path):
    with pytest.raises(checkpoint.UserError, match="no checkpoint .* train one first"):
        checkpoint.load_model(tmp_path)
    (tmp_path / checkpoint.CHECKPOINT).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(checkpoint.UserError, match="not a readable checkpoint"):
        checkpoint.load_model(tmp_path)


@pytest.fixture
def small_test_set(monkeypatch):
    """train.py evaluates on the first 500 test images instead of 10000: a full pass costs ~17 s per epoch on 2 CPU
    cores, and the training tests check the training loop, not the number."""
    load = train.load_dataset

    def first_500(*args, **kwargs):
        ds = load(*args, **kwargs)
        return dataclasses.replace(ds, test_x=ds.test_x[:500], test_y=ds.test_y[:500])
    monkeypatch.setattr(train, "load_dataset", first_500)


def comparable(metrics_file: Path) -> list[dict]:
    """The lines of a metrics.jsonl without their timings."""
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in ("epoch_seconds", "images_per_second")} for m in lines]


@pytest.mark.parametrize("model", ["vlae", "hvae"])
def test_training_lowers_loss_and_resumes(tmp_path, model, small_test_set, monkeypatch):
    """A short run on 1000 real MNIST images: the test ELBO improves, files are written, the checkpoint rebuilds a
    model with identical outputs. For the VLAE: a run stopped by SIGINT mid-epoch and resumed ends bit for bit where
    the uninterrupted one does, and a nan loss stops training naming its step."""
    mnist_folder()
    out = tmp_path / "run"
    common = ["--model", model, "--size", "tiny", "--subset", "1000", "--batch-size", "50", "--kl-warmup", "10",
              "--lr", "1e-3", "--log-every", "1"]
    run_train(common + ["--out", str(out), "--epochs", "2"])
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in m] == [1, 2] and m[1]["step"] == 40
    assert m[1]["train_loss"] < m[0]["train_loss"]
    assert m[1]["test_elbo"] > m[0]["test_elbo"]
    log = m[0]["train_log"] + m[1]["train_log"]                         # every step's terms and KL weight
    assert [p["step"] for p in log] == list(range(1, 41))                # --log-every 1
    for p in log:
        assert len(p["kl"]) == 3 and p["kl_weight"] == train.kl_weight(p["step"], 10)
        assert p["loss"] == pytest.approx(p["kl_weight"] * sum(p["kl"]) - p["recon"], rel=1e-4)
    for f in ("samples.png", "samples-epoch1.png", "reconstructions.png", "checkpoint.safetensors"):
        assert (out / f).stat().st_size > 0
    assert (out / "samples.png").read_bytes() == (out / "samples-epoch2.png").read_bytes()
    with Image.open(out / "curves.png") as im:                            # loss, recon, KL per layer, KL weight
        im.verify()
        assert im.format == "PNG" and im.width == 4 * 300

    # checkpoint round trip: same config, same weights, identical outputs
    model1, meta = checkpoint.load_model(out)
    assert meta["epoch"] == 2 and meta["config"]["size"] == "tiny" and meta["config"]["latent_dims"] == [2, 2, 2]
    model2, _ = checkpoint.load_model(out / checkpoint.CHECKPOINT)
    # the model's weights exactly: not the buffers captured by the jits that training ran on the model
    saved = checkpoint.read_safetensors(out / checkpoint.CHECKPOINT)[0]
    assert sorted(k for k in saved if k.startswith("model.")) == sorted(f"model.{k}" for k in get_state_dict(model1))
    zs = [Tensor(np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)) for _ in range(3)]
    np.testing.assert_array_equal(model1.decode(zs).numpy(), model2.decode(zs).numpy())
    assert n_params(model1) == n_params(model2)

    # the rest is the same code for both models, so it is run for one: each new training graph costs compiling
    if model == "hvae": return
    # SIGINT during step 30 (batch 10 of epoch 2): the step finishes, a checkpoint is saved there, training stops
    stopped, kl_weight = tmp_path / "stopped", train.kl_weight

    def interrupt_at_30(step, warmup):
        if step == 30: os.kill(os.getpid(), signal.SIGINT)
        return kl_weight(step, warmup)
    monkeypatch.setattr(train, "kl_weight", interrupt_at_30)
    with pytest.raises(train.Stopped, match=r"by SIGINT at step 30 \(epoch 2, batch 10 of 20\); saved") as e:
        run_train(common + ["--out", str(stopped), "--epochs", "2"])
    assert e.value.code == 130
    ckpt = stopped / checkpoint.CHECKPOINT
    meta = checkpoint.read_checkpoint(ckpt)[1]
    assert (meta["step"], meta["epoch"], meta["batch"], len(meta["log"])) == (30, 1, 10, 10)

    # a nan loss from step 33 on, first seen at the log point of step 35, stops the run naming step 33; the last
    # good checkpoint is kept as it was
    before = ckpt.read_bytes()
    monkeypatch.setattr(train, "kl_weight", lambda step, warmup: math.nan if step >= 33 else kl_weight(step, warmup))
    with pytest.raises(checkpoint.UserError, match=r"nan or inf at step 33 \(seen at step 35\).* \(step 30\)"):
        run_train(["--out", str(stopped), "--resume", "--log-every", "5"])
    assert ckpt.read_bytes() == before

    # a plain --resume (its flags come from the checkpoint) continues from batch 10 of epoch 2 and ends exactly where
    # the uninterrupted run did: the loss at every step, the epoch metrics, the weights, Adam's moments and bias
    # corrections, BatchNorm statistics and the RNG counter, all bit for bit (CPU)
    monkeypatch.setattr(train, "kl_weight", kl_weight)
    run_train(["--out", str(stopped), "--resume"])
    assert comparable(stopped / "metrics.jsonl") == comparable(out / "metrics.jsonl")
    a, b = checkpoint.read_safetensors(out / checkpoint.CHECKPOINT)[0], checkpoint.read_safetensors(ckpt)[0]
    assert a.keys() == b.keys() and {"optim.b1_t", "rng.counter", "train.totals"} <= a.keys()
    for k in a: np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    # a second run into the same folder refuses to overwrite it; --resume refuses a config that contradicts it
    with pytest.raises(checkpoint.UserError, match="already exists: pass --resume"):
        run_train(common + ["--out", str(out), "--epochs", "3"])
    with pytest.raises(checkpoint.UserError, match="trained with combiner=gated"):
        run_train(common + ["--out", str(out), "--epochs", "3", "--resume", "--combiner", "concat"])


def need_opencl() -> None:
    """Skips the test where no OpenCL platform exists, except in CI (VLAE_REQUIRE_CL=1: .ci/run installs pocl)."""
    probe = subprocess.run([sys.executable, "-c", "from tinygrad import Device; Device['CL']"], capture_output=True,
                           text=True, env=os.environ | {"DEV": "CPU"})
    if probe.returncode != 0:
        msg = "no OpenCL platform (apt-get install -y pocl-opencl-icd): " + probe.stderr.strip().splitlines()[-1]
        if os.environ.get("VLAE_REQUIRE_CL"): pytest.fail(msg)
        pytest.skip(msg)


# train.py's main with the test set cut to its first 500 images, as small_test_set does in this process
TRAIN_ON_500 = ("import dataclasses, sys, train; load = train.load_dataset; train.load_dataset = lambda *a, **k: "
                "dataclasses.replace(ds := load(*a, **k), test_x=ds.test_x[:500], test_y=ds.test_y[:500]); "
                "sys.exit(train.main())")


def test_opencl_backend_trains_saves_and_sweeps_like_the_cpu(tmp_path, small_test_set):
    """tinygrad's OpenCL backend (DEV=CL: the path of AMD, Intel and older NVIDIA GPUs; in CI, Debian's pocl runs it
    on the CPU): two training steps, the checkpoint they write loaded again by sample.py, and a sweep, each matching
    the CPU backend's numbers within float tolerance (their kernels launched by fast.cl.CLGraph). The suite's own
    device runs in this process (the tests before compiled most of its kernels), the other in fresh processes; both
    evaluate on the first 500 test images."""
    mnist_folder()
    need_opencl()
    here, results = Path(__file__).parent, {}
    for dev in ("CPU", "CL"):
        out = tmp_path / dev
        train_argv = ["--size", "tiny", "--subset", "100", "--batch-size", "50", "--epochs", "1", "--kl-warmup", "10",
                      "--lr", "1e-3", "--out", str(out / "run")]
        sample_argv = ["--run", str(out / "run"), "--sweep-layer", "1", "--grid", "3", "--panels", "1", "--scale", "1",
                       "--out", str(out)]
        if dev == Device.DEFAULT:
            assert train.main(train_argv) == 0 and sample.main(sample_argv) == 0
        else:
            for argv in (["-c", TRAIN_ON_500, *train_argv], ["sample.py", *sample_argv]):
                proc = subprocess.run([sys.executable, *argv], cwd=here, env=os.environ | {"DEV": dev},
                                      capture_output=True, text=True)
                assert proc.returncode == 0, f"DEV={dev} {argv[0]}: {proc.stderr[-2000:]}"
        with Image.open(out / "sweep-layer1.png") as im: sweep = np.asarray(im).astype(int)
        results[dev] = (json.loads((out / "run" / "metrics.jsonl").read_text()), sweep,
                        checkpoint.read_safetensors(out / "run" / checkpoint.CHECKPOINT)[0])
    (m_cpu, sweep_cpu, w_cpu), (m_cl, sweep_cl, w_cl) = results["CPU"], results["CL"]
    for key in ("train_loss", "test_elbo", "test_recon"):
        assert m_cl[key] == pytest.approx(m_cpu[key], rel=1e-4), key
    assert w_cl.keys() == w_cpu.keys() and np.array_equal(w_cl["rng.counter"], w_cpu["rng.counter"])
    # Adam's first steps are +-lr (1e-3) whatever the gradient's size, so a gradient that rounding moves across zero
    # (the biases that feed a BatchNorm have an exactly zero one) flips a step: after 2 steps a weight may differ by
    # 4e-3 (here 3.6 % of them differ by more than float precision: the biases and the weights whose gradients are
    # rounding-sized); most must agree to float precision
    cl, cpu = (np.concatenate([w[k].ravel() for k in sorted(w_cpu) if k.startswith("model.")]) for w in (w_cl, w_cpu))
    assert np.abs(cl - cpu).max() <= 4e-3 and np.isclose(cl, cpu, rtol=1e-4, atol=1e-5).mean() > 0.9
    assert sweep_cl.shape == sweep_cpu.shape and np.abs(sweep_cl - sweep_cpu).max() <= 2


CL_PROBE = """
import json, sys
import numpy as np
import tinygrad.runtime.ops_cl as ops_cl
from tinygrad import Tensor
from tinygrad.uop.ops import Ops
import fast
from fast.search import step_calls
from tinygrad import TinyJit
fast.enable()                                             # as every script starts: installs CLGraph and build_ahead
built, build = [], ops_cl.CLCompiler.compile              # programs built in this (the main) process
ops_cl.CLCompiler.compile = lambda self, src: built.append(src) or build(self, src)
rng = np.random.default_rng(0)
w = Tensor(rng.standard_normal((16, 8), dtype=np.float32)).realize()
built.clear()                                             # one kernel alone is lowered and built here
f = TinyJit(lambda x, y: ((x @ w).relu() * y + x.sum(axis=1, keepdim=True)).exp2().realize())
xs = [rng.standard_normal((4, 16), dtype=np.float32) for _ in range(5)]
ys = [rng.standard_normal((4, 8), dtype=np.float32) for _ in range(5)]
outs = [f(Tensor(x), Tensor(y)).numpy() for x, y in zip(xs, ys)]     # new input buffers at every call
want = [np.exp2(np.maximum(x @ w.numpy(), 0) * y + x.sum(1, keepdims=True)) for x, y in zip(xs, ys)]
graphs = sum(c.src[0].op is Ops.CUSTOM_FUNCTION and c.src[0].arg == "graph" for c in f.captured.linear.src)
print(json.dumps({"graphs": graphs, "kernels": len(step_calls(f)), "built_here": len(built),
                  "outs": [o.tolist() for o in outs],
                  "max_err": max(float(np.abs(o - t).max() / np.abs(t).max()) for o, t in zip(outs, want))}))
"""


def test_opencl_graph_and_build_ahead_compute_as_tinygrad_does(tmp_path):
    """fast.cl.CLGraph (a jit's kernels launched in one batch) and fast.cl.build_ahead (kernels built by tinygrad's
    worker processes), the defaults on OpenCL, against tinygrad's own launches and builds (VLAE_CL_GRAPH=0,
    VLAE_CL_BUILD_AHEAD=0), each from empty caches: the same numbers bit for bit, also when the jit's inputs are new
    buffers at every call, right against numpy; with build_ahead the main process builds none of the jit's kernels."""
    need_opencl()
    got = {}
    for on in ("1", "0"):
        env = {"DEV": "CL", "VLAE_CL_GRAPH": on, "VLAE_CL_BUILD_AHEAD": on, "CACHEDB": str(tmp_path / on / "cache.db"),
               "POCL_CACHE_DIR": str(tmp_path / on / "pocl")}
        proc = subprocess.run([sys.executable, "-c", CL_PROBE], cwd=Path(__file__).parent, capture_output=True,
                              text=True, env=os.environ | env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got[on] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["1"]["graphs"] == 1 and got["0"]["graphs"] == 0 and got["1"]["kernels"] == got["0"]["kernels"] > 1
    assert got["1"]["built_here"] == 0 < got["0"]["built_here"]
    assert got["1"]["outs"] == got["0"]["outs"] and got["1"]["max_err"] < 1e-5


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    """A real SIGTERM from another process, during the first step: the step finishes, a checkpoint is saved at step 1
    and train.py exits with 143 after one line."""
    mnist_folder()
    out = tmp_path / "run"
    argv = ["--size", "tiny", "--subset", "1000", "--batch-size", "50", "--out", str(out)]
    # without our kernel and schedule cache the first step takes tens of seconds: the signal comes during it
    env = {**os.environ, "VLAE_PROGRAM_CACHE": "0"}
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=Path(__file__).parent, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert "parameters" in proc.stderr.readline()        # the header: the handlers are in place
        time.sleep(2)                                       # well into the first step
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read().strip().splitlines()
        assert proc.wait(timeout=300) == 143
    finally:
        proc.kill()
    assert len(err) == 1 and re.match(r"stopped by SIGTERM at step 1 \(epoch 1, batch 1 of 20\); saved", err[0]), err
    _, meta = checkpoint.read_checkpoint(out)
    assert (meta["step"], meta["epoch"], meta["batch"]) == (1, 0, 1)


def test_checkpoint_writes_are_atomic(run, tmp_path, monkeypatch):
    """A full disk, or a crash between writing the temporary file and renaming it over the checkpoint, leaves the
    previous checkpoint as it was; kill -9 leaves a stray temporary file, which the next save replaces."""
    path, tmp = tmp_path / checkpoint.CHECKPOINT, tmp_path / (checkpoint.CHECKPOINT + ".tmp")
    shutil.copy(run / checkpoint.CHECKPOINT, path)
    before = path.read_bytes()
    state, meta = {"w": Tensor.ones(3).contiguous()}, {"config": {}, "step": 1}

    def full_disk(state, name, metadata):
        Path(name).write_bytes(b"the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint, "write_safetensors", full_disk)
    with pytest.raises(checkpoint.UserError,
                       match=r"could not write .* \(No space left on device\); free disk space or "
                             r"choose another --out. The previous file, if any, is untouched"):
        checkpoint.atomic_safe_save(state, path, meta)
    monkeypatch.undo()
    assert path.read_bytes() == before and not tmp.exists()

    class Killed(BaseException): pass

    def killed(src, dst): raise Killed
    monkeypatch.setattr(checkpoint.os, "replace", killed)                # dies after writing the temporary file
    with pytest.raises(Killed): checkpoint.atomic_safe_save(state, path, meta)
    monkeypatch.undo()
    assert path.read_bytes() == before and not tmp.exists()
    tmp.write_bytes(b"half a checkpoint")                           # what kill -9 at that moment leaves
    assert checkpoint.read_checkpoint(path)[1]["epoch"] == 0
    checkpoint.atomic_safe_save(state, path, meta)
    assert checkpoint.read_checkpoint(path)[1]["step"] == 1 and not tmp.exists()


def test_safetensors_files_are_standard(tmp_path):
    """checkpoint.write_safetensors writes what tinygrad's safe_load reads (and read_safetensors reads safe_save's);
    a file cut anywhere is refused."""
    state = {"w": Tensor(np.arange(6, dtype=np.float32).reshape(2, 3)), "n": Tensor(np.array(7, dtype=np.int32)),
             "c": Tensor(np.array([1, 2], dtype=np.uint32))}
    checkpoint.write_safetensors(state, str(tmp_path / "a.safetensors"), {"k": "v"})
    theirs = nn.state.safe_load(str(tmp_path / "a.safetensors"))
    for k, t in state.items(): np.testing.assert_array_equal(theirs[k].numpy(), t.numpy())
    nn.state.safe_save(state, str(tmp_path / "b.safetensors"), metadata={"k": "v"})
    ours, meta = checkpoint.read_safetensors(tmp_path / "b.safetensors")
    assert meta == {"k": "v"} and ours["n"].shape == ()                          # a 0-d tensor stays 0-d
    for k, t in state.items(): assert ours[k].dtype == t.numpy().dtype and (ours[k] == t.numpy()).all()
    raw = (tmp_path / "a.safetensors").read_bytes()
    for cut in (4, 20, len(raw) - 1):
        (tmp_path / "c.safetensors").write_bytes(raw[:cut])
        with pytest.raises(ValueError): checkpoint.read_safetensors(tmp_path / "c.safetensors")


DIMS = (2, 2, 2)


# --------------------------------------------------------------------------------------------- sample.py: latent grids

def test_grid_coordinates_are_gaussian_quantiles():
    q = vlae.normal_quantiles(10)
    assert q[0] == pytest.approx(-1.644854, abs=1e-5) and q[-1] == pytest.approx(1.644854, abs=1e-5)
    # the standard normal CDF, Phi(q) = (1 + erf(q / sqrt 2)) / 2, brings them back to evenly spaced probabilities
    cdf = [(1 + math.erf(v / math.sqrt(2))) / 2 for v in q]
    np.testing.assert_allclose(cdf, np.linspace(0.05, 0.95, 10), atol=1e-6)
    grid = vlae.quantile_grid(4)
    q4 = vlae.normal_quantiles(4)
    for r in range(4):
        for c in range(4): np.testing.assert_array_equal(grid[r, c], [q4[c], q4[r]])   # unit 1 across, unit 2 down
    # the swept layer of a grid sweep holds exactly that grid, in every panel
    eps = sample.grid_sweep(DIMS, 2, 4, 3, np.random.default_rng(0))
    for p in range(3): np.testing.assert_array_equal(eps[1][p], grid)


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_grid_sweep_varies_only_the_swept_layer(layer):
    n, panels = 5, 3
    eps = sample.grid_sweep(DIMS, layer, n, panels, np.random.default_rng(1))
    assert [e.shape for e in eps] == [(panels, n, n, d) for d in DIMS] and all(e.dtype == np.float32 for e in eps)
    for i, e in enumerate(eps):
        for p in range(panels):
            same = (e[p] == e[p, 0, 0]).all()
            assert same == (i != layer - 1), f"layer {i + 1} {'fixed' if same else 'varies'} in panel {p}"
        if i != layer - 1: assert len({e[p, 0, 0].tobytes() for p in range(panels)}) == panels   # new draw per panel
    # panel 0 does not depend on how many panels are drawn: sweep-all.png shows the first panel of each sweep
    one = sample.grid_sweep(DIMS, layer, n, 1, np.random.default_rng(1))
    for a, b in zip(one, eps): np.testing.assert_array_equal(a[0], b[0])
    # --fresh (the authors' protocol): the same grid, every other layer drawn anew for each image
    fresh = sample.grid_sweep(DIMS, layer, n, panels, np.random.default_rng(1), fresh=True)
    for i, (e, f) in enumerate(zip(eps, fresh)):
        if i == layer - 1: np.testing.assert_array_equal(e, f)
        else:
            draws = {f[p, r, c].tobytes() for p in range(panels) for r in range(n) for c in range(n)}
            assert len(draws) == panels * n * n


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_row_sweep_varies_only_the_swept_layer_within_a_row(layer):
    dims, rows, cols = (1, 3, 2), 4, 6
    eps = sample.row_sweep(dims, layer, rows, cols, np.random.default_rng(2))
    assert [e.shape for e in eps] == [(1, rows, cols, d) for d in dims]
    for i, e in enumerate(eps):
        e = e[0]
        if i == layer - 1:
            assert len({e[0, c].tobytes() for c in range(cols)}) == cols      # a new value in every column ...
            assert (e == e[:1]).all()                                           # ... the same one in every row
        else:
            assert (e == e[:, :1]).all()                                        # fixed along each row
            assert len({e[r, 0].tobytes() for r in range(rows)}) == rows        # a new draw in every row
    if dims[layer - 1] == 1: np.testing.assert_array_equal(eps[layer - 1][0, 0, :, 0], vlae.normal_quantiles(cols))


def test_layer_sweep_picks_the_figure_and_is_seeded():
    assert len(sample.layer_sweep("vlae", DIMS, 3, 4, 3, seed=0)[0]) == 3            # Fig. 5: 3 grid panels
    assert len(sample.layer_sweep("hvae", DIMS, 3, 4, 3, seed=0)[0]) == 1            # Fig. 3: resample eps_3
    assert len(sample.layer_sweep("vlae", (2, 5), 2, 4, 3, seed=0)[0]) == 1          # Fig. 6/7: a 5-D code
    for a, b in zip(sample.layer_sweep("vlae", DIMS, 1, 4, 2, 7), sample.layer_sweep("vlae", DIMS, 1, 4, 2, 7)):
        np.testing.assert_array_equal(a, b)
    seven, eight = sample.layer_sweep("vlae", DIMS, 1, 4, 2, 7), sample.layer_sweep("vlae", DIMS, 1, 4, 2, 8)
    assert not np.array_equal(seven[1], eight[1])
    np.testing.assert_array_equal(sample.shown_states(100, 5), [0, 25, 50, 75, 100])
    np.testing.assert_array_equal(sample.shown_states(3, 10), [0, 1, 2, 3])


# --------------------------------------------------------------------------------------------- PNGs from a checkpoint

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An untrained tiny VLAE checkpoint with 2-D codes at 3 layers: enough to test the plumbing, not the pictures
    (training one would cost a minute of compiling; test_training_lowers_loss_and_resumes covers that path)."""
    out = tmp_path_factory.mktemp("sample") / "run"
    out.mkdir()
    model = tiny()
    meta = {"config": model.cfg.to_dict(), "train": {"dataset": "mnist"}, "step": 0, "epoch": 0}
    checkpoint.save_checkpoint(out / checkpoint.CHECKPOINT, model, nn.optim.Adam(nn.state.get_parameters(model)), meta)
    return out


def panel_size(n: int, h: int = 28, gutter: int = 2) -> int:
    return n * (h + gutter) + gutter


def test_pngs_match_the_grid_and_the_seed(run, tmp_path, capsys):
    n, panels = 3, 2
    common = ["--run", str(run), "--grid", str(n), "--scale", "1"]
    sweep = common + ["--sweep-layer", "3", "--panels", str(panels), "--prior"]
    assert sample.main(sweep) == 0                                       # the default output folder is the run folder
    assert capsys.readouterr().out.split() == [str(run / "sweep-layer3.png"), str(run / "prior.png")]
    header, label, side = 14, files.LABEL_H, panel_size(n)
    with Image.open(run / "sweep-layer3.png") as im:
        assert im.size == (panels * side + (panels - 1) * files.PANEL_GAP, header + label + side)
        layer3 = np.asarray(im)
    with Image.open(run / "prior.png") as im:
        assert im.size == (side, header + side)

    # every layer side by side; its layer-3 panel is the first panel of sweep-layer3.png (same seed and draws)
    assert sample.main(common + ["--sweep-layer", "all", "--out", str(tmp_path)]) == 0
    with Image.open(tmp_path / "sweep-all.png") as im:
        assert im.size == (3 * side + 2 * files.PANEL_GAP, header + label + side)
        np.testing.assert_array_equal(np.asarray(im)[header + label:, -side:], layer3[header + label:, :side])

    # the same seed gives the same bytes (that another seed gives other noise is tested on layer_sweep above)
    assert sample.main(sweep + ["--out", str(tmp_path)]) == 0
    for name in ("sweep-layer3.png", "prior.png"): assert (tmp_path / name).read_bytes() == (run / name).read_bytes()


@pytest.fixture
def bad_runs(run, tmp_path) -> list:
    """(argv, pattern) for run folders that sample.py and evaluate.py must refuse with one line: missing, empty, a
    checkpoint cut short at several points, a safetensors file of something else, an HVAE config over VLAE weights."""
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "none", "no checkpoint in .*: train one first with `python train.py"),
             (tmp_path / "empty", "no checkpoint in .*empty: train one first")]
    raw = (run / checkpoint.CHECKPOINT).read_bytes()
    for n in (4, 100, len(raw) // 2, len(raw) - 1):
        folder = tmp_path / f"cut{n}"
        folder.mkdir()
        (folder / checkpoint.CHECKPOINT).write_bytes(raw[:n])
        cases.append((folder, "is not a readable checkpoint of this project .*; delete it and train again"))
    (tmp_path / "other").mkdir()
    checkpoint.atomic_safe_save({"w": Tensor.ones(2).contiguous()}, tmp_path / "other" / checkpoint.CHECKPOINT, {})
    cases.append((tmp_path / "other", "not a readable checkpoint .*no config in its metadata"))
    cfg = checkpoint.read_checkpoint(run)[1]["config"] | {"model": "hvae"}
    cases.append((copy_run(run, tmp_path / "hvae-config", config=cfg), "holds weights that do not fit the HVAE"))
    return [(["--run", str(folder)], pattern) for folder, pattern in cases]


def folder_contents(folder: Path) -> dict:
    return {f: f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def test_user_errors_are_one_line(run, bad_runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / checkpoint.CHECKPOINT).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    files = folder_contents(tmp_path)
    cases = [(["--run", str(broken)], "not a readable checkpoint"),
             (["--run", str(run), "--sweep-layer", "4"], "--sweep-layer 4: this model has layers 1 .* to 3"),
             (["--run", str(run), "--sweep-layer", "top"], "--sweep-layer top: give a layer number"),
             (["--run", str(run), "--gibbs", "5"], "--gibbs .* HVAE"),
             (["--run", str(run), "--grid", "0"], "--grid must be >= 1"),
             (["--run", str(run), "--swap-layer", "4"], "--swap-layer 4: this model has layers 1 .* to 3"),
             (["--run", str(run), "--redraw-layer", "0"], "--redraw-layer 0: this model has layers 1"),
             (["--run", str(run), "--from-test", "0", "--swap-layer", "1"], "--from-test 0: give a number .* 1 to 100"),
             (["--run", str(run), "--from-test", "5"], "--from-test N picks the digits of --redraw-layer"),
             (["--run", str(run), "--gif", "a.gif"], "--gif animates the sweep of one layer: give --sweep-layer N"),
             (["--run", str(run), "--gif", "a.gif", "--sweep-layer", "all"], "--gif animates")]
    assert_one_line_errors(sample.main, bad_runs + cases, capsys, ["--out", str(tmp_path / "out")])
    assert folder_contents(tmp_path) == files and not (tmp_path / "out").exists()


def test_with_layer_takes_one_layer_from_b_and_the_rest_from_a():
    """The swap grid's codes: [a, b] holds digit a's code at every layer but `layer`, which is digit b's."""
    codes = [np.arange(4 * d, dtype=np.float32).reshape(4, d) + 100 * i for i, d in enumerate((2, 1, 3))]
    for layer in (1, 2, 3):
        grid = sample.with_layer(codes, layer, codes[layer - 1])
        for i, (g, c) in enumerate(zip(grid, codes)):
            assert g.shape == (4, 4, c.shape[1])
            for a in range(4):
                for b in range(4): np.testing.assert_array_equal(g[a, b], c[b] if i == layer - 1 else c[a])


def test_sweep_path_walks_the_grid_and_each_unit():
    q = vlae.normal_quantiles(3)
    path = sample.sweep_path(2, 3)                                   # the 3 x 3 grid, every other row backwards
    assert path.shape == (9, 2) and sorted(map(tuple, path)) == sorted(map(tuple, vlae.quantile_grid(3).reshape(-1, 2)))
    assert (np.abs(np.diff(path, axis=0)).sum(1) > 0).all() and np.allclose(path[3], [q[2], q[1]])
    path = sample.sweep_path(3, 3)                                   # one unit at a time, the others at 0
    assert path.shape == (9, 3) and np.allclose(path[3:6], np.stack([0 * q, q, 0 * q], 1))


def tiny_run(folder: Path, **kw) -> Path:
    """An untrained tiny checkpoint (weights only) of the given config, as the `run` fixture's."""
    folder.mkdir(parents=True)
    Tensor.manual_seed(0)
    model = checkpoint.build_model(ModelConfig(**(TINY | kw)))
    meta = {"config": model.cfg.to_dict(), "train": {"dataset": "mnist"}, "step": 0, "epoch": 0}
    checkpoint.save_checkpoint(folder / checkpoint.CHECKPOINT, model, None, meta)
    return folder


# 2 layers gated; 3 layers gated (the default's shape); 4 layers concat with a 1-D bottom code (redrawn) and a 3-D top
# one (swapped; a gif unit by unit); the 3-layer HVAE (its codes are eps, not means)
CONFIGS = [dict(latent_dims=(2, 2), combiner="gated"), dict(latent_dims=(2, 2, 2), combiner="gated"),
           dict(latent_dims=(1, 2, 2, 3), combiner="concat"), dict(model="hvae", latent_dims=(2, 2, 2))]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_swap_redraw_and_gif_from_real_digits(cfg, tmp_path, capsys, monkeypatch):
    """--from-test N --swap-layer L --redraw-layer 1 on 2, 3 and 4 layers, both combiners, and on the HVAE: the grids
    decode the first N test digits' codes (model.codes: the posterior means for a VLAE) with layer L's code from
    digit B (the swap) or from the prior (the redraw); --gif animates a sweep, one frame per value of the code."""
    mnist_folder()
    run, n, L = tiny_run(tmp_path / "run", **cfg), 3, len(cfg["latent_dims"])
    decoded, generate = [], sample.generate_images
    monkeypatch.setattr(sample, "generate_images", lambda model, eps: decoded.append(eps) or generate(model, eps))
    argv = ["--run", str(run), "--from-test", str(n), "--swap-layer", str(L), "--redraw-layer", "1", "--grid", "2",
            "--scale", "1"]
    assert sample.main(argv) == 0
    assert capsys.readouterr().out.split() == [str(run / "redraw-layer1.png"), str(run / f"swap-layer{L}.png")]
    model, _ = checkpoint.load_model(run)
    x = data.as_float(data.load_dataset("mnist").test_x[:n])
    codes = [c.numpy() for c in model.codes(Tensor(x))]
    redrawn, swapped = decoded[1], decoded[2]                       # (decoded[0]: the reconstructions)
    for i, c in enumerate(codes):
        assert redrawn[i].shape == (n, 2, c.shape[1]) and swapped[i].shape == (n, n, c.shape[1])
        from_b = i == L - 1                                          # swapped[i][a, b]: B's code at layer L, else A's
        np.testing.assert_allclose(swapped[i], np.broadcast_to(c[None] if from_b else c[:, None], (n, n, c.shape[1])),
                                   atol=1e-6)
        if i > 0: np.testing.assert_allclose(redrawn[i], np.broadcast_to(c[:, None], redrawn[i].shape), atol=1e-6)
    assert not np.allclose(redrawn[0][:, 0], codes[0])              # the bottom layer is redrawn
    with Image.open(run / f"swap-layer{L}.png") as im:
        side = panel_size(n + 1)
        assert im.size == (side, 14 + side)
        grid = np.asarray(im)[14:]
    images = generate(model, swapped)                               # row A, column B, after the top row of digits
    cell = lambda r, c: grid[2 + r * 30:2 + r * 30 + 28, 2 + c * 30:2 + c * 30 + 28]
    np.testing.assert_array_equal(cell(2, 3), (images[1, 2, 0] * 255).round().astype(np.uint8))
    np.testing.assert_array_equal(cell(0, 2), (x[1, 0] * 255).round().astype(np.uint8))
    with Image.open(run / "redraw-layer1.png") as im: assert im.size == (panel_size(4), 14 + panel_size(n))

    d = cfg["latent_dims"][-1]                                      # a 2-D code walks the grid, others unit by unit
    gif = tmp_path / "s.gif"
    assert sample.main(["--run", str(run), "--sweep-layer", str(L), "--grid", "2", "--gif", str(gif)]) == 0
    with Image.open(gif) as im: assert im.n_frames == (4 if d == 2 else 2 * d) and im.format == "GIF"
    assert not (run / f"sweep-layer{L}.png").exists()


def test_float16_model_and_the_pretrained_fallback(run, tmp_path, monkeypatch, capsys):
    """With no --run: out/mnist-vlae if it holds a checkpoint, else the pretrained model (float16 weights, computed in
    float32; one line says so; pictures in out/pretrained-mnist-vlae), else one line saying how to train one."""
    state, meta = checkpoint.read_checkpoint(run)
    half = {k: Tensor(v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in state.items()
            if k.startswith("model.")}                                # its float32 tensors in float16
    pretrained = tmp_path / "pretrained" / "mnist-vlae"
    pretrained.mkdir(parents=True)
    checkpoint.atomic_safe_save(half, pretrained / checkpoint.CHECKPOINT, {"config": meta["config"]})
    monkeypatch.setattr(checkpoint, "PRETRAINED", pretrained)
    monkeypatch.setattr(sample, "PRETRAINED", pretrained)
    monkeypatch.chdir(tmp_path)
    model, _ = checkpoint.load_model(pretrained)
    for k, t in vlae.weights(model).items():
        np.testing.assert_array_equal(t.numpy(), half[f"model.{k}"].numpy().astype(t.numpy().dtype))
    assert sample.main(["--prior", "--grid", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(Path("out/pretrained-mnist-vlae/prior.png"))] and len(err.strip().splitlines()) == 1
    assert re.match(r"no checkpoint in out/mnist-vlae .*: using the pretrained model in pretrained/mnist-vlae$",
                    err.strip())
    shutil.copytree(run, tmp_path / "out" / "mnist-vlae")           # a run of one's own comes first, silently
    assert sample.main(["--prior", "--grid", "2"]) == 0 and capsys.readouterr().err == ""
    assert (tmp_path / "out" / "mnist-vlae" / "prior.png").exists()
    shutil.rmtree(tmp_path / "out" / "mnist-vlae")
    monkeypatch.setattr(checkpoint, "PRETRAINED", tmp_path / "none")
    assert_one_line_errors(sample.main, [([], r"no checkpoint in out/mnist-vlae: train one first with `python train.py "
                                             r"--dataset mnist`")], capsys)


# --------------------------------------------------------------------------------------------- evaluate.py

def bar(width: int = 2, height: int = 16, shear: float = 0.0, size: int = 28) -> np.ndarray:
    """A synthetic stroke: a vertical bar `width` pixels wide, each row shifted right by shear * (rows above the
    middle), so shear > 0 leans right like an italic 1."""
    img = np.zeros((size, size), np.float32)
    top = (size - height) // 2
    for y in range(top, top + height):
        x0 = int(round(size / 2 - width / 2 + shear * (size / 2 - y)))
        img[y, x0:x0 + width] = 1
    return img


def test_attributes_on_synthetic_strokes():
    thin, thick, leaning, wide = bar(2), bar(4), bar(2, shear=0.5), bar(8, height=12)
    a = evaluate.attributes(np.stack([thin, thick, leaning, wide]))
    assert a["thickness"][1] > 1.5 * a["thickness"][0] > 0                       # thicker strokes, larger thickness
    assert a["slant"][2] > 0.4 and abs(a["slant"][0]) < 0.05                     # leaning right, upright
    assert a["width"][3] > 2 * a["width"][0]                                     # wider, wider
    assert abs(a["width"][2] - a["width"][0]) < 0.3                              # the shear is not counted as width
    ring = np.zeros((28, 28), np.float32)                                        # a 0 drawn with a 3-pixel pen
    yy, xx = np.mgrid[:28, :28]
    r = np.hypot(yy - 13.5, xx - 13.5)
    ring[(r > 5) & (r <= 8)] = 1
    assert 2.2 < evaluate.attributes(ring[None])["thickness"][0] < 3.3           # about the pen width


def test_active_units_and_frechet_distance():
    rng = np.random.default_rng(0)
    means = rng.standard_normal((5000, 4)) * np.sqrt([1.0, 0.05, 0.005, 0.0])    # Cov_x per unit: 1, .05, .005, 0
    var, n_active = evaluate.active_units(means)
    assert n_active == 2 and np.allclose(var, [1.0, 0.05, 0.005, 0.0], rtol=0.1, atol=1e-3)
    a, b = rng.standard_normal((4000, 3)), rng.standard_normal((4000, 3))
    assert abs(evaluate.frechet_distance(a, b)) < 0.05                            # same distribution: about 0
    # Gaussians N(m, s^2 I) and N(0, I) in 3-d: |m|^2 + 3 (s - 1)^2
    assert evaluate.frechet_distance(a * 2 + 1, b) == pytest.approx(3 * 1 + 3 * 1, rel=0.05)
    assert evaluate.label_entropy(np.arange(1000) % 10) == pytest.approx(math.log(10))
    assert evaluate.label_entropy(np.zeros(50, int)) == 0


def test_iw_bound_grows_with_k_towards_log_mean_w():
    """Importance weights with log w ~ N(m, s^2) have log E[w] = m + s^2 / 2: IW-1 estimates m, IW-k grows with k
    (never decreasing, by Jensen on the nested groups) and approaches m + s^2 / 2."""
    m, s = -3.0, 1.0
    log_w = np.random.default_rng(0).normal(m, s, (200, 1000))
    bounds = evaluate.iw_bounds(log_w, [1, 10, 100, 1000])
    means = [bounds[k].mean() for k in (1, 10, 100, 1000)]
    assert all(b >= a for a, b in zip(means, means[1:])) and (bounds[1000] >= bounds[1] - 1e-12).all()
    assert means[0] == pytest.approx(m, abs=0.01) and means[-1] == pytest.approx(m + s * s / 2, abs=0.05)


def test_explained_shares_of_the_grid_protocol():
    """identity_explained: 1 when each cell fixes the label, about 0 when labels ignore the cell. style_explained: the
    intraclass correlation of cell effect + noise, with no credit for what the label alone determines."""
    rng = np.random.default_rng(0)
    assert evaluate.identity_explained(np.repeat(np.arange(49)[:, None] % 10, 20, 1)) == 1
    assert abs(evaluate.identity_explained(rng.integers(0, 10, (49, 20)))) < 0.02
    labels = rng.integers(0, 10, (49, 20))
    cell = rng.standard_normal((49, 1))
    noisy = cell + rng.standard_normal((49, 20))                                 # var 1 from the cell, 1 from noise
    assert evaluate.style_explained(noisy, labels) == pytest.approx(0.5, abs=0.15)
    by_label = np.repeat(np.arange(49)[:, None] % 10, 20, 1)                     # the cell fixes the label ...
    assert evaluate.style_explained(by_label * 3.0 + rng.standard_normal((49, 20)), by_label) < 0.05   # ... and width


def two_strokes(thickness: float, gap: float, shear: float, height: float) -> np.ndarray:
    """A synthetic digit: two vertical strokes `thickness` pixels wide, `gap` pixels apart (the digit's width),
    sheared by `shear` (its slant), `height` rows tall (its identity, for fake_classify)."""
    img = np.zeros((28, 28), np.float32)
    w, g, h = int(np.clip(round(thickness), 1, 5)), int(np.clip(round(gap), 2, 10)), int(np.clip(round(height), 8, 26))
    top = (28 - h) // 2
    for y in range(top, top + h):
        x0 = int(round(14 - (2 * w + g) / 2 + shear * (14 - y)))
        for x in (x0, x0 + w + g):
            img[y, max(x, 0):max(x + w, 0)] = 1
    return img


def fake_classify(clf, images):
    """The 'class' of a two_strokes digit: its height in 2-row bins (10 classes); one-hot probabilities."""
    rows = (images.reshape(len(images), 28, 28) > 0.5).any(2).sum(1)
    labels = np.clip((rows - 8) // 2, 0, 9)
    return np.eye(10, dtype=np.float32)[labels], np.zeros((len(images), 128), np.float32)


def synthetic_generator(thickness: int, width_and_slant: int, identity: int):
    """generate_fn for a 3-layer model with 2-d codes whose layers (0-based) drive the given attributes at full
    strength: code dim 0 of `thickness`'s layer sets the stroke width, dims 0 and 1 of `width_and_slant`'s the gap
    and the shear, dim 0 of `identity`'s the height (the fake class)."""
    def generate_fn(eps):
        lead, z = eps[0].shape[:-1], [e.reshape(-1, 2) for e in eps]
        images = [two_strokes(3 + 1.3 * z[thickness][i, 0], 6 + 2 * z[width_and_slant][i, 0],
                              0.35 * z[width_and_slant][i, 1], 17 + 4.5 * z[identity][i, 0]) for i in range(len(z[0]))]
        return np.stack(images).reshape(*lead, 1, 28, 28)
    return generate_fn


class SmallSettings:
    bases, resamples, grid, grid_draws, samples, seed = 40, 6, 5, 8, 50, 0


@pytest.mark.parametrize("layers, want", [
    ((0, 1, 2), {"bottom = thickness": 1, "middle = width/slant": 2, "top = identity": 3}),   # the paper's order
    ((2, 1, 0), {"bottom = thickness": 3, "middle = width/slant": 2, "top = identity": 1}),   # thickness on top
    ((1, 0, 2), {"bottom = thickness": 2, "middle = width/slant": 1, "top = identity": 3})])  # the lower two swapped
def test_fig5_verdict_credits_the_layer_that_drives_each_attribute(layers, want, monkeypatch):
    """evaluate.hierarchy on generators whose layers drive thickness, width + slant and identity at full strength, in
    the paper's order and in wrong ones: every measure credits each attribute to the layer that drives it, a check
    holds exactly when that is the layer the paper names and fails (not 'unclear') otherwise, and the seed's verdict
    holds only for the paper's order."""
    monkeypatch.setattr(evaluate, "classify", fake_classify)
    h = evaluate.hierarchy(synthetic_generator(*layers), (2, 2, 2), None, SmallSettings, np.random.default_rng(0))
    named = {"bottom = thickness": 1, "middle = width/slant": 2, "top = identity": 3}
    for m, checks in h["fig5"]["by_measure"].items():
        for c, k in checks.items():
            assert k["led_by"] == want[c], (m, c, k)
            if m in evaluate.JUDGED:
                assert k["verdict"] == ("holds" if want[c] == named[c] else "fails"), (m, c, k)
                assert (k["interval"][0] > 0) == (k["verdict"] == "holds"), (m, c, k)
    assert h["fig5"]["checks"] == {c: "holds" if want[c] == named[c] else "fails" for c in named}
    assert h["fig5"]["holds"] == (layers == (0, 1, 2))


def test_fig5_verdict_is_unclear_when_two_layers_share_an_attribute(monkeypatch):
    """Two layers that drive thickness equally: the bootstrap cannot separate them, so the bottom check is neither
    held nor failed, and the seed does not count."""
    monkeypatch.setattr(evaluate, "classify", fake_classify)
    base = synthetic_generator(0, 1, 2)
    def generate_fn(eps):
        shared = [eps[0], eps[1], eps[2]]
        mix = (eps[0][..., :1] + eps[1][..., 1:]) / np.sqrt(2)              # z_1 and z_2 both set the thickness
        shared[0] = np.concatenate([mix, eps[0][..., 1:]], -1)
        return base(shared)
    h = evaluate.hierarchy(generate_fn, (2, 2, 2), None, SmallSettings, np.random.default_rng(0))
    assert h["fig5"]["checks"]["bottom = thickness"] == "unclear" and not h["fig5"]["holds"]
    assert h["fig5"]["checks"]["top = identity"] == "holds"


def test_read_check_and_the_study_table():
    assert [evaluate.read_check(p) for p in (1.0, 0.95, 0.94, 0.5, 0.06, 0.05, 0.0)] == \
        ["holds", "holds", "unclear", "unclear", "unclear", "fails", "fails"]
    import study
    fig5 = lambda verdicts: {"checks": dict(zip(("bottom = thickness", "middle = width/slant", "top = identity"),
                                                verdicts)), "holds": verdicts == ("holds",) * 3}
    base = {"recipe": "r", "width": "w", "trainer": "t", "epoch": 1, "test_elbo": 1.0, "prior_frechet": 2.0,
            "trained_at": {"commit": "abcdef123", "dirty": False}}
    rows = [base | {"seed": 0, "fig5": fig5(("fails", "holds", "holds"))},
            base | {"seed": 0, "fig5": fig5(("holds", "holds", "holds"))},     # seed 0 again: its last row counts
            base | {"seed": 1, "fig5": fig5(("unclear", "holds", "fails")), "test_elbo": 2.0}]  # the ELBO picks seed 1
    line = study.table(rows).splitlines()[2]
    assert line.startswith("| r | w | t | 1 | 0,1 | 1 / 1 / 0 | 2 / 0 / 0 | 1 / 0 / 1 | **1/2** | 0/1 |"), line
    assert "abcdef1" in line
    hvae = lambda seed, fig3, fig2: base | {"seed": seed, "pixel_var_share": [0.2, 0.3, 0.5], "gibbs_frechet": 30.0,
                                            "ancestral_frechet": 20.0, "fig3": {"verdict": fig3},
                                            "fig2": {"verdict": fig2}}
    line = study.hvae_table([hvae(0, "holds", "fails"), hvae(1, "unclear", "fails"), hvae(2, "holds", "holds")])
    assert line.splitlines()[2].startswith("| r | w | t | 1 | 0,1,2 | 0.20 / 0.30 / 0.50 | 2 / 1 / 0 | 30/20 30/20 "
                                           "30/20 | 1 / 0 / 2 | 1.0 | abcdef1 |"), line


def test_evaluate_report_end_to_end(run, tmp_path, capsys):
    """The whole report on the untrained tiny checkpoint, with an untrained cached classifier (training the real
    one takes minutes): the JSON and the markdown hold every section, and the numbers are consistent."""
    mnist_folder()
    clf_path = tmp_path / "clf.safetensors"
    Tensor.manual_seed(0)
    checkpoint.atomic_safe_save(get_state_dict(evaluate.Classifier()), clf_path, {"test_accuracy": 0.1, "epochs": 0})
    argv = ["--run", str(run), "--k", "100", "--iw-images", "10", "--bases", "3", "--resamples", "2",
            "--samples", "30", "--grid", "3", "--grid-draws", "2", "--classifier", str(clf_path),
            "--out", str(tmp_path / "ev.json")]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "ev.json").read_text())
    like = r["likelihood"]
    assert like["test_images"] == 10000 and set(like["iw"]) == {"1", "10", "100"}
    iw = [like["iw"][k]["bound"] for k in ("1", "10", "100")]
    # the tiny model's log_weight: IW-1 (sampled KL) agrees with the closed-form-KL ELBO on the same images, and
    # the bound grows with k (a wrong sign of log p(z) or log q(z|x) breaks both)
    assert iw[0] <= iw[1] <= iw[2] and iw[2] > like["subset_elbo"]
    assert abs(iw[0] - like["subset_elbo"]) < 0.5
    assert len(r["layers"]["raw"]) == 3
    assert len(r["grid"]) == 3 and set(r["fig5"]["by_measure"]) == {"resample", "all draws", "grid"}
    assert all(v in ("holds", "unclear", "fails") for v in r["fig5"]["checks"].values())
    assert set(r["samples"]) == {"ancestral", "mnist_train"} and r["classifier"]["test_accuracy"] == 0.1
    for text in ("IW-100, 10 test images", "active units", "| top = identity | grid |", "authors' protocol",
                 "Frechet distance",
                 "| z_3 (top) |"):
        assert text in out, text
    assert "fig2" not in r and "Fig. 2" not in out
    # the HVAE's report adds the Gibbs chain of Proposition 1 and Fig. 2's verdict
    hvae_run = tiny_run(tmp_path / "hvae", model="hvae", latent_dims=(2, 2, 2))
    assert evaluate.main(argv[:1] + [str(hvae_run)] + argv[2:] + ["--gibbs-steps", "2"]) == 0
    out, r = capsys.readouterr().out, json.loads((tmp_path / "ev.json").read_text())
    assert set(r["samples"]) == {"ancestral", "gibbs", "mnist_train"}
    assert r["fig2"]["verdict"] in ("holds", "unclear", "fails") and r["fig2"]["ratio"] > 0
    assert "Fig. 2 (Proposition 1" in out and "| eps_3 |" in out


def test_fig2_verdict_reads_the_frechet_ratio_with_its_noise():
    """Gibbs samples drawn like the ancestral ones: the ratio is near 1 and the claim holds; drawn far off: it fails;
    the same seed gives the same interval."""
    rng = np.random.default_rng(0)
    test = rng.standard_normal((3000, 8))
    ancestral = rng.standard_normal((1000, 8)) + 0.5
    alike, off = rng.standard_normal((1000, 8)) + 0.5, rng.standard_normal((1000, 8)) * 2 + 1.5
    v = evaluate.fig2_verdict(alike, ancestral, test, seed=0, resamples=100)
    assert v["verdict"] == "holds" and 0.8 < v["ratio"] < 1.2 and v["interval"][0] < v["ratio"] < v["interval"][1]
    assert evaluate.fig2_verdict(off, ancestral, test, seed=0, resamples=100)["verdict"] == "fails"
    assert evaluate.fig2_verdict(alike, ancestral, test, seed=0, resamples=100) == v


def test_evaluate_errors_are_one_line(run, bad_runs, tmp_path, capsys):
    broken = tmp_path / "clf.safetensors"
    broken.write_bytes(b"not a safetensors file")
    files = folder_contents(tmp_path)
    cases = [(["--run", str(run), "--k", "0"], "--k must be >= 1"),
             (["--run", str(run), "--resamples", "1"], "--resamples must be >= 2"),
             (["--run", str(run), "--grid-draws", "1"], "--grid-draws must be >= 2"),
             (["--run", str(run), "--grid", "0"], "--grid must be >= 1"),
             (["--run", str(run), "--iw-images", "20000"], "test set has only 10000 images")]
    assert_one_line_errors(evaluate.main, bad_runs + cases, capsys, ["--out", str(tmp_path / "ev.json")])
    with pytest.raises(checkpoint.UserError, match="not a readable classifier .* delete it"):
        evaluate.load_classifier(broken, None, 1)
    assert folder_contents(tmp_path) == files and not (tmp_path / "ev.json").exists()


# --------------------------------------------------------------------------------------------- bench

def test_torch_mirror_matches_our_models():
    """bench/torch_mirror.py (optional: needs torch) is the same network in PyTorch: same parameter count for every
    size and both models and combiners, and for a tiny model the same state names and the same outputs."""
    mirror = load_mirror()
    for size in ("paper", "narrow", "tiny"):
        for model in ("vlae", "hvae"):
            for combiner in ("concat", "gated"):
                cfg = ModelConfig(model=model, size=size, combiner=combiner, latent_dims=(2, 3, 2))
                ours = n_params(checkpoint.build_model(cfg))
                assert mirror.n_params(mirror.build(cfg)) == ours, (size, model, combiner)
    # study.py writes the mirror's weights as a checkpoint of the tinygrad model: same names, shapes and dtypes, and
    # the same images from the same noise
    import torch
    from tinygrad.dtype import _to_np_dtype
    for model in ("vlae", "hvae"):
        cfg = ModelConfig(model=model, size="tiny")
        torch.manual_seed(0)
        ours, theirs = checkpoint.build_model(cfg), mirror.build(cfg).eval()
        state = mirror.tinygrad_state(theirs)
        assert {k: (v.shape, v.dtype) for k, v in state.items()} == \
            {k: (t.shape, np.dtype(_to_np_dtype(t.dtype))) for k, t in vlae.weights(ours).items()}
        checkpoint.load_part(ours, state)
        eps = [np.random.default_rng(l).standard_normal((5, d)).astype(np.float32)
               for l, d in enumerate(cfg.latent_dims)]
        with torch.no_grad(): want = theirs.generate([torch.from_numpy(e) for e in eps]).numpy()
        np.testing.assert_allclose(ours.generate([Tensor(e) for e in eps]).numpy(), want, atol=1e-5)


def load_mirror():
    """bench/torch_mirror.py, which needs torch: skipped where torch is missing, except where VLAE_REQUIRE_TORCH is set
    (CI installs it from requirements-test.txt), where a missing torch fails the test."""
    if not os.environ.get("VLAE_REQUIRE_TORCH"): pytest.importorskip("torch")
    import importlib.util
    spec = importlib.util.spec_from_file_location("torch_mirror", Path(__file__).parent / "bench" / "torch_mirror.py")
    mirror = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mirror)
    return mirror


@pytest.mark.parametrize("model_name, combiner", [("vlae", "gated"), ("vlae", "concat"), ("hvae", "concat")])
def test_torch_mirror_training_step_equals_train_pys(model_name, combiner, monkeypatch):
    """The recipe search trains with the mirror (study.py), so its training step must be train.py's: from the same
    weights, batch and noise, the loss and its parts, every gradient (train mode: BatchNorm on batch statistics),
    the weights, Adam moments and BatchNorm running statistics after one Adam step, and the KL weight (a step
    inside the warm-up) agree to float32 rounding (rtol 1e-4 on the loss, 1e-3 on gradients and weights)."""
    mirror = load_mirror()
    import torch
    cfg = ModelConfig(model=model_name, size="tiny", combiner=combiner, sigma_x=0.25)
    Tensor.manual_seed(0)
    ours = checkpoint.build_model(cfg)
    theirs = mirror.build(cfg).train()
    state = theirs.state_dict()
    theirs.load_state_dict({k: torch.from_numpy(np.asarray(t.numpy())).to(state[k].dtype)
                            for k, t in vlae.weights(ours).items()})
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16, *cfg.image_shape)).astype(np.float32)
    noise = {}                                       # the k-th draw of z (or eps) of a step, the same on both sides
    def draw(k, shape):
        return noise.setdefault(k, np.random.default_rng(100 + k).standard_normal(shape).astype(np.float32))
    calls = {"ours": 0, "theirs": 0}
    def ours_reparameterize(mu, sigma, eps=None):
        calls["ours"] += 1
        return mu + sigma * (Tensor(draw(calls["ours"], mu.shape)) if eps is None else eps)
    def theirs_reparameterize(mu, sigma, eps=None):
        calls["theirs"] += 1
        return mu + sigma * (torch.from_numpy(draw(calls["theirs"], tuple(mu.shape))) if eps is None else eps)
    for module in (vlae, sys.modules["hvae"]):
        if hasattr(module, "reparameterize"): monkeypatch.setattr(module, "reparameterize", ours_reparameterize)
    monkeypatch.setattr(mirror, "reparameterize", theirs_reparameterize)
    step, warmup, lr = 7, 15, 1e-3
    trainer = train.Trainer(ours, lr=lr)
    name_of = {id(t): k for k, t in vlae.weights(ours).items()}
    params = {name_of[id(t)]: t for t in trainer.opt.params}          # Adam's parameters, in its order
    with Context(TRAINING=1):
        tensors, stats = trainer.step_tensors(Tensor(x), Tensor([train.kl_weight(step, warmup)]))
        grads = {k: t.grad for k, t in params.items()}
        Tensor.realize(*tensors, *grads.values())
    opt = torch.optim.Adam(theirs.parameters(), lr=lr)
    row = mirror.train_step(theirs, opt, torch.from_numpy(x), step, warmup)
    assert calls["ours"] == calls["theirs"] == len(cfg.latent_dims)
    np.testing.assert_allclose(stats.numpy(), row.numpy(), rtol=1e-4, atol=1e-3)
    named = dict(theirs.named_parameters())
    assert set(named) == set(params)
    # A bias followed by BatchNorm has a gradient of exactly 0 in exact arithmetic (the normalisation removes it):
    # both sides get rounding noise there, so gradients are compared against the largest gradient of the model,
    # and where a gradient is at that noise level Adam's first step is +-lr either way: only its bound is checked
    scale = max(np.abs(p.grad.numpy()).max() for p in named.values())
    noise_level = {}
    for k, g in grads.items():
        want = named[k].grad.numpy()
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-3, atol=1e-5 * scale, err_msg=k)
        noise_level[k] = np.abs(want) < 1e-4 * scale
    after = theirs.state_dict()
    for k, t in vlae.weights(ours).items():
        got, want = t.numpy(), after[k].numpy()
        if k in noise_level:
            m = noise_level[k]
            np.testing.assert_allclose(got[~m], want[~m], rtol=1e-3, atol=1e-6, err_msg=k)
            assert (np.abs(got[m] - want[m]) <= 2 * lr * 1.001).all(), k
        else: np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6, err_msg=k)      # BatchNorm statistics
    moments = {k: opt.state[p] for k, p in named.items()}
    for i, k in enumerate(params):
        np.testing.assert_allclose(trainer.opt.m[i].numpy(), moments[k]["exp_avg"].numpy(), rtol=1e-3,
                                   atol=1e-6 * scale, err_msg=k)


def test_bench_rejects_bad_flags(capsys):
    import bench
    cases = [(["--size", "huge"], "--size huge: choose from"), (["--model", "gan"], "--model gan"),
             (["--steps", "0"], "--steps must be >= 1"), (["--kernel-search", "-1"], "--kernel-search must be >= 0"),
             (["--rounds", "0"], "--rounds must be >= 1"), (["--paired", "-1"], "--paired must be >= 0")]
    assert_one_line_errors(bench.main, [(a, re.escape(m)) for a, m in cases], capsys)
    # a measuring process that fails (here: a device tinygrad does not have) ends in one line naming the settings
    assert bench.main(["--size", "tiny", "--model", "vlae", "--variant", "DEV=NOPE", "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"error: measuring .*--size tiny.* DEV=NOPE failed: .+", err[-1]), err
