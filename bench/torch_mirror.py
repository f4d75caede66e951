"""A PyTorch mirror of the VLAE (vlae.py) and the Markov HVAE (hvae.py), to time the two frameworks on the same
architecture, batch and device. Same layers, initialisation and ELBO as the tinygrad code, and the same parameter
names (a tinygrad state dict loads into it). Optional: torch is not a requirement and only this file imports it.

    python bench/torch_mirror.py --model vlae --size narrow [--batch 100 --steps 20 --reps 3 --threads 2]

prints one JSON line: training images/s and ms/step (Adam, eager, train mode), sampling images/s, parameter count.

study.py also trains with it (`train_torch`): the same loss, KL warm-up, Adam and data order as train.py, about 10x
faster on a CPU, writing checkpoints that train.py's readers (sample.py, evaluate.py) load into the tinygrad model.
"""
from __future__ import annotations
import argparse, json, math, os, statistics, sys, time
from functools import partial
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import torch
from torch import nn
from vlae import ELBO, SIZES, ModelConfig, conv_features

LOG_2PI = math.log(2 * math.pi)
lrelu, relu = partial(nn.LeakyReLU, 0.1), nn.ReLU          # the authors' leaky ReLU slope


def dense(n_in: int, n_out: int, act=None) -> list:
    """Linear -> BatchNorm -> activation (vlae.dense)."""
    return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), act()] if act else [nn.Linear(n_in, n_out)]


def mlp(n_in: int, hidden: int, act, n_blocks: int = 2) -> list:
    """n_blocks x (dense, BN, act) -> plain dense (vlae.mlp)."""
    return [m for i in range(n_blocks) for m in dense(n_in if i == 0 else hidden, hidden, act)] + dense(hidden, hidden)


def conv_encoder(shape: tuple, channels: tuple) -> list:
    """x (B, C, H, W) -> (B, c_last * H/4 * W/4): 4x4 stride-2 convolutions, BN, leaky ReLU."""
    cs = (shape[0], *channels)
    return [m for a, b in zip(cs, cs[1:]) for m in (nn.Conv2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), lrelu())] \
        + [nn.Flatten(1)]


def conv_decoder(n_in: int, shape: tuple, channels: tuple) -> list:
    """(B, n_in) -> logits (B, C, H, W): dense to a (c_last, H/4, W/4) map, then 4x4 stride-2 transposed convs."""
    n, c0, cs = len(channels), channels[-1], [*reversed(channels), shape[0]]
    layers = dense(n_in, c0 * (shape[1] >> n) * (shape[2] >> n), relu) + [nn.Unflatten(1, (c0, shape[1] >> n, -1))]
    for i, (a, b) in enumerate(zip(cs, cs[1:])):
        layers += [nn.ConvTranspose2d(a, b, 4, 2, 1)] + ([nn.BatchNorm2d(b), relu()] if i < n - 1 else [])
    return layers


class GaussianHead(nn.Module):
    """h -> (mu, sigma), sigma = sigmoid(.) + 0.001 as in the authors' code."""
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.mu, self.sigma = nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)

    def forward(self, h): return self.mu(h), torch.sigmoid(self.sigma(h)) + 0.001


def seq(*layer_lists) -> nn.Sequential: return nn.Sequential(*[m for layers in layer_lists for m in layers])
def reparameterize(mu, sigma, eps=None): return mu + sigma * (torch.randn_like(mu) if eps is None else eps)
def n_params(model: nn.Module) -> int: return sum(p.numel() for p in model.parameters() if p.requires_grad)


def gaussian_kl(mu, sigma):
    """KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2) (Kingma & Welling, App. B)."""
    return 0.5 * (mu.square() + sigma.square() - 1 - 2 * sigma.log()).sum(1)


def gaussian_log_prob(z, mu, sigma):
    """log N(z; mu, sigma^2) per example, summed over all non-batch axes; mu and sigma may be numbers."""
    log_sigma = sigma.log() if torch.is_tensor(sigma) else math.log(sigma)
    return (-0.5 * ((z - mu) / sigma).square() - log_sigma - 0.5 * LOG_2PI).flatten(1).sum(1)


def log_likelihood(x, logits, cfg: ModelConfig):
    """log r(x; f_0(z~_1)), Eq. 10: fixed-sigma Gaussian around sigmoid(logits), or overflow-free Bernoulli."""
    if cfg.likelihood == "gaussian": return gaussian_log_prob(x, torch.sigmoid(logits), cfg.sigma_x)
    return (x * logits - logits.relu() - torch.log(1 + torch.exp(-logits.abs()))).flatten(1).sum(1)


