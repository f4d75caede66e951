"""Measure what the paper shows by eye: likelihood bounds, active units, and the claims of its Fig. 2, 3 and 5.

    python evaluate.py --run out/mnist-vlae     # prints a markdown report; writes out/mnist-vlae/evaluation.json
    python evaluate.py --run out/mnist-hvae     # the same for the HVAE, plus its Gibbs chain (Fig. 2)

- Likelihood: the test-set ELBO and the importance-weighted bound IW-k of Burda et al. (2015) on a test subset.
- Active units (Burda et al.): unit u is active when Cov_x(E_q[z_u | x]) > 0.01.
- Fig. 5 / Fig. 3: resample one layer with the others fixed and measure what changes: digit identity (a small
  classifier), stroke thickness, width, slant, and the share of pixel variance.
- Fig. 2 (HVAE): the bottom-layer Gibbs chain next to ancestral sampling: classifier confidence, class entropy and a
  Frechet distance in the classifier's feature space to the test set.
The classifier is trained once (a few minutes on a CPU) and cached with its test accuracy (--classifier).
"""
from __future__ import annotations
import argparse, json, math, sys, time
from pathlib import Path
import numpy as np
from tinygrad import Tensor, Context, TinyJit, nn
from tinygrad.helpers import tqdm
from data import DataError, Dataset, as_float, batches, binarized_test_set, load_dataset
from checkpoint import UserError, atomic_safe_save, load_model, load_part, read_safetensors
from vlae import jitted, quantile_grid, weights
from arrays import batched, elbo_parts, generate_images, posterior_means
import fast

ACTIVE = 0.01               # Burda et al. 2015: a unit is active when Cov_x(E_q[z_u]) exceeds this
ATTRIBUTES = ("identity", "thickness", "width", "slant")
# Context for Bernoulli bounds on binarized MNIST (log p(x) in nats; higher is better)
PUBLISHED = ("e.g. about -79 for a 3-layer ladder VAE (LVAE, Sonderby et al. 2016) with IW-1000, and -86.76 for a "
             "one-layer VAE and -82.90 for a two-layer IWAE with IW-5000 (Burda et al. 2015)")


# ---------------------------------------------------------------------------------------------------------
# Attributes of a digit image, measured on its ink (numpy)
# ---------------------------------------------------------------------------------------------------------

def attributes(images: np.ndarray, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """images (N, H, W) or (N, 1, H, W) in [0, 1] -> per image (N,) each:
    thickness: ink area / half the ink perimeter (for a stroke of width w and length l >> w, about w);
    slant: the second-moment shear -cov(x, y) / var(y) of the intensity (0 = upright, > 0 leans right);
    width: horizontal spread of the intensity once that shear is removed, std of x - slant * y, in pixels."""
    img = images.reshape(len(images), *images.shape[-2:]).astype(np.float64)
    ink = img > threshold
    area = ink.sum(axis=(1, 2))
    padded = np.pad(ink, ((0, 0), (1, 1), (1, 1)))
    edges_y = (padded[:, 1:] != padded[:, :-1]).sum(axis=(1, 2))          # ink/background borders between rows
    edges_x = (padded[:, :, 1:] != padded[:, :, :-1]).sum(axis=(1, 2))     # ... and between columns
    perimeter = edges_y + edges_x
    thickness = np.where(perimeter > 0, 2 * area / np.maximum(perimeter, 1), 0.0)

    mass = img.sum(axis=(1, 2)) + 1e-8
    ys, xs = np.mgrid[:img.shape[1], :img.shape[2]]
    mean_x = (img * xs).sum(axis=(1, 2)) / mass
    mean_y = (img * ys).sum(axis=(1, 2)) / mass
    dx, dy = xs - mean_x[:, None, None], ys - mean_y[:, None, None]   # image rows (y) grow downwards
    var_y = (img * dy ** 2).sum(axis=(1, 2)) / mass + 1e-8
    cov_xy = (img * dx * dy).sum(axis=(1, 2)) / mass
    slant = -cov_xy / var_y
    width = np.sqrt((img * (dx + slant[:, None, None] * dy) ** 2).sum(axis=(1, 2)) / mass)
    return {"thickness": thickness, "width": width, "slant": slant}


# ---------------------------------------------------------------------------------------------------------
# Statistics (numpy)
# ---------------------------------------------------------------------------------------------------------

def log_mean_exp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).mean(axis=axis, keepdims=True))).squeeze(axis)


