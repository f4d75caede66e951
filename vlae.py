"""The Variational Ladder Autoencoder (Zhao, Song & Ermon, ICML 2017, section 4.1, Eq. 8-14).

One latent layer z = (z_1, ..., z_L) with a standard-normal prior, its parts read from x at increasing network depth,
so simple features (stroke width) end up at the bottom and abstract ones (digit identity) at the top. Also the
pieces hvae.py reuses: blocks, the Gaussian head and densities, the likelihoods r(x; .), the image encoder/decoder.

    from vlae import VLAE, ModelConfig
    model = VLAE(ModelConfig(latent_dims=(2, 2, 2), size="narrow"))
    out = model.elbo(x)            # x: (B, 1, 28, 28) in [0, 1]; out.elbo: (B,) nats
"""
from __future__ import annotations
import math, statistics
import numpy as np
from dataclasses import dataclass, asdict, field
from typing import NamedTuple
from tinygrad import Tensor, TinyJit, nn
from tinygrad.nn.state import get_state_dict

# Network widths. `paper`: the authors' network (github.com/ermongroup/Variational-Ladder-Autoencoder); `narrow`:
# its shape with fewer units; `medium`: the authors' convolutions with narrow's dense layers, the default on a CPU;
# `tiny`: for tests. "channels" per image height (stride-2 convolutions down to 7x7 or 4x4); "hidden": dense width.
SIZES = {"paper": {"channels": {28: (64, 128), 32: (64, 128, 256), 64: (64, 128, 256, 512)}, "hidden": 1024},
         "medium": {"channels": {28: (64, 128), 32: (64, 128, 256), 64: (64, 128, 256, 512)}, "hidden": 256},
         "narrow": {"channels": {28: (16, 32), 32: (16, 32, 64), 64: (16, 32, 64, 128)}, "hidden": 256},
         "tiny": {"channels": {28: (4, 8), 32: (4, 8, 8), 64: (4, 8, 8, 8)}, "hidden": 32}}
LOG_2PI = math.log(2 * math.pi)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored as JSON inside every checkpoint."""
    model: str = "vlae"                      # "vlae" or "hvae"
    image_shape: tuple = (1, 28, 28)         # (C, H, W)
    latent_dims: tuple = (2, 2, 2)           # code size of z_1 (bottom) ... z_L (top)
    size: str = "narrow"                     # a key of SIZES
    combiner: str = "gated"                  # "gated" (the authors' code) or "concat" (Eq. 11)
    likelihood: str = "gaussian"             # "gaussian" (fixed variance, the paper's r) or "bernoulli"
    sigma_x: float = 0.25                    # std of the Gaussian r; 0.25: the authors' loss 8 * sum((x_hat - x)^2)
    channels: tuple = field(default=())      # conv channels; filled from SIZES when empty
    hidden: int = 0                          # filled from SIZES when 0

    def __post_init__(self):
        self.image_shape, self.latent_dims = tuple(self.image_shape), tuple(self.latent_dims)
        by_height = {} if self.channels else SIZES[self.size]["channels"]
        if not self.channels and self.image_shape[1] not in by_height:
            raise ValueError(f"no {self.size} network for {self.image_shape[1]}-pixel images; "
                             f"known heights: {sorted(by_height)} (or give channels)")
        self.channels = tuple(self.channels or by_height[self.image_shape[1]])
        self.hidden = self.hidden or SIZES[self.size]["hidden"]

    to_dict = asdict                         # self -> dict, the JSON stored in a checkpoint


def lrelu(x: Tensor) -> Tensor: return x.leaky_relu(0.1)   # the authors' leaky ReLU slope
def relu(x: Tensor) -> Tensor: return x.relu()


def dense(n_in: int, n_out: int, act=None) -> list:
    """Linear -> BatchNorm -> activation, the unit every MLP in the authors' networks is made of."""
    return [nn.Linear(n_in, n_out), nn.BatchNorm(n_out), act] if act else [nn.Linear(n_in, n_out)]


