"""The fast forms of the models' layers: the same parameters (the same Tensors, under the same names) and the same
function, computed in forms tinygrad runs faster on a CPU. accelerate(model) gives a model's layers these forms in
place; docs/performance.md says why each one is faster."""
from __future__ import annotations
import math, os
from tinygrad import Tensor, nn
from tinygrad.function import function
from tinygrad.helpers import TRAINING
from tinygrad.uop.ops import UOp


# ---------------------------------------------------------------------------------------------------------
# Matrix products with a backward pass written for tinygrad's kernels
# ---------------------------------------------------------------------------------------------------------

def grad_a_nt(g: Tensor, b: Tensor) -> Tensor: return g @ b.T.contiguous().T                # da = g @ b
def grad_b_nt(g: Tensor, a: Tensor) -> Tensor: return g.T.contiguous() @ a.T.contiguous().T  # db = g.T @ a


def _matmul_nt_grad(g: UOp, call: UOp) -> tuple[UOp, UOp]:
    """The gradients of y = a @ b.T given g = dL/dy: da = g @ b and db = g.T @ a, each written as a product whose
    two operands run along the summed axis in memory (x @ y.T, y contiguous), from transposed copies: tinygrad's
    kernels for autograd's own layout, which reads b and a across that axis, run several times slower. g and da
    are written out first, so that what produces g is not recomputed inside the product, and two products are not
    fused into one kernel."""
    a, b, g = Tensor(call.src[1]), Tensor(call.src[2]), Tensor(g).contiguous()
    return grad_a_nt(g, b).contiguous().uop, grad_b_nt(g, a).uop


@function(grad_fxn=_matmul_nt_grad)
def _matmul_nt(a: Tensor, b: Tensor) -> Tensor:
    return a.contiguous() @ b.contiguous().T


MATMUL_NT_MIN = 2 ** 26     # multiply-adds from which a product takes _matmul_nt_grad's backward pass


