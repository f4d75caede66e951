"""Pictures from a trained checkpoint: layer sweeps (paper Fig. 3, 5-7), the Gibbs chain of Proposition 1 (Fig. 2),
prior samples and reconstructions, and what each layer holds of real test digits.

    python sample.py --sweep-layer 3                       # Fig. 5: z_3 on a grid, the others fixed
    python sample.py --sweep-layer all                     # every layer's sweep side by side
    python sample.py --prior --temperature 0.8 --reconstruct
    python sample.py --run out/mnist-hvae --sweep-layer all --gibbs 100     # Fig. 3 and Fig. 2 for the HVAE
    python sample.py --from-test 8 --swap-layer 1          # the first 8 test digits swap their bottom layer's code
    python sample.py --from-test 8 --redraw-layer 3        # ... their top layer's code redrawn, the others kept
    python sample.py --sweep-layer 3 --gif sweep3.gif      # the sweep of layer 3 as an animation

PNGs go to the run folder (default out/mnist-vlae, else the pretrained model's, out/pretrained-mnist-vlae) unless --out
says otherwise: sweep-layer3.png, sweep-all.png, gibbs.png, prior.png, reconstructions.png, swap-layer1.png,
redraw-layer3.png. Layers are numbered as in the paper: 1 = bottom (closest to x), L = top.
Every picture is a function of the checkpoint and --seed only: all noise is drawn with numpy, and the model runs
jitted at one fixed batch size. With no picture asked for, `--sweep-layer all` is drawn.
"""
from __future__ import annotations
import argparse, sys
from pathlib import Path
import numpy as np
from tinygrad import Tensor
from data import DataError, as_float, binarized_test_set, load_dataset
from files import image_grid, over_each_other, save_gif, save_png, side_by_side
from vlae import QUANTILES, normal_quantiles, quantile_grid
from checkpoint import PRETRAINED, UserError, default_run, load_model
from arrays import generate_images, reconstruct
import fast


# ---------------------------------------------------------------------------------------------------------
# The latent grids: numpy in, numpy out. Each returns one array per layer, bottom first, shaped
# (panels, rows, cols, d_l): image (p, r, c) of the figure is generated from eps_l[p, r, c] for every l.
# ---------------------------------------------------------------------------------------------------------

def grid_sweep(dims: tuple, layer: int, n: int, panels: int, rng: np.random.Generator,
               fresh: bool = False) -> list[np.ndarray]:
    """Fig. 5: layer `layer` (1-based, a 2-D code) on an n x n quantile grid; every other layer drawn once per panel
    from N(0, I) and held fixed across it. Draws go panel by panel, so panel 0 does not depend on `panels`.
    fresh: every other layer drawn afresh for each image instead (the authors' protocol: what the grid position
    controls whatever the other layers hold)."""
    if dims[layer - 1] != 2:
        raise ValueError(f"layer {layer} has a {dims[layer - 1]}-D code; a grid needs 2-D")
    shape = (n, n) if fresh else ()
    fixed = [[rng.standard_normal((*shape, d)) for d in dims] for _ in range(panels)]
    eps = [np.stack([np.broadcast_to(f[i], (n, n, d)) for f in fixed]) for i, d in enumerate(dims)]
    eps[layer - 1] = np.broadcast_to(quantile_grid(n), (panels, n, n, 2))
    return [e.astype(np.float32) for e in eps]