def iw_bounds(log_w: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    """log_w (N, K): K importance weights per image -> for each k dividing K, the IW-k bound per image (N,)
    (Burda et al. 2015: log (1/k) sum_i w_i, averaged over the K/k disjoint groups of k consecutive samples).
    Each group of k is a union of groups of every smaller k in ks that divides k, so by Jensen the estimate
    never decreases with k; IW-1 is the plain ELBO estimated with sampled KL terms."""
    n, K = log_w.shape
    return {k: log_mean_exp(log_w.reshape(n, K // k, k).astype(np.float64)).mean(axis=1) for k in ks}


def active_units(means: np.ndarray, threshold: float = ACTIVE) -> tuple[np.ndarray, int]:
    """means (N, d): E_q[z | x] for N inputs -> (Cov_x of each unit (d,), number of units above the threshold)."""
    var = means.astype(np.float64).var(axis=0)
    return var, int((var > threshold).sum())


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance of a feature set (N, F): the Gaussian frechet_distance compares."""
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, F) and b (M, F), each given as the set or as
    its gaussian_fit (as in FID, Heusel et al. 2017): |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)).
    tr((C_a C_b)^(1/2)) is computed as the sum of the square roots of the eigenvalues of C_a^(1/2) C_b C_a^(1/2),
    which is symmetric: numpy alone, no scipy."""
    (mu_a, c_a), (mu_b, c_b) = (f if isinstance(f, tuple) else gaussian_fit(f) for f in (a, b))
    w, v = np.linalg.eigh(c_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ c_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(c_a) + np.trace(c_b) - 2 * cross)


def label_entropy(labels: np.ndarray, n_classes: int = 10) -> float:
    """Entropy (nats) of the histogram of predicted classes; ln 10 = 2.30 when all ten are equally frequent."""
    p = np.bincount(labels, minlength=n_classes) / len(labels)
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


# ---------------------------------------------------------------------------------------------------------
# The MNIST classifier used to measure generated images (never for training the models)
# ---------------------------------------------------------------------------------------------------------

class Classifier:
    """A small CNN: 2 x (conv 3x3, ReLU, max-pool) -> dense 128 (the features of the Frechet distance) -> 10."""
    def __init__(self):
        self.conv = [nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)]
        self.fc1, self.fc2 = nn.Linear(32 * 7 * 7, 128), nn.Linear(128, 10)

    def features(self, x: Tensor) -> Tensor:
        for conv in self.conv: x = conv(x).relu().max_pool2d(2)
        return self.fc1(x.flatten(1)).relu()                       # (B, 128)

    def __call__(self, x: Tensor) -> Tensor: return self.fc2(self.features(x))    # logits (B, 10)


def classify(clf: Classifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """images (N, 1, 28, 28) -> (class probabilities (N, 10), features (N, 128))."""
    run = jitted(clf, "classify", lambda x: (clf(x).softmax().realize(), clf.features(x).realize()))
    return batched(lambda xb: run(xb[0]), [images.reshape(-1, 1, 28, 28)])


def train_classifier(ds: Dataset, epochs: int, seed: int = 0) -> tuple[Classifier, float]:
    """Adam on the cross-entropy, batch 100; returns the classifier and its test accuracy."""
    Tensor.manual_seed(seed)
    clf = Classifier()
    opt = nn.optim.Adam(nn.state.get_parameters(clf), lr=1e-3)

    @TinyJit
    def step(x: Tensor, y: Tensor) -> Tensor:
        with Context(TRAINING=1):
            opt.zero_grad()
            loss = clf(x).sparse_categorical_crossentropy(y)
            loss.backward()
            opt.step()
            return loss.realize()

    for epoch in range(epochs):
        for x, y in tqdm(batches(ds.train_x, ds.train_y, 100, seed, epoch), total=len(ds.train_x) // 100,
                         desc=f"classifier epoch {epoch + 1}/{epochs}"):
            step(Tensor(x), Tensor(y.astype(np.int32)))
    probs, _ = classify(clf, ds.test_x)
    return clf, float((probs.argmax(1) == ds.test_y).mean())


def load_classifier(path: Path, ds: Dataset, epochs: int) -> tuple[Classifier, float]:
    """The cached classifier at path, or a new one trained on ds and saved there (with its test accuracy)."""
    clf = Classifier()
    if path.exists():
        try:
            state, meta = read_safetensors(path)
            load_part(clf, state)
            accuracy = json.loads(meta["test_accuracy"])
        except Exception as e:
            raise UserError(f"{path} is not a readable classifier ({type(e).__name__}: {e}); delete it and "
                            f"evaluate.py trains a new one") from None
        return clf, float(accuracy)
    print(f"training the evaluation classifier once ({epochs} epochs); it is cached at {path}", file=sys.stderr)
    clf, accuracy = train_classifier(ds, epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_safe_save(weights(clf), path, {"test_accuracy": accuracy, "epochs": epochs})
    print(f"classifier test accuracy {100 * accuracy:.2f}%", file=sys.stderr)
    return clf, accuracy


# ---------------------------------------------------------------------------------------------------------
# Measurements of a model
# ---------------------------------------------------------------------------------------------------------

def log_weights(model, x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """x (N, C, H, W) -> log importance weights (N, k), log p(x, z_i) - log q(z_i | x), z_i ~ q(z | x)."""
    run = jitted(model, "log_weight", lambda x, *eps: model.log_weight(x, list(eps)).realize())
    out = np.empty((len(x), k), np.float32)
    for i in tqdm(range(k), desc=f"IW-{k}"):
        eps = [rng.standard_normal((len(x), d), dtype=np.float32) for d in model.cfg.latent_dims]
        out[:, i] = batched(lambda a: run(a[0], *a[1:]), [x, *eps])
    return out


def layer_effects(generate_fn, dims: tuple, clf: Classifier, bases: int, resamples: int,
                  rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """For each layer l: `bases` draws of every layer's noise (the contexts, the same for every layer); in each, 
    `resamples` new draws of layer l only (z_l for a VLAE, eps_l of Eq. 15 for an HVAE). Per layer and context, how
    much each measure changes: identity = probability that two resampled images get different classifier labels;
    thickness, width, slant = their standard deviation; pixel_var = per-pixel variance; `*_same` = the same three over
    the images that keep the context's most common label (style at fixed identity; nan where fewer than 2 do).
    Returns per layer a dict of arrays (bases,); `means` averages them over the contexts.
    generate_fn: noise per layer (..., d_l) -> images (..., C, H, W)."""
    fixed = [rng.standard_normal((bases, 1, d), dtype=np.float32) for d in dims]     # the same contexts for all layers
    out = []
    for l in range(len(dims)):
        eps = [np.broadcast_to(f, (bases, resamples, f.shape[-1])) for f in fixed]
        eps[l] = rng.standard_normal((bases, resamples, dims[l]), dtype=np.float32)
        images = generate_fn(eps)                                       # (bases, resamples, C, H, W)
        probs, _ = classify(clf, images.reshape(-1, *images.shape[2:]))
        labels = probs.argmax(1).reshape(bases, resamples)
        attrs = {k: v.reshape(bases, resamples) for k, v in attributes(images.reshape(-1, *images.shape[2:])).items()}
        share = np.stack([(labels == c).mean(1) for c in range(10)], 1)  # (bases, 10) label histogram per context
        units = {"identity": 1 - (share ** 2).sum(1), "pixel_var": images.reshape(bases, resamples, -1).var(1).mean(1)}
        units |= {k: v.std(axis=1) for k, v in attrs.items()}
        keep = labels == share.argmax(1)[:, None]                        # images with the context's commonest label
        for k, v in attrs.items():
            units[f"{k}_same"] = np.array([v[b, keep[b]].std() if keep[b].sum() >= 2 else np.nan for b in range(bases)])
        out.append(units)
    return out


def means(units: list[dict[str, np.ndarray]]) -> list[dict[str, float]]:
    """layer_effects' per-context values averaged over the contexts (a context without a value is left out)."""
    return [{k: float(np.nanmean(v)) if np.isfinite(v).any() else 0.0 for k, v in u.items()} for u in units]


def same_label_rate(labels: np.ndarray) -> float:
    """P(two different images get the same label), estimated without bias from label counts: sum n(n-1) / N(N-1)."""
    counts = np.bincount(labels.ravel(), minlength=10).astype(np.float64)
    n = counts.sum()
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def identity_explained(labels: np.ndarray) -> float:
    """labels (cells, draws) -> how much of the label the cell fixes, from 0 (no more than chance) to 1 (every draw
    in a cell gets the same label): (P(same label | same cell) - P(same label)) / (1 - P(same label)),
    the share of label diversity removed by knowing the cell (a Gini analogue of the variance explained)."""
    within = np.mean([same_label_rate(row) for row in labels])
    overall = same_label_rate(labels)
    return float((within - overall) / (1 - overall)) if overall < 1 else 0.0


def style_explained(values: np.ndarray, labels: np.ndarray) -> float:
    """values, labels (cells, draws) -> the share of an attribute's variance that the cell explains at fixed identity:
    each value minus the mean over images of its label (so that a cell which changes the digit gets no credit for the
    width or thickness that comes with the new digit), then between-cell variance over total variance (the
    intraclass correlation: the cell means' variance less the part that within-cell noise puts there)."""
    label_mean = np.zeros(10)
    for c in np.unique(labels): label_mean[c] = values[labels == c].mean()
    r = values - label_mean[labels]
    draws = r.shape[1]
    between = r.mean(1).var() - r.var(1, ddof=1).mean() / draws
    total = r.var()
    return float(max(between, 0.0) / total) if total > 0 else 0.0


def grid_draws(generate_fn, dims: tuple, clf: Classifier, side: int, draws: int,
               rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """The authors' protocol (Fig. 5): layer l's code on a side x side grid of Gaussian quantiles (a 2-D code; other
    sizes take side^2 draws from the prior; the same cells for every layer), every other layer drawn afresh for each
    of `draws` images per cell. Per layer: the classifier's labels and the attributes, each (cells, draws)."""
    code = quantile_grid(side).reshape(-1, 2)
    out = []
    for l, d in enumerate(dims):
        cells = code if d == 2 else rng.standard_normal((side * side, d))
        eps = [rng.standard_normal((len(cells), draws, e), dtype=np.float32) for e in dims]
        eps[l] = np.broadcast_to(cells[:, None, :], (len(cells), draws, d)).astype(np.float32)
        images = generate_fn(eps)                                       # (cells, draws, C, H, W)
        flat = images.reshape(-1, *images.shape[2:])
        labels = classify(clf, flat)[0].argmax(1).reshape(len(cells), draws)
        out.append({"labels": labels} | {k: v.reshape(len(cells), draws) for k, v in attributes(flat).items()})
    return out


def grid_scores(grid: list[dict[str, np.ndarray]], cells: np.ndarray | None = None) -> list[dict[str, float]]:
    """Per layer, how much of the digit's identity and (at fixed identity) of its thickness, width and slant the cell
    explains, each from 0 to 1 (identity_explained, style_explained), over the given cells (default: all). A layer
    whose meaning is stable across the other layers' draws scores high on the attribute it controls."""
    out = []
    for g in grid:
        idx = np.arange(len(g["labels"])) if cells is None else cells
        labels = g["labels"][idx]
        out.append({"identity": identity_explained(labels)}
                   | {k: style_explained(g[k][idx], labels) for k in ("thickness", "width", "slant")})
    return out


def normalised(rows: list[dict], key: str) -> list[float]:
    """One measure's share per layer (sums to 1 over the layers)."""
    total = sum(r[key] for r in rows)
    return [r[key] / total if total > 0 else 0.0 for r in rows]


# The keys each measure compares across layers. "resample" judges style among the draws that keep the context's label
# (at fixed identity); "all draws" is the same resampling with style measured over every draw (reported, not judged)
FIG5_KEYS = {"resample": {"identity": "identity", "thickness": "thickness_same", "width": "width_same",
                          "slant": "slant_same"},
             "all draws": {k: k for k in ATTRIBUTES}, "grid": {k: k for k in ATTRIBUTES}}
JUDGED = ("resample", "grid")                # a seed's verdict needs both (docs/fig5-protocol.md)
BOOTSTRAP, LEVEL = 2000, 0.95                # resamples; a check holds when P(named layer largest) >= LEVEL


def fig5_quantities(rows: list[dict], keys: dict) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The paper's three Fig. 5 claims as (quantity per layer, the layers the claim names, 0-based): the bottom
    layer's thickness share; the middle layers' share of width and tilt (the mean of the width and slant shares:
    the paper names both); the top layer's identity share. Shares are across layers (each attribute sums to 1)."""
    L = len(rows)
    share = {a: np.array(normalised(rows, k)) for a, k in keys.items()}
    out = {"bottom = thickness": (share["thickness"], [0])}
    if L > 2: out["middle = width/slant"] = ((share["width"] + share["slant"]) / 2, list(range(1, L - 1)))
    out["top = identity"] = (share["identity"], [L - 1])
    return out


def margin(quantity: np.ndarray, named: list[int]) -> float:
    """How far the named layers lead: the largest of theirs minus the largest of the others' (> 0: the claim holds)."""
    others = [l for l in range(len(quantity)) if l not in named]
    return float(quantity[named].max() - quantity[others].max())


def read_check(p: float) -> str:
    """A check's verdict from P = the fraction of bootstrap resamples in which the named layer leads."""
    return "holds" if p >= LEVEL else "fails" if p <= 1 - LEVEL else "unclear"


def leads(quantity: np.ndarray, named: list[int], boot: list[np.ndarray]) -> dict:
    """The named layers' lead on all the data (margin), its 5-95 % interval and P(margin > 0) over the bootstrap's
    quantities, and the verdict (read_check)."""
    ms = np.array([margin(b, named) for b in boot])
    p = float((ms > 0).mean())
    return {"margin": margin(quantity, named), "interval": [float(np.quantile(ms, 0.05)), float(np.quantile(ms, 0.95))],
            "p": p, "verdict": read_check(p), "led_by": int(np.argmax(quantity)) + 1,
            "per_layer": [float(v) for v in quantity]}


def fig5_verdict(units: list[dict], grid: list[dict], seed: int = 0, n: int = BOOTSTRAP) -> dict:
    """Does the paper's hierarchy hold, beyond the measurement's own noise? For each measure and check: the named
    layer's lead (fig5_quantities, leads) over a paired bootstrap (the contexts of the resampling measures, the cells
    of the grid, each drawn once for all layers). A check holds for the model when it holds by both judged measures,
    fails when it fails by either; the hierarchy holds when all checks hold. docs/fig5-protocol.md gives the reasons."""
    rng = np.random.default_rng(seed)
    bases, cells = len(units[0]["identity"]), len(grid[0]["labels"])
    context_draws = [rng.integers(0, bases, bases) for _ in range(n)]
    cell_draws = [rng.integers(0, cells, cells) for _ in range(n)]
    rows = [means(units)] + [means([{k: v[idx] for k, v in u.items()} for u in units]) for idx in context_draws]
    grids = [grid_scores(grid)] + [grid_scores(grid, idx) for idx in cell_draws]
    by = {}
    for m, keys in FIG5_KEYS.items():                  # the two resampling measures share their resamples' rows
        point, *boot = [fig5_quantities(r, keys) for r in (grids if m == "grid" else rows)]
        by[m] = {c: leads(q, named, [b[c][0] for b in boot]) for c, (q, named) in point.items()}
    checks = {}
    for c in by["resample"]:
        v = [by[m][c]["verdict"] for m in JUDGED]
        checks[c] = "holds" if all(x == "holds" for x in v) else "fails" if "fails" in v else "unclear"
    return {"by_measure": by, "checks": checks, "holds": all(v == "holds" for v in checks.values()),
            "rule": f"paired bootstrap, {n} resamples: a check holds by a measure when its layer leads in >= "
                    f"{LEVEL:.0%} of them, fails when in <= {1 - LEVEL:.0%}; holds for the model by both of "
                    f"{' and '.join(JUDGED)}"}


def layer_leads(units: list[dict], key: str, named: list[int], seed: int = 0, n: int = BOOTSTRAP) -> dict:
    """Does a named layer carry the largest share of one resampling measure (e.g. the HVAE's pixel variance, Fig. 3)?
    Read over a bootstrap of the contexts as fig5_verdict reads a check (leads)."""
    rng = np.random.default_rng(seed)
    share = lambda idx: np.array(normalised([{key: np.nanmean(u[key][idx])} for u in units], key))
    bases = len(units[0][key])
    boot = [share(rng.integers(0, bases, bases)) for _ in range(n)]
    return leads(share(np.arange(bases)), named, boot)


def hierarchy(generate_fn, dims: tuple, clf: Classifier, args, rng: np.random.Generator) -> dict:
    """The Fig. 5 / Fig. 3 part of the report: layer_effects (args.bases x args.resamples), the grid (args.grid,
    args.grid_draws) and the verdict. Also used by study.py, with a PyTorch model's generate_fn."""
    units = layer_effects(generate_fn, dims, clf, args.bases, args.resamples, rng)
    grid = grid_draws(generate_fn, dims, clf, args.grid, args.grid_draws, rng)
    rows = means(units)
    return {"layers": {"raw": rows, "normalised": {k: normalised(rows, k) for k in rows[0]}},
            "grid": grid_scores(grid), "fig5": fig5_verdict(units, grid, args.seed),
            "fig3": layer_leads(units, "pixel_var", [len(dims) - 1], args.seed)}


def sample_quality(clf: Classifier, images: np.ndarray, test_features: np.ndarray) -> tuple[dict, np.ndarray]:
    """The classifier's confidence, class entropy, classes seen and Frechet distance of generated images; and their
    features (for fig2_verdict)."""
    probs, features = classify(clf, images)
    labels = probs.argmax(1)
    return {"confidence": float(probs.max(1).mean()), "entropy": label_entropy(labels),
            "classes": int((np.bincount(labels, minlength=10) >= 0.01 * len(labels)).sum()),
            "frechet": frechet_distance(features, test_features)}, features


GIBBS_WITHIN = 1.2   # Fig. 2 read as a number: the chain's Frechet distance at most 20 % above ancestral sampling's


def fig2_verdict(gibbs: np.ndarray, ancestral: np.ndarray, test_features: np.ndarray, seed: int,
                 resamples: int = 200) -> dict:
    """Proposition 1 and Fig. 2: a Gibbs chain on the bottom layer alone samples the HVAE's distribution as well as
    ancestral sampling through every layer. The ratio FD(Gibbs) / FD(ancestral) on the classifier's features, with a
    bootstrap over the images of each set (drawn independently); P = how often the ratio is <= GIBBS_WITHIN, read by
    read_check (holds at P >= 0.95, fails at P <= 0.05)."""
    rng, test = np.random.default_rng(seed), gaussian_fit(test_features)     # the test set's Gaussian, fitted once
    fd = lambda f: frechet_distance(f, test)
    pick = lambda f: f[rng.integers(0, len(f), len(f))]
    draws = np.array([fd(pick(gibbs)) / fd(pick(ancestral)) for _ in range(resamples)])
    p = float((draws <= GIBBS_WITHIN).mean())
    return {"ratio": fd(gibbs) / fd(ancestral), "within": GIBBS_WITHIN, "p": p, "verdict": read_check(p),
            "interval": [float(np.quantile(draws, 0.05)), float(np.quantile(draws, 0.95))]}


def gibbs_samples(model, n: int, steps: int, seed: int) -> np.ndarray:
    """n chains of Proposition 1 from uniform noise, `steps` sampled steps each; returns the means of p(x | z_1)
    at z_1 ~ q(z_1 | x_steps), the images the chain's last state decodes to (compared with ancestral means)."""
    Tensor.manual_seed(seed)
    out = []
    for _ in tqdm(range(0, n, 100), desc=f"Gibbs chains ({steps} steps)"):
        chain = model.gibbs_chain(100, steps)                            # (steps + 1, 100, C, H, W)
        out.append(model.gibbs_chain(Tensor(chain[-1]), 1, sample_x=False)[-1])
    return np.concatenate(out)[:n]


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------

def run_evaluation(args) -> dict:
    check_args(args)
    run = Path(args.run)
    model, meta = load_model(run)
    cfg = model.cfg
    dataset = meta.get("train", {}).get("dataset", "mnist")
    ds = load_dataset(dataset, args.data_dir)
    test_x = binarized_test_set(ds.test_x) if cfg.likelihood == "bernoulli" else as_float(ds.test_x)
    if args.iw_images > len(test_x):
        raise UserError(f"--iw-images {args.iw_images}: the {dataset} test set has only {len(test_x)} images")
    rng = np.random.default_rng(args.seed)
    Tensor.manual_seed(args.seed)                                        # the z sample of each test-set ELBO
    t0 = time.perf_counter()
    report = {"run": str(run), "epoch": meta.get("epoch"), "config": cfg.to_dict(), "dataset": dataset,
              "settings": {k: v for k, v in vars(args).items() if k not in ("run", "out")}}

    parts, _ = elbo_parts(model, test_x)                                  # (N, 2+L): elbo, recon, kl_1..kl_L
    idx = rng.choice(len(test_x), args.iw_images, replace=False)
    log_w = log_weights(model, test_x[idx], args.k, rng)
    ks = sorted({k for k in (1, 10, 100, 1000, 10000) if k <= args.k and args.k % k == 0} | {args.k})
    bounds = iw_bounds(log_w, ks)
    sem = lambda v: float(v.std() / math.sqrt(len(v)))
    report["likelihood"] = {
        "test_elbo": float(parts[:, 0].mean()), "test_recon": float(parts[:, 1].mean()),
        "test_kl": [float(v) for v in parts[:, 2:].mean(0)], "test_images": len(parts), "iw_images": args.iw_images,
        "iw": {str(k): {"bound": float(b.mean()), "sem": sem(b), "gain": float((b - bounds[1]).mean()),
                        "gain_sem": sem(b - bounds[1])} for k, b in bounds.items()},
        "subset_elbo": float(parts[idx, 0].mean())}
    # E_q[z_l | x]; for the HVAE, q(z_{l+1} | z_l) is evaluated at the mean of the layer below, not averaged
    variances = [active_units(m) for m in posterior_means(model, test_x)]
    report["active_units"] = {"per_layer": [a for _, a in variances], "of": list(cfg.latent_dims),
                              "variances": [[float(v) for v in var] for var, _ in variances]}

    if dataset == "mnist":
        clf, accuracy = load_classifier(Path(args.classifier), ds, args.classifier_epochs)
        report["classifier"] = {"path": args.classifier, "test_accuracy": accuracy}
        # a generator of its own, seeded as study.py seeds its rows: the same checkpoint gets the same Fig. 5 numbers
        report |= hierarchy(lambda eps: generate_images(model, eps), cfg.latent_dims, clf, args,
                            np.random.default_rng(args.seed))
        _, test_features = classify(clf, ds.test_x)
        eps = [rng.standard_normal((args.samples, d), dtype=np.float32) for d in cfg.latent_dims]
        reference = ds.train_x[rng.choice(len(ds.train_x), args.samples, replace=False)]
        quality = {}
        quality["ancestral"], ancestral = sample_quality(clf, generate_images(model, eps), test_features)
        if cfg.model == "hvae":
            quality["gibbs"], gibbs = sample_quality(clf, gibbs_samples(model, args.samples, args.gibbs_steps,
                                                                        args.seed), test_features)
            report["fig2"] = fig2_verdict(gibbs, ancestral, test_features, args.seed)
        quality["mnist_train"] = sample_quality(clf, reference, test_features)[0]
        report["samples"] = quality
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def markdown(r: dict) -> str:
    cfg, like, L = r["config"], r["likelihood"], len(r["config"]["latent_dims"])
    lines = [f"## {cfg['model'].upper()} `{r['run']}` (epoch {r['epoch']}, size {cfg['size']}, codes "
             f"{'/'.join(map(str, cfg['latent_dims']))}, {cfg['likelihood']} likelihood)", "",
             "| bound (nats per image, higher is better) | value | gain over IW-1 on the same images |",
             "|---|---|---|", f"| ELBO, all {like['test_images']} test images | {like['test_elbo']:.2f} | |",
             f"| ELBO, the {like['iw_images']} test images below | {like['subset_elbo']:.2f} | |"]
    for k, b in like["iw"].items():
        lines.append(f"| IW-{k}, {like['iw_images']} test images | {b['bound']:.2f} +- {b['sem']:.2f} | "
                     f"{b['gain']:.2f} +- {b['gain_sem']:.2f} |")
    lines.append("")
    if cfg["likelihood"] == "gaussian":
        lines.append(f"A Gaussian r (sigma = {cfg['sigma_x']}) is a density on continuous pixels: these numbers "
                     f"compare between runs with the same sigma, not with published MNIST results ({PUBLISHED}), "
                     f"which use a Bernoulli likelihood on binarized digits: train with `--likelihood bernoulli`.")
    else:
        lines.append(f"Bernoulli likelihood on binarized MNIST: comparable with published results, {PUBLISHED}.")
    lines.append("The ELBO rows use the closed-form KL (Eq. 14); IW-1 is the same bound with sampled KL terms, "
                 "averaged over k samples. +- is the standard error over the subset's images: most of it is how "
                 "much log p(x) varies from image to image, which the gain column (the same images and samples for "
                 "every k) does not carry.")
    au = r["active_units"]
    kl = like["test_kl"]
    lines += ["", "| layer | KL (nats) | active units (Cov_x E_q[z_u] > 0.01) | Cov_x per unit |", "|---|---|---|---|"]
    for l in range(L):
        lines.append(f"| z_{l + 1} | {kl[l]:.2f} | {au['per_layer'][l]} of {au['of'][l]} | "
                     f"{' '.join(f'{v:.3f}' for v in au['variances'][l])} |")
    if "layers" in r:
        norm, raw = r["layers"]["normalised"], r["layers"]["raw"]
        name = "eps" if cfg["model"] == "hvae" else "z"
        s = r["settings"]
        lines += ["", f"What changes when one layer is resampled ({s['bases']} contexts x {s['resamples']} draws), "
                  f"as a share across layers (raw value in brackets): identity = P(two draws get different labels); "
                  f"thickness / width / slant = std; pixel variance = Fig. 3's measure.", "",
                  "| resampled | identity | thickness | width | slant | pixel variance |", "|---|---|---|---|---|---|"]
        for l in range(L):
            cells = [f"{norm[k][l]:.2f} ({raw[l][k]:.3f})" for k in ATTRIBUTES + ("pixel_var",)]
            lines.append(f"| {name}_{l + 1}{' (bottom)' if l == 0 else ' (top)' if l == L - 1 else ''} | "
                         + " | ".join(cells) + " |")
        lines += ["", "The same style measures among draws that keep the digit's label (share across layers):", "",
                  "| resampled | thickness | width | slant |", "|---|---|---|---|"]
        for l in range(L):
            lines.append(f"| {name}_{l + 1} | " + " | ".join(f"{norm[k + '_same'][l]:.2f}" for k in
                                                             ("thickness", "width", "slant")) + " |")
        g = r["grid"]
        lines += ["", f"The authors' protocol: each layer's code on a {s['grid']} x {s['grid']} grid, the other layers "
                  f"drawn afresh for each of {s['grid_draws']} images per cell; the share of each attribute the cell "
                  f"explains (0 to 1; thickness, width and slant at fixed identity, i.e. after removing the mean of "
                  f"the image's label):", "", "| grid over | identity | thickness | width | slant |",
                  "|---|---|---|---|---|"]
        for l in range(L):
            lines.append(f"| {name}_{l + 1} | " + " | ".join(f"{g[l][k]:.2f}" for k in ATTRIBUTES) + " |")
        v = r["fig5"]
        claim = "Fig. 5" + ("" if cfg["model"] == "vlae" else " (claimed for the VLAE; shown for comparison)")
        lines += ["", f"{claim}: each check's quantity per layer (bottom to top), the named layer's margin over the "
                  f"best other layer with its 5-95 % bootstrap interval, P(margin > 0) and the verdict ({v['rule']}).",
                  "", "| check | measure | per layer | margin [5 %, 95 %] | P | verdict |", "|---|---|---|---|---|---|"]
        for c, verdict in v["checks"].items():
            for m, checks in v["by_measure"].items():
                k = checks[c]
                lines.append(f"| {c} | {m}{'' if m in JUDGED else ' (not judged)'} | "
                             f"{' / '.join(f'{q:.2f}' for q in k['per_layer'])} | {k['margin']:+.2f} "
                             f"[{k['interval'][0]:+.2f}, {k['interval'][1]:+.2f}] | {k['p']:.2f} | {k['verdict']} |")
        lines += ["", "Verdicts: " + ", ".join(f"{c}: {x}" for c, x in v["checks"].items())
                  + f" -> the hierarchy {'holds' if v['holds'] else 'is not shown'}."]
        f3 = r["fig3"]
        shares = " / ".join(f"{p:.2f}" for p in f3["per_layer"])
        lines.append(f"Share of pixel variance per layer resampled, bottom to top: {shares}; the top layer's margin "
                     f"{f3['margin']:+.2f} [{f3['interval'][0]:+.2f}, {f3['interval'][1]:+.2f}], P {f3['p']:.2f}: "
                     f"the top layer leads: {f3['verdict']}"
                     + (" (Fig. 3 expects it to lead for the HVAE)." if cfg["model"] == "hvae" else "."))
        lines += ["", f"Samples ({r['settings']['samples']} each) through the classifier "
                  f"({100 * r['classifier']['test_accuracy']:.2f}% test accuracy); Frechet distance to the test set in "
                  f"its 128-d feature space:", "",
                  "| images | mean confidence | class entropy (nats, max 2.30) | classes >= 1% | Frechet distance |",
                  "|---|---|---|---|---|"]
        names = {"ancestral": "ancestral samples" if cfg["model"] == "hvae" else "prior samples",
                 "gibbs": f"Gibbs chain, {r['settings']['gibbs_steps']} steps (bottom layer only)",
                 "mnist_train": "MNIST training images (reference)"}
        for k, q in r["samples"].items():
            lines.append(f"| {names[k]} | {q['confidence']:.3f} | {q['entropy']:.2f} | {q['classes']} | "
                         f"{q['frechet']:.1f} |")
        if "fig2" in r:
            f2 = r["fig2"]
            lines += ["", f"Fig. 2 (Proposition 1: the bottom layer's Gibbs chain samples as well as ancestral "
                      f"sampling): Frechet distance ratio Gibbs / ancestral {f2['ratio']:.2f} [{f2['interval'][0]:.2f}, "
                      f"{f2['interval'][1]:.2f}], P(ratio <= {f2['within']}) {f2['p']:.2f}: {f2['verdict']}."]
    lines += ["", f"({r['seconds']:.0f} s; `python evaluate.py --run {r['run']}`)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Likelihood bounds, active units and the paper's figure claims as numbers.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="out/mnist-vlae", help="run folder (or checkpoint file) written by train.py")
    p.add_argument("--out", default=None, help="where to write the JSON report (default RUN/evaluation.json)")
    p.add_argument("--k", type=int, default=1000, help="importance samples per image for the IW bound")
    p.add_argument("--iw-images", type=int, default=100, help="test images the IW bound is estimated on")
    p.add_argument("--bases", type=int, default=100, help="contexts (draws of the other layers) per layer resampled")
    p.add_argument("--resamples", type=int, default=10, help="draws of the resampled layer per context")
    p.add_argument("--grid", type=int, default=7, help="grid side of the authors' protocol (Fig. 5): side^2 cells")
    p.add_argument("--grid-draws", type=int, default=20, help="draws of the other layers per grid cell")
    p.add_argument("--samples", type=int, default=1000, help="images per row of the sample-quality table")
    p.add_argument("--gibbs-steps", type=int, default=100, help="HVAE: steps of each Gibbs chain (Fig. 2)")
    p.add_argument("--classifier", default="out/mnist-classifier.safetensors",
                   help="cached MNIST classifier; trained and written there when missing")
    p.add_argument("--classifier-epochs", type=int, default=2, help="epochs when the classifier has to be trained")
    p.add_argument("--data-dir", default=None, help="folder holding <dataset>/ (default $VLAE_DATA, then ./data)")
    p.add_argument("--seed", type=int, default=0, help="seed of all sampling: the same seed gives the same report")
    return p.parse_args(argv)


def check_args(args) -> None:
    for flag in ("k", "iw_images", "bases", "samples", "gibbs_steps", "classifier_epochs", "grid"):
        value = getattr(args, flag)
        if value < 1: raise UserError(f"--{flag.replace('_', '-')} must be >= 1 (got {value})")
    for flag in ("resamples", "grid_draws"):
        if getattr(args, flag) < 2:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 2 (got {getattr(args, flag)}): a change needs two "
                            f"draws")


def main(argv=None) -> int:
    args = parse_args(argv)
    fast.enable()                                   # speed only: fast/, docs/performance.md
    try:
        report = run_evaluation(args)
        run = Path(args.run)
        out = Path(args.out) if args.out else (run.parent if run.is_file() else run) / "evaluation.json"
        try:
            out.write_text(json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise UserError(f"could not write {out} ({e.strerror}); choose another --out") from None
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(report))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