def matmul_nt(a: Tensor, b: Tensor) -> Tensor:
    """a @ b.T, (M, K) x (N, K) -> (M, N): every matrix product of the fast layers. From MATMUL_NT_MIN multiply-adds
    on with the backward pass of _matmul_nt_grad (the same gradients up to float rounding); below, autograd's, where
    the copies cost more than they save. Below, a long product with a small b (split_rows) gets b's gradient summed
    in two stages."""
    if a.shape[0] * a.shape[1] * b.shape[0] >= MATMUL_NT_MIN:
        return _matmul_nt(a, b)
    if (chunks := split_rows(a.shape[0], b.shape[0] * b.shape[1])) > 1:
        # the rows in `chunks` groups, each against its own (expanded) copy of b, whose gradient is written out
        # (contiguous_backward): b's gradient is summed per group, then over the groups
        (M, K), N = a.shape, b.shape[0]
        w = b.reshape(1, N, K).expand(chunks, N, K).contiguous_backward()
        return (a.reshape(chunks, M // chunks, K) @ w.transpose(1, 2)).reshape(M, N)
    return a @ b.T


SPLIT_MIN = 32              # rows per element of b from which its gradient is summed in two stages (split_rows)
SPLIT_MIN_MACS = 2 ** 21    # ... in a product of at least this many multiply-adds


def split_rows(m: int, b_size: int) -> int:
    """In how many groups of rows the gradient of a (m, K) @ b.T product with respect to b is summed first (1: not
    split). tinygrad makes b's gradient one kernel with one work item per element of b, each summing m products in
    a row: with few elements and long sums, few work items to spread over the cores. Split from SPLIT_MIN rows per
    element and SPLIT_MIN_MACS multiply-adds on (the narrow network's first convolution and last transposed
    convolution; at medium and paper width nothing is split), into the largest divisor of m up to sqrt(m) groups,
    unless VLAE_SPLIT=0."""
    if m < SPLIT_MIN * b_size or m * b_size < SPLIT_MIN_MACS or os.environ.get("VLAE_SPLIT", "1") == "0":
        return 1
    return max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)


# ---------------------------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------------------------

class Linear(nn.Linear):
    """nn.Linear computed through matmul_nt."""
    def __call__(self, x: Tensor) -> Tensor:
        return matmul_nt(x, self.weight) + self.bias


class BatchNorm(nn.BatchNorm):
    """nn.BatchNorm (the same function up to float rounding) whose sums over the batch and the image run in two
    stages in training, per image and then over the batch: tinygrad makes a per-channel sum over (batch, height,
    width) one kernel with one work item per channel, which also recomputes what produced x. The per-image sums
    have B x C outputs to spread over the cores. In the backward pass too: scale and shift reach the images through
    a (B, C, 1, 1) tensor whose gradient is written out (contiguous_backward), so theirs are summed per image first."""
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


class Conv4x4s2(nn.Conv2d):
    """nn.Conv2d(c_in, c_out, 4, stride=2, padding=1) computed as one matrix product (im2col): tinygrad
    differentiates a strided convolution into a dilated one, several times slower than a matmul on a CPU.
    The gradient with respect to x is written out once (contiguous_backward): left lazy, each of its readers (the
    BatchNorm below's sums and its input gradient, the leaky ReLU's mask) recomputes that gather in its own loop."""
    def __call__(self, x: Tensor) -> Tensor:
        x = x.contiguous_backward()
        B, C, H, W = x.shape
        h, w = H // 2, W // 2
        # the padded input in 2x2 cells: cells[b, c, i, r, j, s] = x_pad[b, c, 2i + r, 2j + s]
        cells = x.pad((1, 1, 1, 1)).reshape(B, C, h + 1, 2, w + 1, 2)
        # output (i, j) reads cells i + q, j + t (q, t in {0, 1}), i.e. kernel row 2q + r and column 2t + s
        windows = Tensor.stack(*[cells[:, :, q:q + h, :, t:t + w, :] for q in (0, 1) for t in (0, 1)], dim=-1)
        windows = windows.reshape(B, C, h, 2, w, 2, 2, 2).permute(0, 2, 4, 1, 6, 3, 7, 5)   # (B, i, j, c, q, r, t, s)
        patches = windows.reshape(B * h * w, C * 16).contiguous().contiguous_backward()   # dy @ W: a plain matrix
        y = matmul_nt(patches, self.weight.reshape(-1, C * 16)) + self.bias                # weight[o, c, 2q+r, 2t+s]
        return y.reshape(B, h, w, -1).permute(0, 3, 1, 2)


class ConvTranspose4x4s2(nn.ConvTranspose2d):
    """nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1) computed as one matrix product and an overlap-add:
    tinygrad's own transposed convolution convolves an input with zeros inserted between its pixels, so 3 of every 4
    multiply-adds are with zeros. write_patch_grad (set where a BatchNorm follows): the patches' gradient, a gather
    from the output's gradient, is written out before the product's backward pass reads it, not recomputed inside
    its loops. Not for the image layer: it paid nothing there, and would change the default network's rounding."""
    write_patch_grad = False

    def __call__(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        # every input pixel (i, j) spreads a 4x4 patch:
        # patch[b, i, j, o, q, r, t, s] = sum_c x[b, c, i, j] * weight[c, o, 2q + r, 2t + s]
        patch = matmul_nt(x.permute(0, 2, 3, 1).reshape(B * H * W, C), self.weight.reshape(C, -1).T)
        if self.write_patch_grad:
            patch = patch.contiguous_backward()
        patch = patch.reshape(B, H, W, -1, 2, 2, 2, 2)
        # ... onto rows 2(i + q) + r and columns 2(j + t) + s of the (2H + 2, 2W + 2) output before cropping: the
        # q = 1 (t = 1) quarter lands one 2x2 cell further down (right), so the overlap-add is 4 shifted sums
        def quarter(q, t): return patch[:, :, :, :, q, :, t, :].pad(((0, 0), (q, 1 - q), (t, 1 - t), None, None, None))
        full = quarter(0, 0) + quarter(0, 1) + quarter(1, 0) + quarter(1, 1)                # (B, H+1, W+1, o, r, s)
        full = full.permute(0, 3, 1, 4, 2, 5).reshape(B, -1, 2 * H + 2, 2 * W + 2)
        return full[:, :, 1:-1, 1:-1] + self.bias.reshape(1, -1, 1, 1)                    # padding=1 crops 1 pixel


def _is_4x4s2(layer) -> bool:
    return layer.kernel_size == (4, 4) and layer.stride == 2 and layer.padding == 1 and layer.dilation == 1 \
        and layer.groups == 1


def _fast_class(layer, following):
    """The fast class for a layer of tinygrad's (None: none), and the attributes it sets."""
    if type(layer) is nn.Linear:
        return Linear, {}
    if type(layer) is nn.BatchNorm:
        return BatchNorm, {}
    if type(layer) is nn.Conv2d and _is_4x4s2(layer):
        return Conv4x4s2, {}
    if type(layer) is nn.ConvTranspose2d and _is_4x4s2(layer) and layer.output_padding == 0:
        return ConvTranspose4x4s2, {"write_patch_grad": isinstance(following, nn.BatchNorm)}
    return None, {}


def accelerate(obj, _seen: set | None = None):
    """Give every layer of tinygrad's that obj holds (in attributes and lists, at any depth) its fast class here, in
    place: the same object, so the same Tensors under the same names. Returns obj."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            cls, attrs = _fast_class(item, obj[i + 1] if i + 1 < len(obj) else None)
            if cls is not None:
                item.__class__ = cls
                vars(item).update(attrs)
            else:
                accelerate(item, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (Tensor, type)):
        for k, v in vars(obj).items():
            if k.startswith("_"):
                continue
            cls, attrs = _fast_class(v, None)
            if cls is not None:
                v.__class__ = cls
                vars(v).update(attrs)
            else:
                accelerate(v, seen)
    return obj