def mlp(n_in: int, hidden: int, act, n_blocks: int = 2) -> list:
    """n_blocks x (dense, BN, act) followed by a plain dense layer: the authors' g_l, f_L and u_l."""
    return [m for i in range(n_blocks) for m in dense(n_in if i == 0 else hidden, hidden, act)] + dense(hidden, hidden)


def conv_encoder(image_shape: tuple, channels: tuple) -> list:
    """x (B, C, H, W) -> features (B, c_last * H/2^n * W/2^n): n 4x4 stride-2 convolutions, BN, leaky ReLU."""
    ins = [image_shape[0], *channels[:-1]]
    return [m for c_in, c in zip(ins, channels) for m in (nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.BatchNorm(c),
                                                          lrelu)] + [lambda x: x.flatten(1)]


def conv_features(image_shape: tuple, channels: tuple) -> int:
    return channels[-1] * (image_shape[1] >> len(channels)) * (image_shape[2] >> len(channels))


def conv_decoder(n_in: int, image_shape: tuple, channels: tuple) -> list:
    """features (B, n_in) -> logits (B, C, H, W): dense to a (c_last, H/2^n, W/2^n) map, then n transposed convs."""
    c0, h0, w0 = channels[-1], image_shape[1] >> len(channels), image_shape[2] >> len(channels)
    layers = dense(n_in, c0 * h0 * w0, relu) + [lambda x: x.reshape(-1, c0, h0, w0)]
    outs = list(reversed(channels[:-1])) + [image_shape[0]]
    for i, (c_in, c) in enumerate(zip([c0] + outs, outs)):
        last = i == len(outs) - 1                                               # it emits the image's logits
        layers += [nn.ConvTranspose2d(c_in, c, 4, stride=2, padding=1)] + ([] if last else [nn.BatchNorm(c), relu])
    return layers


class GaussianHead:
    """h -> (mu, sigma) of a diagonal Gaussian. sigma = sigmoid(.) + 0.001 as in the authors' code."""
    def __init__(self, n_in: int, n_out: int):
        self.mu, self.sigma = nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)

    def __call__(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.mu(h), self.sigma(h).sigmoid() + 0.001


def reparameterize(mu: Tensor, sigma: Tensor, eps: Tensor | None = None) -> Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2013). A sample drawn here is made contiguous: left lazy,
    every kernel that reads z would redo tinygrad's random draw (the same numbers, drawn again)."""
    return (mu + sigma * Tensor.randn(*mu.shape)).contiguous() if eps is None else mu + sigma * eps