def init_weights(model: nn.Module) -> None:
    """Weights ~ N(0, 0.02), biases 0; BatchNorm keeps scale 1, shift 0 (vlae.init_weights)."""
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.ndim >= 2: nn.init.normal_(p, 0.0, 0.02)
        elif name.endswith(".bias") and p.ndim == 1: nn.init.zeros_(p)


class VLAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dims, D, ch, shape = cfg.latent_dims, cfg.hidden, cfg.channels, cfg.image_shape
        L, n_conv = len(dims), conv_features(shape, ch)
        if L < 2: raise ValueError("a VLAE needs at least 2 latent layers")
        # Inference, Eq. 12-13: g_1 = identity, g_2 = convs -> dense, g_l (l > 2) = MLP; a Gaussian head on each h_l
        self.g = nn.ModuleList([seq(), seq(conv_encoder(shape, ch), dense(n_conv, D))]
                               + [seq(mlp(D, D, lrelu)) for _ in range(L - 2)])
        self.head = nn.ModuleList([seq(conv_encoder(shape, ch), [GaussianHead(n_conv, dims[0])])]
                                  + [seq(dense(D, D, lrelu), dense(D, D, lrelu), [GaussianHead(D, d)])
                                     for d in dims[1:]])
        # Generation, Eq. 8-11: z~_L = f_L(z_L); z~_l = u_l([z~_{l+1}; v_l(z_l)]); u_1 includes f_0
        self.f_top = seq(mlp(dims[-1], D, relu))
        self.v = nn.ModuleList([seq(dense(d, D, lrelu if i == 0 else relu)) for i, d in enumerate(dims[:-1])])
        n_in = 2 * D if cfg.combiner == "concat" else D
        self.u = nn.ModuleList([seq(conv_decoder(n_in, shape, ch))] + [seq(mlp(n_in, D, relu)) for _ in dims[1:-1]])
        # The authors' gated add: z~ + gate * v(z), one gate per unit, initialised to 0.1
        self.gate = nn.ParameterList([nn.Parameter(torch.full((D,), 0.1)) for _ in dims[:-1]]
                                     if cfg.combiner == "gated" else [])
        init_weights(self)

    def encode(self, x):
        h, out = x, []
        for g, head in zip(self.g, self.head):
            h = g(h)                                     # Eq. 12: h_l = g_l(h_{l-1})
            out.append(head(h))                          # Eq. 13: z_l ~ N(mu_l(h_l), sigma_l(h_l))
        return out

    def decode_logits(self, zs):
        z_tilde = self.f_top(zs[-1])                                         # Eq. 8: z~_L = f_L(z_L)
        for i in reversed(range(len(zs) - 1)):
            v = self.v[i](zs[i])
            c = torch.cat([z_tilde, v], 1) if self.cfg.combiner == "concat" else z_tilde + self.gate[i] * v
            z_tilde = self.u[i](c)                                           # Eq. 9/11
        return z_tilde                                                       # Eq. 10: f_0(z~_1) as logits

    def elbo(self, x) -> ELBO:
        """Eq. 14: one reparameterized sample for the reconstruction, closed-form KL per layer."""
        posterior = self.encode(x)
        recon = log_likelihood(x, self.decode_logits([reparameterize(m, s) for m, s in posterior]), self.cfg)
        kl = [gaussian_kl(m, s) for m, s in posterior]
        return ELBO(recon - sum(kl[1:], kl[0]), recon, kl)

    def generate(self, eps): return torch.sigmoid(self.decode_logits(eps))   # prior N(0, I): z_l = eps_l


class HVAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dims, D, ch, shape = cfg.latent_dims, cfg.hidden, cfg.channels, cfg.image_shape
        # q(z_1 | x): convs -> 2 x (dense, BN, lReLU) -> head; q(z_{l+1} | z_l): 2 x (dense, BN, lReLU) -> head
        self.q = nn.ModuleList([seq(conv_encoder(shape, ch), dense(conv_features(shape, ch), D, lrelu),
                                    dense(D, D, lrelu), [GaussianHead(D, dims[0])])]
                               + [seq(dense(a, D, lrelu), dense(D, D, lrelu), [GaussianHead(D, d)])
                                  for a, d in zip(dims, dims[1:])])
        # p(z_l | z_{l+1}): 3 x (dense, BN, ReLU) -> head; p(x | z_1): 2 x (dense, BN, ReLU) -> image decoder
        self.p = nn.ModuleList([seq(dense(a, D, relu), dense(D, D, relu), dense(D, D, relu), [GaussianHead(D, d)])
                                for d, a in zip(dims, dims[1:])])
        self.p_x = seq(dense(dims[0], D, relu), dense(D, 2 * D, relu), conv_decoder(2 * D, shape, ch))
        init_weights(self)

    def elbo(self, x, eps=None) -> ELBO:
        """Eq. 5, one sample per layer: log p(x|z_1) + sum_l [log p(z_l|z_{l+1}) - log q(z_l|z_{l-1})], z_0 = x."""
        zs, log_q, h = [], [], x
        for i, q in enumerate(self.q):
            mu, sigma = q(h)
            zs.append(h := reparameterize(mu, sigma, None if eps is None else eps[i]))
            log_q.append(gaussian_log_prob(h, mu, sigma))
        log_p = [gaussian_log_prob(z, *p(z_above)) for p, z, z_above in zip(self.p, zs, zs[1:])]
        log_p.append(gaussian_log_prob(zs[-1], 0.0, 1.0))                    # p(z_L) = N(0, I)
        recon = log_likelihood(x, self.p_x(zs[0]), self.cfg)
        kl = [lq - lp for lq, lp in zip(log_q, log_p)]
        return ELBO(recon - sum(kl[1:], kl[0]), recon, kl)

    def generate(self, eps):
        """Eq. 15: z_L = eps_L, z_l = mu_l(z_{l+1}) + sigma_l(z_{l+1}) * eps_l top down; image means of p(x|z_1)."""
        z = eps[-1]
        for i in reversed(range(len(eps) - 1)): z = reparameterize(*self.p[i](z), eps[i])
        return torch.sigmoid(self.p_x(z))


def build(cfg: ModelConfig) -> nn.Module: return (VLAE if cfg.model == "vlae" else HVAE)(cfg)


def adam_step(model: nn.Module, x: torch.Tensor):
    """One Adam(1e-3) step on the plain ELBO of the fixed batch x: the step bench() times and profile() splits."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step():
        opt.zero_grad(set_to_none=True)
        out = model.elbo(x)
        (torch.stack(out.kl, 1).sum(1).mean() - out.recon.mean()).backward()
        opt.step()
    return train_step


def fixed_batch_step(model_name: str, size: str, batch: int, threads: int | None = None, device: str = "cpu"):
    """What bench(), profile() and serve() time: a seeded model in train mode and its Adam step (adam_step) on one
    fixed random batch. Returns (cfg, model, train_step)."""
    if threads: torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ModelConfig(model=model_name, size=size)
    model = build(cfg).to(device).train()
    x = torch.from_numpy(np.random.default_rng(0).random((batch, *cfg.image_shape), dtype=np.float32)).to(device)
    return cfg, model, adam_step(model, x)


def profile(model_name: str, size: str, batch: int = 100, steps: int = 10, top: int = 15,
            threads: int | None = None) -> dict:
    """torch.profiler's view of the same training step on the CPU: the operators with the most self time per step,
    to set beside bench.py --profile's per-kernel table of the tinygrad step."""
    from torch.profiler import profile as torch_profile, ProfilerActivity
    _, _, train_step = fixed_batch_step(model_name, size, batch, threads)
    for _ in range(3): train_step()
    t = time.perf_counter()
    for _ in range(steps): train_step()
    step_ms = 1e3 * (time.perf_counter() - t) / steps
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps): train_step()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    rows = [{"op": e.key, "calls_per_step": e.count / steps, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "share": e.self_cpu_time_total / total} for e in ops[:top]]
    return {"framework": "torch " + torch.__version__, "threads": torch.get_num_threads(), "size": size,
            "model": model_name, "batch": batch, "ms_per_step": step_ms, "ops": rows}


