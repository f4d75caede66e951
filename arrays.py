"""The models applied to numpy arrays (e.g. generate_images(model, eps)): jitted (vlae.jitted) at one fixed batch
size, so each function compiles once."""
from __future__ import annotations
import numpy as np
from tinygrad import Tensor, TinyJit
from vlae import jitted

BATCH = 100                 # sampling and evaluation run at this batch size (padded): each jit compiles once


def batched(fn, arrays: list[np.ndarray]):
    """fn(list of (BATCH, ...) Tensors) -> Tensor or tuple of Tensors, over the rows of numpy arrays, the outputs
    concatenated as numpy; the last chunk padded with copies of its last row (one shape: a jitted fn compiles once)."""
    n, outs = len(arrays[0]), []
    for i in range(0, n, BATCH):
        chunk = [a[i:i + BATCH] for a in arrays]
        if pad := BATCH - len(chunk[0]):
            chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
        ret = fn([Tensor(np.ascontiguousarray(c, dtype=np.float32)) for c in chunk])
        outs.append([r.numpy()[:BATCH - pad] for r in (ret if isinstance(ret, tuple) else (ret,))])
    cat = [np.concatenate(parts) for parts in zip(*outs)]
    return tuple(cat) if len(cat) > 1 else cat[0]


def generate_jit(model) -> TinyJit:             # eval mode: BatchNorm uses its running statistics
    return jitted(model, "generate", lambda *eps: model.generate(list(eps)).realize())


def generate_images(model, eps: list[np.ndarray]) -> np.ndarray:
    """Noise per layer, numpy arrays (..., d_l) with the same leading shape -> images (..., C, H, W): the means of
    r(x | z) in [0, 1] (for an HVAE, Eq. 15 with this noise)."""
    images = batched(lambda e: generate_jit(model)(*e), [e.reshape(-1, e.shape[-1]) for e in eps])
    return images.reshape(*eps[0].shape[:-1], *images.shape[1:])


def posterior_means(model, x: np.ndarray) -> list[np.ndarray]:
    """x (N, C, H, W) -> mu_l(x) (N, d_l) per layer (Eq. 13)."""
    run = jitted(model, "encode", lambda x: tuple(mu.realize() for mu, _ in model.encode(x)))
    return list(batched(lambda xb: run(xb[0]), [x]))


def reconstruct(model, x: np.ndarray) -> np.ndarray:
    """x (N, C, H, W) -> the images decoded from the posterior means mu_l(x)."""
    run = jitted(model, "reconstruct", lambda x: model.decode([mu for mu, _ in model.encode(x)]).realize())
    return batched(lambda xb: run(xb[0]), [x])


def elbo_parts(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example ELBO parts (N, 2+L): elbo, recon, kl_1..kl_L, and the images decoded from the posterior means."""
    def parts(x: Tensor) -> tuple[Tensor, Tensor]:
        out = model.elbo(x)
        recon_mean = model.decode([mu for mu, _ in model.encode(x)])
        return Tensor.stack(out.elbo, out.recon, *out.kl, dim=1).realize(), recon_mean.realize()
    run = jitted(model, "evaluate", parts)
    return batched(lambda xb: run(xb[0]), [x])