def gaussian_kl(mu: Tensor, sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per example, summed over units (Kingma & Welling 2013, Appendix B):
    KL = 1/2 * sum(mu^2 + sigma^2 - 1 - log sigma^2)."""
    return 0.5 * (mu.square() + sigma.square() - 1 - 2 * sigma.log()).sum(axis=1)


def gaussian_log_prob(z: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """log N(z; mu, sigma^2) per example, summed over all non-batch axes."""
    return (-0.5 * ((z - mu) / sigma).square() - sigma.log() - 0.5 * LOG_2PI).flatten(1).sum(axis=1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) per example: the prior of the VLAE's z and of the HVAE's top layer."""
    return gaussian_log_prob(z, Tensor.zeros(1, 1), Tensor.ones(1, 1))


def log_likelihood(x: Tensor, logits: Tensor, cfg: ModelConfig) -> Tensor:
    """log r(x; f_0(z~_1)) per example (Eq. 10), the image mean sigmoid(logits): gaussian, fixed variance (the paper's;
    a density on [0, 1]^D), or bernoulli for binarized x (log p = x * l - softplus(l), in the overflow-free form)."""
    if cfg.likelihood == "gaussian":
        return gaussian_log_prob(x, logits.sigmoid(), Tensor.full((1,), cfg.sigma_x))
    return (x * logits - logits.relu() - (1 + (-logits.abs()).exp()).log()).flatten(1).sum(axis=1)


def weights(model) -> dict[str, Tensor]:
    """The model's weights and BatchNorm statistics by name: get_state_dict without private attributes (the TinyJits
    `jitted` keeps on a model and the buffers they captured)."""
    return {k: v for k, v in get_state_dict(model).items() if not any(part.startswith("_") for part in k.split("."))}


def init_weights(model) -> None:
    """Weights ~ N(0, 0.02), biases 0, as in the authors' code; BatchNorm keeps scale 1, shift 0."""
    for name, t in weights(model).items():
        if name.endswith(".weight") and t.ndim >= 2:
            t.replace(Tensor.normal(*t.shape, std=0.02))
        elif name.endswith(".bias") and t.ndim == 1:
            t.replace(Tensor.zeros(*t.shape))


def n_params(model) -> int:
    return sum(t.numel() for name, t in weights(model).items() if t.is_param and "running" not in name)


class ELBO(NamedTuple):
    """Per-example terms of the ELBO, each (B,) in nats."""
    elbo: Tensor        # recon - sum(kl)
    recon: Tensor       # E_q[log p(x|z)], one sample
    kl: list            # per layer, bottom (z_1) first


QUANTILES = (0.05, 0.95)     # a 2-D code is swept between these Gaussian quantiles (sample.py, evaluate.py)


def normal_quantiles(n: int, lo: float = QUANTILES[0], hi: float = QUANTILES[1]) -> np.ndarray:
    """The inverse standard-normal CDF at n evenly spaced probabilities from lo to hi: points of the prior N(0, 1)
    with equal prior mass between neighbours, so a grid of them covers the prior as evenly as samples would."""
    return np.array([statistics.NormalDist().inv_cdf(p) for p in np.linspace(lo, hi, n)], np.float32)


def quantile_grid(n: int) -> np.ndarray:
    """(n, n, 2) points of a 2-D code's prior (Fig. 5): [r, c] = (q_c, q_r), unit 1 growing across, unit 2 down."""
    return np.stack(np.meshgrid(*[normal_quantiles(n)] * 2), axis=-1)


def jitted(obj, name: str, fn) -> TinyJit:
    """TinyJit(fn), made on first use and kept on obj as _<name>_jit, so that it compiles once per model (arrays.py)."""
    if f"_{name}_jit" not in vars(obj):
        setattr(obj, f"_{name}_jit", TinyJit(fn))
    return getattr(obj, f"_{name}_jit")


class LatentModel:
    """What both models share. Subclasses define cfg, encode(x), decode_logits(zs) and generate(eps)."""
    cfg: ModelConfig

    L = property(lambda self: len(self.cfg.latent_dims))                   # the number of latent layers

    def decode(self, zs: list[Tensor]) -> Tensor:
        """[z_1, ..., z_L] -> image mean of r(x | z) in [0, 1]; the decoder emits logits."""
        return self.decode_logits(zs).sigmoid()

    def codes(self, x: Tensor) -> list[Tensor]:
        """x -> the eps for which generate(eps) decodes x's posterior means (Eq. 13): for a VLAE, the means mu_l(x)."""
        return [mu for mu, _ in self.encode(x)]


class VLAE(LatentModel):
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        dims, D, ch, shape = cfg.latent_dims, cfg.hidden, cfg.channels, cfg.image_shape
        L, n_conv = len(dims), conv_features(shape, ch)
        if L < 2:
            raise ValueError("a VLAE needs at least 2 latent layers")
        # Inference network, Eq. 12-13: h_l = g_l(h_{l-1}), z_l ~ N(mu_l(h_l), sigma_l(h_l)), h_0 = x.
        # Following the authors' code, g_1 is the identity: z_1 reads x through its own two convolutions.
        # g_2 = convs -> dense; g_l (l > 2) = 2 x (dense, BN, lReLU) -> dense. Heads above z_1 are
        # 2 x (dense, BN, lReLU) -> (mu, sigma). Index i in the lists below is layer l = i + 1.
        self.g = [[]] + [conv_encoder(shape, ch) + dense(n_conv, D)] + [mlp(D, D, lrelu) for _ in range(L - 2)]
        self.head = [conv_encoder(shape, ch) + [GaussianHead(n_conv, dims[0])]]
        self.head += [dense(D, D, lrelu) + dense(D, D, lrelu) + [GaussianHead(D, d)] for d in dims[1:]]
        # Generative network, Eq. 8-11: z~_L = f_L(z_L); z~_l = u_l([z~_{l+1}; v_l(z_l)]); x ~ r(x; f_0(z~_1)).
        self.f_top = mlp(dims[-1], D, relu)
        self.v = [dense(d, D, lrelu if i == 0 else relu) for i, d in enumerate(dims[:-1])]
        n_in = 2 * D if cfg.combiner == "concat" else D
        # u_1 (with f_0 folded in) is the image decoder; higher u_l are MLPs.
        self.u = [conv_decoder(n_in, shape, ch)] + [mlp(n_in, D, relu) for _ in dims[1:-1]]
        # The authors' gated add: z~ + gate * v(z), one gate per unit, initialised to 0.1.
        self.gate = [Tensor.full((D,), 0.1).contiguous() for _ in dims[:-1]] if cfg.combiner == "gated" else []
        init_weights(self)

    def encode(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """x (B, C, H, W) -> [(mu_l, sigma_l), ...] for l = 1..L, each (B, d_l). Eq. 12-13."""
        h, out = x, []
        for g, head in zip(self.g, self.head):
            h = h.sequential(g)                            # Eq. 12: h_l = g_l(h_{l-1})
            out.append(h.sequential(head))                 # Eq. 13: z_l ~ N(mu_l(h_l), sigma_l(h_l))
        return out

    def combine(self, i: int, z_tilde: Tensor, v: Tensor) -> Tensor:
        if self.cfg.combiner == "concat":
            return z_tilde.cat(v, dim=1)                                  # Eq. 11: [z~_{l+1}; v_l(z_l)]
        return z_tilde + self.gate[i] * v                                 # authors' code: z~ + gate * v_l(z_l)

    def decode_logits(self, zs: list[Tensor]) -> Tensor:
        """[z_1, ..., z_L] -> logits of r(x | z) (B, C, H, W)."""
        z_tilde = zs[-1].sequential(self.f_top)                             # Eq. 8: z~_L = f_L(z_L)
        for i in reversed(range(self.L - 1)):                               # l = L-1 .. 1
            v = zs[i].sequential(self.v[i])                                 # v_l(z_l)
            z_tilde = self.combine(i, z_tilde, v).sequential(self.u[i])     # Eq. 9/11: z~_l = u_l([z~_{l+1}; v_l(z_l)])
        return z_tilde                                                      # Eq. 10: f_0(z~_1), here logits

    def elbo(self, x: Tensor) -> ELBO:
        """Eq. 14: L(x) = E_q[log p(x|z)] - KL(q(z|x) || N(0, I)), one reparameterized sample of z."""
        posterior = self.encode(x)
        zs = [reparameterize(mu, sigma) for mu, sigma in posterior]
        recon = log_likelihood(x, self.decode_logits(zs), self.cfg)
        kl = [gaussian_kl(mu, sigma) for mu, sigma in posterior]           # closed form, per layer
        return ELBO(recon - sum(kl[1:], kl[0]), recon, kl)

    def log_weight(self, x: Tensor, eps: list[Tensor]) -> Tensor:
        """log w = log p(x|z) + log p(z) - log q(z|x) (B,) at z_l = mu_l + sigma_l * eps_l: one importance weight of
        the IW bound (Burda et al. 2015). Its mean over eps is the ELBO of Eq. 14, here with a sampled KL."""
        posterior = self.encode(x)
        zs = [reparameterize(mu, sigma, e) for (mu, sigma), e in zip(posterior, eps)]
        log_p = sum(standard_normal_log_prob(z) for z in zs)                                    # p(z) = N(0, I)
        log_q = sum(gaussian_log_prob(z, mu, sigma) for z, (mu, sigma) in zip(zs, posterior))
        return log_likelihood(x, self.decode_logits(zs), self.cfg) + log_p - log_q

    def generate(self, eps: list[Tensor]) -> Tensor:
        """The prior is N(0, I), so z_l = eps_l: images decoded from the given noise."""
        return self.decode(eps)