def bench(model_name: str, size: str, batch: int = 100, steps: int = 20, warmup: int = 3, reps: int = 3,
          threads: int | None = None, device: str = "cpu") -> dict:
    """Adam(1e-3) steps on one fixed batch (train mode, plain ELBO), then generate() in eval mode without grad.
    ms_per_step is the median over reps of each rep's median step time; min/max are over the reps' medians."""
    cfg, model, train_step = fixed_batch_step(model_name, size, batch, threads, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def seconds(fn) -> float:
        t = time.perf_counter()
        fn(), sync()
        return time.perf_counter() - t

    def medians(fn) -> list:                      # per-rep median seconds of fn, after `warmup` untimed calls
        for _ in range(warmup): seconds(fn)
        return [statistics.median([seconds(fn) for _ in range(steps)]) for _ in range(reps)]

    model.train()
    train = medians(train_step)
    model.eval()
    eps = [torch.randn(batch, d, device=device) for d in cfg.latent_dims]
    with torch.no_grad(): sample = medians(lambda: model.generate(eps))
    med = statistics.median(train)
    return {"framework": "torch " + torch.__version__, "threads": torch.get_num_threads(),
            "images_per_s": batch / med, "ms_per_step": 1e3 * med, "ms_per_step_min": 1e3 * min(train),
            "ms_per_step_max": 1e3 * max(train), "sample_images_per_s": batch / statistics.median(sample),
            "params": n_params(model)}


def serve(model_name: str, size: str, batch: int = 100, warmup: int = 3, threads: int | None = None) -> None:
    """bench.py --paired: the training step of bench(), set up once; then for each line n read from stdin, n steps
    timed, and a line with the seconds per step. Ends at the end of its input."""
    _, _, train_step = fixed_batch_step(model_name, size, batch, threads)
    for _ in range(warmup): train_step()
    print(json.dumps({"framework": "torch " + torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        t = time.perf_counter()
        for _ in range(int(line)): train_step()
        print((time.perf_counter() - t) / int(line), flush=True)


def kl_weight(step: int, warmup: int) -> float:
    """The KL warm-up of train.py (train.kl_weight): 1 - exp(-step / warmup), 1 when warmup = 0."""
    return 1.0 - math.exp(-step / warmup) if warmup > 0 else 1.0


def train_step(model: nn.Module, opt, xb: torch.Tensor, step: int, kl_warmup: int) -> torch.Tensor:
    """One step of train.py's Trainer in PyTorch: loss = sum_l beta * KL_l - recon (Eq. 14, or Eq. 5 for the HVAE,
    beta the warm-up weight at this 1-based step), backward, Adam. Returns (loss, recon, kl_1..kl_L)."""
    out = model.elbo(xb)
    kl = torch.stack(out.kl, 1).mean(0)
    loss = kl_weight(step, kl_warmup) * kl.sum() - out.recon.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return torch.cat([loss.detach().reshape(1), out.recon.detach().mean().reshape(1), kl.detach()])


def train_torch(cfg: ModelConfig, train_x: np.ndarray, train_y: np.ndarray, *, lr: float, kl_warmup: int,
                seed: int, epochs: int, batch_size: int = 100, threads: int = 1, on_epoch=None) -> nn.Module:
    """train.py's loop in PyTorch: train_step on batches in data.batches' order for (seed, epoch). on_epoch(model,
    epoch, stats) is called after each epoch (model in train mode; stats: mean train loss, recon, KL per layer,
    seconds)."""
    from data import batches
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step, binarize = 0, cfg.likelihood == "bernoulli"
    for epoch in range(epochs):
        model.train()
        t0, sums, n = time.perf_counter(), None, 0
        for xb, _ in batches(train_x, train_y, batch_size, seed, epoch, binarize=binarize):
            step += 1
            row = train_step(model, opt, torch.from_numpy(xb), step, kl_warmup)
            sums, n = (row if sums is None else sums + row), n + 1
        if not torch.isfinite(sums).all(): raise FloatingPointError(f"the loss became nan or inf in epoch {epoch + 1}")
        print(f"epoch {epoch + 1}: train loss {float(sums[0] / n):.2f}, {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
        if on_epoch: on_epoch(model, epoch + 1, {"step": step, "train": (sums / n).tolist(),
                                                  "seconds": time.perf_counter() - t0})
    return model


def tinygrad_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters and BatchNorm buffers as numpy arrays, under the names vlae.weights() gives the tinygrad
    model (the same names, shapes and dtypes)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("vlae", "hvae"), default="vlae")
    ap.add_argument("--size", choices=tuple(SIZES), default="narrow")
    for k, v in (("batch", 100), ("steps", 20), ("warmup", 3), ("reps", 3)):
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="instead of timing, print torch.profiler's N operators with the most self time per step")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)   # bench.py --paired
    a = ap.parse_args()
    if a.serve: serve(a.model, a.size, a.batch, a.warmup, a.threads)
    elif a.profile: print(json.dumps(profile(a.model, a.size, a.batch, a.steps, a.profile, a.threads)))
    else: print(json.dumps(bench(a.model, a.size, a.batch, a.steps, a.warmup, a.reps, a.threads, a.device)))
