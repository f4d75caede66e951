"""Pictures from a trained checkpoint: layer sweeps (paper Fig. 3, 5-7), the Gibbs chain of Proposition 1 (Fig. 2),
prior samples and reconstructions, and what each layer holds of real test digits.

    python sample.py --sweep-layer 3                       # Fig. 5: z_3 on a grid, the others fixed ('all': each)
    python sample.py --prior --temperature 0.8 --reconstruct
    python sample.py --run out/mnist-hvae --sweep-layer all --gibbs 100     # Fig. 3 and Fig. 2 for the HVAE
    python sample.py --from-test 8 --swap-layer 1 --redraw-layer 3   # 8 test digits: layer 1 swapped, layer 3 redrawn
    python sample.py --sweep-layer 3 --gif sweep3.gif      # the sweep of layer 3 as an animation

sweep-layerN.png, sweep-all.png (the default), swap-layerN.png, redraw-layerN.png, gibbs.png, prior.png and
reconstructions.png go to the run folder (out/pretrained-mnist-vlae for the pretrained model) or --out. Layers are
numbered as in the paper: 1 = bottom, L = top. A picture is a function of the checkpoint and --seed only.
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


# The latent grids, numpy in and out: one array per layer, bottom first, (panels, rows, cols, d_l); image (p, r, c)
# of the figure is generated from eps_l[p, r, c] for every l.

def grid_sweep(dims: tuple, layer: int, n: int, panels: int, rng: np.random.Generator,
               fresh: bool = False) -> list[np.ndarray]:
    """Fig. 5: layer `layer` (a 2-D code) on an n x n quantile grid; every other layer drawn once per panel from
    N(0, I) (panel by panel, so panel 0 does not depend on `panels`), or with fresh, afresh for each image (the
    authors' protocol: what the grid position controls whatever the other layers hold)."""
    if dims[layer - 1] != 2:
        raise ValueError(f"layer {layer} has a {dims[layer - 1]}-D code; a grid needs 2-D")
    fixed = [[rng.standard_normal((n, n, d) if fresh else d) for d in dims] for _ in range(panels)]
    eps = [np.stack([np.broadcast_to(f[i], (n, n, d)) for f in fixed]) for i, d in enumerate(dims)]
    eps[layer - 1] = np.broadcast_to(quantile_grid(n), (panels, n, n, 2))
    return [e.astype(np.float32) for e in eps]


def row_sweep(dims: tuple, layer: int, rows: int, cols: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Fig. 3, 6, 7: each row holds one draw of every other layer; the columns resample layer `layer` (the same
    draws in every row; a 1-D code is swept over Gaussian quantiles instead). One panel: (1, rows, cols, d_l)."""
    fixed, d = [[rng.standard_normal(d) for d in dims] for _ in range(rows)], dims[layer - 1]
    swept = normal_quantiles(cols)[:, None] if d == 1 else rng.standard_normal((cols, d))
    return [e[None] for e in with_layer([np.stack(f) for f in zip(*fixed)], layer, swept)]


def with_layer(codes: list[np.ndarray], layer: int, values: np.ndarray) -> list[np.ndarray]:
    """Codes (R, d_l) per layer, values (C, d) -> (R, C, d_l) per layer: [r, c] is row r's, layer's set to values[c]."""
    R, C = len(codes[0]), len(values)
    out = [np.broadcast_to(c[:, None], (R, C, c.shape[-1])) for c in codes]
    out[layer - 1] = np.broadcast_to(values[None], (R, C, values.shape[-1]))
    return [o.astype(np.float32) for o in out]


def sweep_path(d: int, n: int) -> np.ndarray:
    """The values of a d-D code that --gif shows, (frames, d): a 2-D code walks grid_sweep's grid row by row, every
    other row backwards (each frame a neighbour of the last); any other moves one unit at a time over n quantiles."""
    if d == 2:
        grid = quantile_grid(n)
        grid[1::2] = grid[1::2, ::-1]
        return grid.reshape(-1, 2)
    return (np.eye(d)[:, None] * normal_quantiles(n)[:, None]).reshape(-1, d)             # unit by unit


def is_grid(model_name: str, dims: tuple, layer: int) -> bool:          # else resampled (Fig. 3, 6, 7)
    return model_name == "vlae" and dims[layer - 1] == 2


def layer_sweep(model_name: str, dims: tuple, layer: int, n: int, panels: int, seed: int,
                fresh: bool = False) -> list[np.ndarray]:
    """The noise `--sweep-layer layer` decodes: grid_sweep where is_grid, else row_sweep (for an HVAE these are the
    eps of Eq. 15, not z). Seeded per layer, so sweep-all.png shows the first panel of each sweep-layerN.png."""
    rng = np.random.default_rng([seed, layer])
    return grid_sweep(dims, layer, n, panels, rng, fresh) if is_grid(model_name, dims, layer) else \
        row_sweep(dims, layer, n, n, rng)


def shown_states(steps: int, n: int) -> np.ndarray:
    """At most n chain states, evenly spaced from the start (0) to the last (steps)."""
    return np.unique(np.linspace(0, steps, min(n, steps + 1)).round().astype(int))


def panel(images: np.ndarray, scale: int) -> np.ndarray:                # (rows, cols, C, H, W) -> one image_grid
    return image_grid(images.reshape(-1, *images.shape[2:]), images.shape[1], scale=scale)


def where(layer: int, L: int) -> str:
    return " (bottom)" if layer == 1 else " (top)" if layer == L else ""


def code_name(cfg, layer: int) -> str:                              # an HVAE's sweeps vary eps_l of Eq. 15
    return f"{'eps' if cfg.model == 'hvae' else 'z'}_{layer}"


def what_varies(cfg, layer: int, fresh: bool = False) -> str:
    name = code_name(cfg, layer)
    if is_grid(cfg.model, cfg.latent_dims, layer):
        return f"{name} on a grid" + (", the rest fresh" if fresh else "")
    one_d = cfg.latent_dims[layer - 1] == 1
    return f"{name} swept across, context down" if one_d else f"columns resample {name}, context down"


def sweep_figure(model, tag: str, layer: int, args) -> tuple[np.ndarray, str]:
    """sweep-layerN.png: the panels of layer_sweep side by side."""
    cfg, L, n = model.cfg, model.L, args.grid
    images = generate_images(model, layer_sweep(cfg.model, cfg.latent_dims, layer, n, args.panels, args.seed,
                                                args.fresh))                # (panels, rows, cols, C, H, W)
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
    grids = [panel(generate_images(model, layer_sweep(cfg.model, cfg.latent_dims, layer, args.grid, 1, args.seed,
                                                      args.fresh))[0], args.scale) for layer in range(1, L + 1)]
    labels = [f"layer {layer}{where(layer, L)}: {what_varies(cfg, layer, args.fresh)}" for layer in range(1, L + 1)]
    rest = "draws the others afresh for every image" if args.fresh else "holds the others fixed"
    return side_by_side(grids, labels), f"{tag}: each panel varies one layer and {rest}; layer 1 (bottom) left, {L} " \
                                        f"(top) right"


def gibbs_figure(model, tag: str, args) -> tuple[np.ndarray, str]:
    """gibbs.png (Fig. 2): chains of Proposition 1 from noise (a row each) next to ancestral samples (Eq. 15)."""
    rng, n = np.random.default_rng([args.seed, 0]), args.grid
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
    """The run's test set, binarized (fixed seed) for a Bernoulli likelihood."""
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
    """The first --from-test test digits and their codes (model.codes). swap-layerN.png: row A, column B decodes A's
    codes with layer N's from B. redraw-layerN.png: per digit, the digit, its reconstruction, then layer N redrawn
    from N(0, I), the others kept (the same draw down each column)."""
    x = as_float(test_digits(model, meta, args)[:args.from_test])
    codes, name = [c.numpy() for c in model.codes(Tensor(x))], code_name(model.cfg, layer)
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
    dims, n, name = model.cfg.latent_dims, args.grid, code_name(model.cfg, layer)
    rng, path = np.random.default_rng([args.seed, layer]), sweep_path(dims[layer - 1], args.grid)
    images = generate_images(model, with_layer([rng.standard_normal((n, d)) for d in dims], layer, path))
    heads = [f"{name} = ({', '.join(f'{v:.2f}' for v in p)}), {tag}" for p in path]      # (the value first)
    return save_gif([image_grid(images[:, f], n, scale=args.scale) for f in range(len(path))], args.gif, heads)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Layer sweeps and the paper's figures from a VLAE or HVAE checkpoint.")
    p.add_argument("--run", help="run folder (or checkpoint) from train.py (default out/mnist-vlae, else pretrained)")
    p.add_argument("--out", help="folder for the PNGs (default: the run folder)")
    p.add_argument("--sweep-layer", metavar="N|all", help="vary layer N (1 = bottom), the others fixed; 'all': each")
    p.add_argument("--grid", type=int, default=10, help="images per side of each panel (default %(default)s)")
    p.add_argument("--panels", type=int, default=3, help="panels of a 2-D grid sweep, each with its own draw of the "
                   "other layers (default %(default)s)")
    p.add_argument("--fresh", action="store_true", help="with --sweep-layer: draw the other layers afresh for every "
                   "image of a grid (the authors' protocol): sweep-layerN-fresh.png / sweep-all-fresh.png")
    p.add_argument("--gif", metavar="PATH", help="with --sweep-layer N: the sweep as an animated GIF")
    p.add_argument("--from-test", type=int, metavar="N", help="test digits of --redraw/swap-layer (1-100, default 8)")
    p.add_argument("--redraw-layer", type=int, metavar="L", help="test digits with layer L redrawn, the others kept")
    p.add_argument("--swap-layer", type=int, metavar="L", help="test digits with layer L's code swapped between them")
    p.add_argument("--gibbs", type=int, metavar="STEPS", help="HVAE: the Gibbs chain of Proposition 1 for STEPS steps")
    p.add_argument("--chain-means", action="store_true", help="with --gibbs: feed the chain the means of p(x|z_1), "
                   "not samples (not the chain of Proposition 1: it tends to stall at one image)")
    p.add_argument("--prior", "--ancestral", action="store_true", help="samples from the prior (Eq. 15 for an HVAE)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --prior: scale of the noise eps (default 1)")
    p.add_argument("--reconstruct", action="store_true", help="test images over their reconstructions")
    p.add_argument("--data-dir", help="folder holding <dataset>/ (default $VLAE_DATA, then ./data)")
    p.add_argument("--scale", type=int, default=2, help="pixels per image pixel in the PNGs (default %(default)s)")
    p.add_argument("--plain", action="store_true", help="without the fast/ package (plain tinygrad layers; slower)")
    p.add_argument("--seed", type=int, default=0, help="seed of all the noise (default %(default)s)")
    return p.parse_args(argv)


def check_args(args) -> None:
    for flag, lowest in (("grid", 1), ("panels", 1), ("scale", 1), ("gibbs", 1), ("temperature", 0)):
        if (value := getattr(args, flag)) is not None and not value >= lowest:       # (not >=: nan too)
            raise UserError(f"--{flag} must be >= {lowest} (got {value})")
    if args.sweep_layer not in (None, "all") and not args.sweep_layer.isdigit():
        raise UserError(f"--sweep-layer {args.sweep_layer}: give a layer number (1 = bottom) or 'all'")
    if args.gif and not (args.sweep_layer or "").isdigit():
        raise UserError("--gif animates the sweep of one layer: give --sweep-layer N too (1 = bottom)")
    if args.from_test is not None and not 1 <= args.from_test <= 100:
        raise UserError(f"--from-test {args.from_test}: give a number of test digits from 1 to 100")
    if args.from_test and args.redraw_layer is None and args.swap_layer is None:
        raise UserError("--from-test N picks the digits of --redraw-layer L or --swap-layer L: give one of them too")


def check_model_args(args, model) -> list:
    """The flags that depend on the model; returns the sweeps to draw: [], ['all'] (the default) or [N], 1 <= N <= L."""
    if args.gibbs and model.cfg.model != "hvae":
        raise UserError("--gibbs runs the chain of Proposition 1, which is about the stacked HVAE: pass the run "
                        "folder of one, e.g. --run out/mnist-hvae (train it with `python train.py --model hvae`)")
    sweep = int(args.sweep_layer) if (args.sweep_layer or "").isdigit() else None
    for flag, layer in (("redraw-layer", args.redraw_layer), ("swap-layer", args.swap_layer), ("sweep-layer", sweep)):
        if layer is not None and not 1 <= layer <= model.L:
            raise UserError(f"--{flag} {layer}: this model has layers 1 (bottom) to {model.L} (top)"
                            + ("; give one of them or 'all'" if flag == "sweep-layer" else ""))
    if args.sweep_layer is None:
        return [] if args.gibbs or args.prior or args.reconstruct or args.redraw_layer or args.swap_layer else ["all"]
    return [sweep or "all"]


def sample(args) -> list[Path]:
    """Draw every figure the flags ask for; returns the paths written."""
    check_args(args)
    run = default_run(args.run)
    model, meta = load_model(run)
    out = Path(args.out or ("out/pretrained-mnist-vlae" if run.resolve() == PRETRAINED.resolve() else
                            run.parent if run.is_file() else run))
    sweeps = check_model_args(args, model)
    real = [(kind, layer) for kind, layer in (("redraw", args.redraw_layer), ("swap", args.swap_layer)) if layer]
    cfg = model.cfg
    tag = f"{cfg.model.upper()} {cfg.size} {'/'.join(map(str, cfg.latent_dims))}, epoch {meta.get('epoch', '?')}"
    figures, suffix, args.from_test = [], "-fresh" if args.fresh else "", args.from_test or 8
    for s in (s for s in sweeps if s == "all" or not args.gif):              # (--gif N: the gif, not the PNG)
        figures.append((f"sweep-{'all' if s == 'all' else f'layer{s}'}{suffix}.png",
                        *(sweep_all_figure(model, tag, args) if s == "all" else sweep_figure(model, tag, s, args))))
    figures += [(f"{kind}-layer{layer}.png", *real_figure(model, tag, meta, kind, layer, args)) for kind, layer in real]
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
