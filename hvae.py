"""The Markov hierarchical VAE (paper Eq. 4-5): the stacked model the VLAE paper argues against (section 3).

    p(x, z) = p(x | z_1) prod_{l<L} p(z_l | z_{l+1}) p(z_L),   p(z_L) = N(0, I),
    p(z_l | z_{l+1}) = N(mu_l(z_{l+1}), sigma_l(z_{l+1})),      inference bottom-up: q(z_1 | x), q(z_{l+1} | z_l).

Proposition 1: at the optimum of the ELBO, the Gibbs chain z_1 ~ q(z_1 | x_t), x_{t+1} ~ p(x | z_1) (bottom layer
only) samples the data distribution; `gibbs_chain` runs it. `generate(eps)` is Eq. 15 with caller-supplied noise, so
eps can be fixed at all layers but one (Fig. 3).
"""
from __future__ import annotations
import numpy as np
from tinygrad import Tensor
from vlae import (ELBO, LatentModel, ModelConfig, GaussianHead, conv_encoder, conv_features, conv_decoder, dense,
                  gaussian_log_prob, init_weights, jitted, log_likelihood, lrelu, relu, reparameterize,
                  standard_normal_log_prob)


class HVAE(LatentModel):
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        dims, D, ch, shape = cfg.latent_dims, cfg.hidden, cfg.channels, cfg.image_shape
        # The VLAE's convolution stacks and dense widths, so the two have about as many parameters
        # q(z_1 | x): convs -> 2 x (dense, BN, lReLU) -> (mu, sigma); q(z_{l+1} | z_l): 2 x (dense, BN, lReLU) -> head
        self.q = [conv_encoder(shape, ch) + dense(conv_features(shape, ch), D, lrelu) + dense(D, D, lrelu)
                  + [GaussianHead(D, dims[0])]]
        self.q += [dense(d_in, D, lrelu) + dense(D, D, lrelu) + [GaussianHead(D, d)] for d_in, d in zip(dims, dims[1:])]
        # p(z_l | z_{l+1}), l = 1..L-1: 3 x (dense, BN, ReLU) -> (mu, sigma)
        self.p = [dense(d_above, D, relu) + dense(D, D, relu) + dense(D, D, relu) + [GaussianHead(D, d)]
                  for d, d_above in zip(dims, dims[1:])]
        # p(x | z_1): 2 x (dense, BN, ReLU) -> the image decoder the VLAE uses at its bottom level
        self.p_x = dense(dims[0], D, relu) + dense(D, 2 * D, relu) + conv_decoder(2 * D, shape, ch)
        init_weights(self)

    def encode(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Bottom-up q(z_1 | x), q(z_{l+1} | z_l), each on the mean below: [(mu_l, sigma_l), ...], each (B, d_l)."""
        out = []
        for q in self.q:
            out.append((out[-1][0] if out else x).sequential(q))
        return out

    def prior_params(self, zs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """(mu_l(z_{l+1}), sigma_l(z_{l+1})) of p(z_l | z_{l+1}) for l = 1..L-1."""
        return [z_above.sequential(p) for p, z_above in zip(self.p, zs[1:])]

    def decode_logits(self, zs: list[Tensor]) -> Tensor:
        """Logits of p(x | z_1); the Markov model never looks at z_2..z_L here."""
        return zs[0].sequential(self.p_x)

    def elbo(self, x: Tensor, eps: list[Tensor] | None = None) -> ELBO:
        """Eq. 5 with one reparameterized sample per layer (drawn here, or z_l = mu_l + sigma_l * eps_l):
        log p(x | z_1) + sum_l [log p(z_l | z_{l+1}) - log q(z_l | z_{l-1})], z_0 = x, p(z_L) = N(0, I).
        kl[l] is the single-sample estimate log q(z_l | .) - log p(z_l | .) of layer l's share."""
        zs, log_q = [], []
        for i, q in enumerate(self.q):
            mu, sigma = (zs[-1] if zs else x).sequential(q)
            zs.append(reparameterize(mu, sigma, None if eps is None else eps[i]))
            log_q.append(gaussian_log_prob(zs[-1], mu, sigma))
        log_p = [gaussian_log_prob(z, mu, sigma) for z, (mu, sigma) in zip(zs, self.prior_params(zs))]
        log_p.append(standard_normal_log_prob(zs[-1]))                                   # p(z_L) = N(0, I)
        recon = log_likelihood(x, self.decode_logits(zs), self.cfg)
        kl = [lq - lp for lq, lp in zip(log_q, log_p)]
        return ELBO(recon - sum(kl[1:], kl[0]), recon, kl)

    def log_weight(self, x: Tensor, eps: list[Tensor]) -> Tensor:
        """log w = log p(x, z) - log q(z | x) (B,) for the z of eps: Eq. 5's one-sample ELBO (Burda et al. 2015)."""
        return self.elbo(x, eps).elbo

    def generate_latents(self, eps: list[Tensor]) -> list[Tensor]:
        """Eq. 15: z_L = eps_L, z_l = mu_l(z_{l+1}) + sigma_l(z_{l+1}) * eps_l, top down; eps bottom first."""
        zs = [eps[-1]]
        for i in reversed(range(self.L - 1)):
            mu, sigma = zs[0].sequential(self.p[i])
            zs.insert(0, reparameterize(mu, sigma, eps[i]))
        return zs

    def codes(self, x: Tensor) -> list[Tensor]:
        """x -> the eps of Eq. 15 that generate the posterior means z_l = mu_l(x): eps_L = z_L and, solving
        z_l = mu_l(z_{l+1}) + sigma_l(z_{l+1}) * eps_l, eps_l = (z_l - mu_l(z_{l+1})) / sigma_l(z_{l+1})."""
        zs = [mu for mu, _ in self.encode(x)]
        return [(z - mu) / sigma for z, (mu, sigma) in zip(zs, self.prior_params(zs))] + [zs[-1]]

    def generate(self, eps: list[Tensor]) -> Tensor:
        """Ancestral sampling with caller-supplied noise: image means of p(x | z_1)."""
        return self.decode(self.generate_latents(eps))

    def gibbs_step(self, x: Tensor, eps: Tensor, noise: Tensor, sample_x: bool = True) -> Tensor:
        """Proposition 1, Eq. 6: z_1 ~ q(z_1 | x_t), then x_{t+1} ~ p(x | z_1) (or its mean). The noise comes in as
        arguments (eps ~ N(0, I), noise ~ U(0, 1)) so that a jitted chain follows Tensor.manual_seed exactly."""
        mu, sigma = x.sequential(self.q[0])
        mean = self.decode([reparameterize(mu, sigma, eps)])
        if not sample_x:
            return mean
        if self.cfg.likelihood == "bernoulli":
            return (noise < mean).float()
        # Gaussian r: mean + sigma_x * N(0, 1), the normal drawn from the uniform by the Box-Muller transform
        normal = (-2 * noise[0].log()).sqrt() * (2 * np.pi * noise[1]).cos()
        return (mean + self.cfg.sigma_x * normal).clip(0, 1)

    def gibbs_chain(self, x0: Tensor | int, steps: int, sample_x: bool = True) -> np.ndarray:
        """The bottom-layer Gibbs chain for `steps` steps from images x0 (B, C, H, W), or from uniform noise when x0 is
        a number of chains: every state, (steps + 1, B, C, H, W), state 0 is x0. The upper layers play no part."""
        x = Tensor.rand(x0, *self.cfg.image_shape) if isinstance(x0, int) else x0
        step = jitted(self, f"gibbs_{'sampled' if sample_x else 'means'}",
                      lambda *a: self.gibbs_step(*a, sample_x).realize())
        states = [x.contiguous().realize()]
        for _ in range(steps):
            eps = Tensor.randn(x.shape[0], self.cfg.latent_dims[0]).realize()
            noise = Tensor.rand(2, *x.shape).clamp(1e-7, 1).realize()
            states.append(step(states[-1], eps, noise).clone().realize())
        return np.stack([s.numpy() for s in states])