def row_sweep(dims: tuple, layer: int, rows: int, cols: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Fig. 3, 6, 7: each row holds one draw of every other layer; the columns resample layer `layer` (1-based),
    the same column draws in every row, so a column shows one value of that layer in different contexts.
    A 1-D code is swept over Gaussian quantiles instead of being resampled. One panel: (1, rows, cols, d_l)."""
    fixed = [[rng.standard_normal(d) for d in dims] for _ in range(rows)]
    d = dims[layer - 1]
    swept = normal_quantiles(cols)[:, None] if d == 1 else rng.standard_normal((cols, d))
    return [e[None] for e in with_layer([np.stack(f) for f in zip(*fixed)], layer, swept)]


def with_layer(codes: list[np.ndarray], layer: int, values: np.ndarray) -> list[np.ndarray]:
    """Rows of codes, (R, d_l) per layer, and C values (C, d) for layer `layer` (1-based) -> (R, C, d_l) per layer:
    [r, c] holds row r's codes with layer `layer`'s set to values[c]."""
    R, C = len(codes[0]), len(values)
    out = [np.broadcast_to(c[:, None], (R, C, c.shape[-1])) for c in codes]
    out[layer - 1] = np.broadcast_to(values[None], (R, C, values.shape[-1]))
    return [o.astype(np.float32) for o in out]


def sweep_path(d: int, n: int) -> np.ndarray:
    """The values of a d-D code that --gif shows, one a frame, (frames, d): a 2-D code walks the n x n grid of
    grid_sweep row by row, every other row backwards, so that each frame is a neighbour of the last (n^2 frames); any
    other code moves one unit at a time over n quantiles of N(0, 1), its other units at 0 (d * n frames)."""
    if d == 2:
        grid = quantile_grid(n)
        grid[1::2] = grid[1::2, ::-1]
        return grid.reshape(-1, 2)
    return (np.eye(d)[:, None] * normal_quantiles(n)[:, None]).reshape(-1, d)             # unit by unit


def is_grid(model_name: str, dims: tuple, layer: int) -> bool:
    """A VLAE layer with a 2-D code is swept over a grid (Fig. 5); anything else is resampled (Fig. 3, 6, 7)."""
    return model_name == "vlae" and dims[layer - 1] == 2


def layer_sweep(model_name: str, dims: tuple, layer: int, n: int, panels: int, seed: int,
                fresh: bool = False) -> list[np.ndarray]:
    """The noise `--sweep-layer layer` decodes: grid_sweep where is_grid, else row_sweep (for an HVAE these are the
    eps of Eq. 15, not z). Seeded per layer, so sweep-all.png shows the first panel of each sweep-layerN.png."""
    rng = np.random.default_rng([seed, layer])
    if is_grid(model_name, dims, layer):
        return grid_sweep(dims, layer, n, panels, rng, fresh)
    return row_sweep(dims, layer, n, n, rng)


def shown_states(steps: int, n: int) -> np.ndarray:
    """At most n chain states, evenly spaced from the start (0) to the last (steps)."""
    return np.unique(np.linspace(0, steps, min(n, steps + 1)).round().astype(int))


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------

def panel(images: np.ndarray, scale: int) -> np.ndarray:
    """(rows, cols, C, H, W) -> one image_grid."""
    rows, cols = images.shape[:2]
    return image_grid(images.reshape(rows * cols, *images.shape[2:]), cols, scale=scale)


def where(layer: int, L: int) -> str:
    return " (bottom)" if layer == 1 else " (top)" if layer == L else ""


def what_varies(cfg, layer: int, fresh: bool = False) -> str:
    name = f"{'eps' if cfg.model == 'hvae' else 'z'}_{layer}"
    if is_grid(cfg.model, cfg.latent_dims, layer):
        return f"{name} on a grid" + (", the rest fresh" if fresh else "")
    if cfg.latent_dims[layer - 1] == 1:
        return f"{name} swept across, context down"
    return f"columns resample {name}, context down"


def sweep_figure(model, tag: str, layer: int, args) -> tuple[np.ndarray, str]:
    """sweep-layerN.png: the panels of layer_sweep side by side."""
    cfg, L, n = model.cfg, model.L, args.grid
    eps = layer_sweep(cfg.model, cfg.latent_dims, layer, n, args.panels, args.seed, args.fresh)
    images = generate_images(model, eps)                                   # (panels, rows, cols, C, H, W)
    head = f"{tag}: layer {layer} of {L}{where(layer, L)} varies"
    if is_grid(cfg.model, cfg.latent_dims, layer):
        lo, hi = QUANTILES
        head += (f": z_{layer} on a {n}x{n} grid of N(0,1) quantiles {lo:g}..{hi:g} (unit 1 across, unit 2 down); "
                 f"the other layers drawn {'afresh for every image' if args.fresh else 'once per panel'}")
        labels = [f"other layers: {'fresh draws' if args.fresh else 'draw'} {p + 1}" for p in range(len(images))]
    else:
        head += "; each row holds one draw of the other layers"
        labels = [what_varies(cfg, layer)]
    return side_by_side([panel(p, args.scale) for p in images], labels), head


def sweep_all_figure(model, tag: str, args) -> tuple[np.ndarray, str]:
    """sweep-all.png: the first panel of every layer's sweep, bottom layer on the left (Fig. 3, Fig. 5)."""
    cfg, L = model.cfg, model.L
    grids, labels = [], []
    for layer in range(1, L + 1):
        eps = layer_sweep(cfg.model, cfg.latent_dims, layer, args.grid, 1, args.seed, args.fresh)
        grids.append(panel(generate_images(model, eps)[0], args.scale))
        labels.append(f"layer {layer}{where(layer, L)}: {what_varies(cfg, layer, args.fresh)}")
    rest = "draws the others afresh for every image" if args.fresh else "holds the others fixed"
    head = f"{tag}: each panel varies one layer and {rest}; layer 1 (bottom) left, {L} (top) right"
    return side_by_side(grids, labels), head


def gibbs_figure(model, tag: str, args) -> tuple[np.ndarray, str]:
    """gibbs.png (Fig. 2): chains of Proposition 1 from uniform noise (one per row, states left to right) next to
    as many ancestral samples (Eq. 15) of the same model."""
    rng = np.random.default_rng([args.seed, 0])
    n = args.grid
    x0 = rng.random((n, *model.cfg.image_shape), dtype=np.float32)
    Tensor.manual_seed(args.seed)                                   # gibbs_chain draws its step noise in tinygrad
    chain = model.gibbs_chain(Tensor(x0), args.gibbs, sample_x=not args.chain_means)   # (steps + 1, n, C, H, W)
    idx = shown_states(args.gibbs, n)
    states = chain[idx].swapaxes(0, 1)                                                  # (n, states, C, H, W)
    eps = [rng.standard_normal((n, len(idx), d)).astype(np.float32) for d in model.cfg.latent_dims]
    labels = [f"Gibbs chain, bottom layer only: states {', '.join(map(str, idx[:4]))}{' ...' if len(idx) > 4 else ''}",
              "ancestral samples, whole model (Eq. 15)"]
    head = (f"{tag}: Proposition 1 chain z_1 ~ q(z_1|x), x ~ p(x|z_1), {args.gibbs} steps from noise "
            f"({'means' if args.chain_means else 'samples'} of p(x|z_1)) | ancestral samples")
    return side_by_side([panel(states, args.scale), panel(generate_images(model, eps), args.scale)], labels), head


def prior_figure(model, tag: str, args) -> tuple[np.ndarray, str]:
    """prior.png: eps ~ N(0, I) * temperature decoded by the model (for an HVAE, ancestral sampling, Eq. 15)."""
    rng = np.random.default_rng([args.seed, 0])
    eps = [rng.standard_normal((args.grid, args.grid, d)).astype(np.float32) * args.temperature
           for d in model.cfg.latent_dims]
    kind = "ancestral samples (Eq. 15)" if model.cfg.model == "hvae" else "samples from the prior N(0, I)"
    return panel(generate_images(model, eps), args.scale), f"{tag}: {kind}, temperature {args.temperature:g}"


def test_digits(model, meta: dict, args) -> np.ndarray:
    """The test set of the run's dataset, binarized (with a fixed seed) where the model's likelihood is Bernoulli."""
    ds = load_dataset(meta.get("train", {}).get("dataset", "mnist"), args.data_dir)
    return binarized_test_set(ds.test_x) if model.cfg.likelihood == "bernoulli" else ds.test_x


def reconstruction_figure(model, tag: str, meta: dict, args) -> tuple[np.ndarray, str]:
    """reconstructions.png: rows of test images, each over the images decoded from their posterior means."""
    test_x = test_digits(model, meta, args)
    n, pairs = args.grid, max(1, args.grid // 2)
    x = as_float(test_x[np.random.default_rng([args.seed, 0]).choice(len(test_x), n * pairs, replace=False)])
    grid = image_grid(over_each_other(x, reconstruct(model, x), n), n, scale=args.scale)
    return grid, f"{tag}: test images (odd rows) over their reconstructions from the posterior means (even rows)"


def real_figure(model, tag: str, meta: dict, kind: str, layer: int, args) -> tuple[np.ndarray, str]:
    """The first --from-test test digits and their codes (model.codes: for a VLAE the means of q(z_l|x), Eq. 12-13;
    for an HVAE the eps of Eq. 15 that generate its posterior means). swap-layerN.png: the digits along the top (B)
    and down the left (A); row A, column B decodes A's codes with layer N's from B (the diagonal: A's reconstruction).
    redraw-layerN.png: a row per digit: the digit, its reconstruction, then layer N redrawn from N(0, I), the other
    layers kept (the same draw down each column)."""
    x = as_float(test_digits(model, meta, args)[:args.from_test])
    codes, name = [c.numpy() for c in model.codes(Tensor(x))], what_varies(model.cfg, layer).split()[0]
    if kind == "swap":
        swapped = generate_images(model, with_layer(codes, layer, codes[layer - 1]))        # (N, N, C, H, W)
        left = np.concatenate([np.zeros_like(x[:1]), x])[:, None]                             # a blank corner, then A
        grid = np.concatenate([left, np.concatenate([x[None], swapped])], axis=1)
        return panel(grid, args.scale), f"{tag}: row A, column B: A's codes but {name}, which is B's"
    draws = np.random.default_rng([args.seed, layer]).standard_normal((args.grid, model.cfg.latent_dims[layer - 1]))
    own = generate_images(model, [c[:, None] for c in codes])                              # (N, 1, C, H, W)
    grid = np.concatenate([x[:, None], own, generate_images(model, with_layer(codes, layer, draws))], axis=1)
    return panel(grid, args.scale), f"{tag}: test digit, reconstruction, then {name} redrawn, the rest kept"


def sweep_gif(model, tag: str, layer: int, args) -> Path:
    """--gif: layer N moving along sweep_path, one value a frame, under a row of --grid draws of the other layers."""
    dims, n, name = model.cfg.latent_dims, args.grid, what_varies(model.cfg, layer).split()[0]
    rng, path = np.random.default_rng([args.seed, layer]), sweep_path(dims[layer - 1], args.grid)
    images = generate_images(model, with_layer([rng.standard_normal((n, d)) for d in dims], layer, path))
    heads = [f"{name} = ({', '.join(f'{v:.2f}' for v in p)}), {tag}" for p in path]      # (the value first)
    return save_gif([image_grid(images[:, f], n, scale=args.scale) for f in range(len(path))], args.gif, heads)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Layer sweeps and the paper's figures from a VLAE or HVAE checkpoint.")
    p.add_argument("--run", default=None, help="run folder (or checkpoint file) written by train.py (default "
                   "out/mnist-vlae if it has a checkpoint, else pretrained/mnist-vlae)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: the run folder)")
    p.add_argument("--sweep-layer", default=None, metavar="N|all",
                   help="vary layer N (1 = bottom) with the others fixed: sweep-layerN.png; 'all': sweep-all.png")
    p.add_argument("--grid", type=int, default=10, help="images per side of each panel (default %(default)s)")
    p.add_argument("--panels", type=int, default=3,
                   help="panels of a 2-D grid sweep, each with its own fixed draw of the other layers "
                        "(default %(default)s)")
    p.add_argument("--fresh", action="store_true",
                   help="with --sweep-layer: draw the other layers afresh for every image of a grid (the authors' "
                        "protocol: the swept layer should mean the same whatever the others hold); writes "
                        "sweep-layerN-fresh.png / sweep-all-fresh.png")
    p.add_argument("--gif", default=None, metavar="PATH", help="with --sweep-layer N: the sweep as an animated GIF")
    p.add_argument("--from-test", type=int, default=None, metavar="N",
                   help="encode the first N test digits (1-100) for --redraw-layer and --swap-layer (default 8)")
    p.add_argument("--redraw-layer", type=int, default=None, metavar="L",
                   help="test digits with layer L redrawn from the prior, the others kept: redraw-layerL.png")
    p.add_argument("--swap-layer", type=int, default=None, metavar="L",
                   help="test digits with layer L's code swapped between them: swap-layerL.png")
    p.add_argument("--gibbs", type=int, default=None, metavar="STEPS",
                   help="HVAE: run the bottom-layer Gibbs chain of Proposition 1 for STEPS steps: gibbs.png")
    p.add_argument("--chain-means", action="store_true",
                   help="with --gibbs: feed the chain the means of p(x|z_1) instead of samples (less noisy states, "
                        "but no longer the chain of Proposition 1: it tends to stall at one image)")
    p.add_argument("--prior", "--ancestral", action="store_true",
                   help="samples from the prior (ancestral sampling, Eq. 15, for an HVAE): prior.png")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="with --prior: scale of the noise eps (default %(default)s)")
    p.add_argument("--reconstruct", action="store_true",
                   help="test images over their reconstructions: reconstructions.png")
    p.add_argument("--data-dir", default=None, help="folder holding <dataset>/ (default $VLAE_DATA, then ./data)")
    p.add_argument("--scale", type=int, default=2, help="pixels per image pixel in the PNGs (default %(default)s)")
    p.add_argument("--plain", action="store_true", help="without the fast/ package (plain tinygrad layers; slower)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of all the noise: the same seed gives the same PNGs (default %(default)s)")
    return p.parse_args(argv)


def check_args(args) -> None:
    for flag, value in (("--grid", args.grid), ("--panels", args.panels), ("--scale", args.scale)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1 (got {value})")
    if args.gibbs is not None and args.gibbs < 1:
        raise UserError(f"--gibbs must be >= 1 step (got {args.gibbs})")
    if not args.temperature >= 0:
        raise UserError(f"--temperature must be >= 0 (got {args.temperature})")
    if args.sweep_layer not in (None, "all") and not args.sweep_layer.isdigit():
        raise UserError(f"--sweep-layer {args.sweep_layer}: give a layer number (1 = bottom) or 'all'")
    if args.gif and not (args.sweep_layer or "").isdigit():
        raise UserError("--gif animates the sweep of one layer: give --sweep-layer N too (1 = bottom)")
    if args.from_test is not None and not 1 <= args.from_test <= 100:
        raise UserError(f"--from-test {args.from_test}: give a number of test digits from 1 to 100")
    if args.from_test and args.redraw_layer is None and args.swap_layer is None:
        raise UserError("--from-test N picks the digits of --redraw-layer L or --swap-layer L: give one of them too")


def check_model_args(args, model) -> list:
    """The flags that depend on the model; returns the sweeps asked for: [], ['all'] or [N] with 1 <= N <= L."""
    if args.gibbs and model.cfg.model != "hvae":
        raise UserError("--gibbs runs the chain of Proposition 1, which is about the stacked HVAE: pass the run "
                        "folder of one, e.g. --run out/mnist-hvae (train it with `python train.py --model hvae`)")
    L = model.L
    for flag, layer in (("--redraw-layer", args.redraw_layer), ("--swap-layer", args.swap_layer)):
        if layer is not None and not 1 <= layer <= L:
            raise UserError(f"{flag} {layer}: this model has layers 1 (bottom) to {L} (top)")
    if args.sweep_layer is None:
        return []
    if args.sweep_layer == "all":
        return ["all"]
    if not 1 <= int(args.sweep_layer) <= L:
        raise UserError(f"--sweep-layer {args.sweep_layer}: this model has layers 1 (bottom) to {L} (top); "
                        f"give one of them or 'all'")
    return [int(args.sweep_layer)]


def sample(args) -> list[Path]:
    """Draw every figure the flags ask for; returns the paths written."""
    check_args(args)
    run = default_run(args.run)
    model, meta = load_model(run)
    out = Path(args.out or ("out/pretrained-mnist-vlae" if run.resolve() == PRETRAINED.resolve() else
                            run.parent if run.is_file() else run))
    sweeps = check_model_args(args, model)
    real = [(kind, layer) for kind, layer in (("redraw", args.redraw_layer), ("swap", args.swap_layer)) if layer]
    if not (sweeps or args.gibbs or args.prior or args.reconstruct or real):
        sweeps = ["all"]
    cfg = model.cfg
    tag = f"{cfg.model.upper()} {cfg.size} {'/'.join(map(str, cfg.latent_dims))}, epoch {meta.get('epoch', '?')}"
    figures = []
    suffix = "-fresh" if args.fresh else ""
    for s in sweeps:
        if s == "all":
            figures.append((f"sweep-all{suffix}.png", *sweep_all_figure(model, tag, args)))
        elif not args.gif:
            figures.append((f"sweep-layer{s}{suffix}.png", *sweep_figure(model, tag, s, args)))
    args.from_test = args.from_test or 8
    for kind, layer in real:
        figures.append((f"{kind}-layer{layer}.png", *real_figure(model, tag, meta, kind, layer, args)))
    if args.gibbs:
        figures.append(("gibbs.png", *gibbs_figure(model, tag, args)))
    if args.prior:
        figures.append(("prior.png", *prior_figure(model, tag, args)))
    if args.reconstruct:
        figures.append(("reconstructions.png", *reconstruction_figure(model, tag, meta, args)))
    try:
        gif = [sweep_gif(model, tag, int(args.sweep_layer), args)] if args.gif else []
        return [save_png(grid, out / name, head) for name, grid, head in figures] + gif
    except OSError as e:
        raise UserError(f"could not write to {out} ({e.strerror}); choose another --out") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.plain:
        fast.enable()                               # speed only: fast/, docs/performance.md
    try:
        for path in sample(args):
            print(path)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
