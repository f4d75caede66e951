"""The recipe study: which training recipe makes the VLAE learn the paper's hierarchy (Fig. 5), over seeds.

    python study.py --recipe authors --size narrow --seeds 0,1,2 --epochs 3,10     # trains with the PyTorch mirror
    python study.py --recipe authors --trainer tinygrad --seeds 0 --epochs 3        # train.py's own loop (tinygrad)
    python study.py --table                                                         # the table of all results so far

Each run trains one recipe for one seed and, at each epoch listed in --epochs, writes a checkpoint that sample.py
and evaluate.py read (out/study/<recipe>-<size>/s<seed>/e<epoch>/), measures it with evaluate.py's Fig. 5 measures
(evaluate.hierarchy: one layer resampled at fixed identity, and the authors' grid protocol), the test ELBO and the
Frechet distance of prior samples, and appends one JSON line to study/results.jsonl (committed: the study goes on
from there). --trainer torch needs PyTorch (`pip install torch`; it is not a requirement of the project) and runs
on one thread, so two runs use a 2-core machine fully; --trainer tinygrad runs train.py itself.
"""
from __future__ import annotations
import argparse, itertools, json, subprocess, sys, time
from pathlib import Path
import numpy as np
from data import DataError, as_float, binarized_test_set, load_dataset
from vlae import ModelConfig, SIZES
from checkpoint import CHECKPOINT, atomic_safe_save, code_version, load_model
from arrays import generate_images
import fast

RESULTS = Path("study/results.jsonl")
# Named recipes; any field can be overridden by its flag. "authors" is their code at the time of the paper
# (github.com/ermongroup/Variational-Ladder-Autoencoder): gated add, 8 * squared error (a Gaussian r with sigma
# 0.25), warm-up T = 15000, Adam 2e-4.
RECIPES = {
    "default": {"combiner": "concat", "likelihood": "gaussian", "sigma_x": 0.1, "kl_warmup": 1000, "lr": 1e-3},
    "gated": {"combiner": "gated", "likelihood": "gaussian", "sigma_x": 0.1, "kl_warmup": 1000, "lr": 1e-3},
    "gated-s25": {"combiner": "gated", "likelihood": "gaussian", "sigma_x": 0.25, "kl_warmup": 5000, "lr": 1e-3},
    "authors": {"combiner": "gated", "likelihood": "gaussian", "sigma_x": 0.25, "kl_warmup": 15000, "lr": 2e-4},
    "gated-bernoulli": {"combiner": "gated", "likelihood": "bernoulli", "sigma_x": 0.1, "kl_warmup": 5000, "lr": 1e-3},
}


class Settings:
    """evaluate.py's measurement settings (its defaults), fixed for every cell of the study."""
    bases, resamples, grid, grid_draws, samples, seed = 100, 10, 7, 20, 1000, 0


def measure(generate_fn, dims: tuple, test_elbo: dict, clf, test_features: np.ndarray, settings=Settings) -> dict:
    """The Fig. 5 measures (evaluate.hierarchy) and the Frechet distance of prior samples to the test set."""
    import evaluate
    rng = np.random.default_rng(settings.seed)
    h = evaluate.hierarchy(generate_fn, dims, clf, settings, rng)
    eps = [rng.standard_normal((settings.samples, d), dtype=np.float32) for d in dims]
    quality = evaluate.sample_quality(clf, generate_fn(eps), test_features)[0]
    norm = h["layers"]["normalised"]
    return {**test_elbo, "fig5": h["fig5"], "resample": {k: norm[v] for k, v in evaluate.FIG5_KEYS["resample"].items()},
            "grid": h["grid"], "prior_frechet": quality["frechet"], "prior_classes": quality["classes"]}


def measure_hvae(generate_fn, checkpoint: Path, dims: tuple, test_elbo: dict, clf, test_features: np.ndarray,
                 settings=Settings, gibbs_steps: int = 100) -> dict:
    """The HVAE's claims: Fig. 3 (does resampling the top eps carry most of the pixel variance?) and Fig. 2 (do the
    bottom-layer Gibbs chains of Proposition 1 sample as well as the whole model: Frechet distance within 20 % of
    ancestral sampling's?). The chains run on the tinygrad model loaded from the checkpoint (evaluate.gibbs_samples)."""
    import evaluate
    rng = np.random.default_rng(settings.seed)
    units = evaluate.layer_effects(generate_fn, dims, clf, settings.bases, settings.resamples, rng)
    rows = evaluate.means(units)
    fig3 = evaluate.layer_leads(units, "pixel_var", [len(dims) - 1], settings.seed)
    eps = [rng.standard_normal((settings.samples, d), dtype=np.float32) for d in dims]
    ancestral, ancestral_features = evaluate.sample_quality(clf, generate_fn(eps), test_features)
    model, _ = load_model(checkpoint)
    gibbs, gibbs_features = evaluate.sample_quality(
        clf, evaluate.gibbs_samples(model, settings.samples, gibbs_steps, settings.seed), test_features)
    return {**test_elbo, "pixel_var_share": fig3["per_layer"], "identity_share": evaluate.normalised(rows, "identity"),
            "fig3": fig3, "ancestral_frechet": ancestral["frechet"],
            "gibbs_frechet": gibbs["frechet"], "gibbs_classes": gibbs["classes"], "gibbs_steps": gibbs_steps,
            "fig2": evaluate.fig2_verdict(gibbs_features, ancestral_features, test_features, settings.seed)}


def torch_cells(args, cfg: ModelConfig, recipe: dict, seed: int, ds, on_cell) -> None:
    """Train with bench/torch_mirror.py and measure at each snapshot epoch."""
    import torch
    sys.path.insert(0, str(Path(__file__).parent / "bench"))
    import torch_mirror
    test_x = binarized_test_set(ds.test_x) if cfg.likelihood == "bernoulli" else as_float(ds.test_x)
    train_seconds = 0.0

    def on_epoch(model, epoch: int, stats: dict) -> None:
        nonlocal train_seconds
        train_seconds += stats["seconds"]
        if epoch not in args.epochs: return
        model.eval()
        with torch.no_grad():
            parts = [model.elbo(torch.from_numpy(test_x[i:i + 500])) for i in range(0, len(test_x), 500)]
            elbo = float(torch.cat([p.elbo for p in parts]).mean())
            kl = [float(torch.cat([p.kl[l] for p in parts]).mean()) for l in range(len(cfg.latent_dims))]

        def generate_fn(eps):
            lead = eps[0].shape[:-1]
            with torch.no_grad():
                flat = [torch.from_numpy(np.ascontiguousarray(e.reshape(-1, e.shape[-1]))) for e in eps]
                images = torch.cat([model.generate([f[i:i + 1000] for f in flat])
                                    for i in range(0, len(flat[0]), 1000)]).numpy()
            return images.reshape(*lead, *images.shape[1:])

        on_cell(epoch, stats["step"], train_seconds, {"test_elbo": elbo, "test_kl": kl}, generate_fn,
                torch_mirror.tinygrad_state(model))
        model.train()

    torch_mirror.train_torch(cfg, ds.train_x, ds.train_y, lr=recipe["lr"], kl_warmup=recipe["kl_warmup"],
                             seed=seed, epochs=max(args.epochs), threads=args.threads, on_epoch=on_epoch)


def tinygrad_cells(args, cfg: ModelConfig, recipe: dict, seed: int, folder: Path, on_cell) -> None:
    """Train with train.py (resumed from snapshot to snapshot) and measure each snapshot."""
    for epoch in sorted(args.epochs):
        flags = ["--out", str(folder), "--epochs", str(epoch)]
        if (folder / CHECKPOINT).exists(): flags.append("--resume")
        else:
            flags += ["--model", cfg.model, "--seed", str(seed), "--size", cfg.size, "--combiner", cfg.combiner,
                      "--likelihood", cfg.likelihood, "--sigma-x", str(cfg.sigma_x), "--kl-warmup",
                      str(recipe["kl_warmup"]), "--lr", str(recipe["lr"])]
        subprocess.run([sys.executable, "train.py", *flags], check=True)
        measure_run(folder, on_cell)


def measure_run(run: Path, on_cell) -> None:
    """Measure a checkpoint on the tinygrad model: a run folder of train.py (its test ELBO and time from its metrics)
    or a checkpoint written by the mirror (test ELBO computed here; training time unknown)."""
    model, meta = load_model(run)
    if "metrics" in meta:
        m = meta["metrics"]
        elbo = {"test_elbo": m["test_elbo"], "test_kl": m["test_kl"]}
        seconds = sum(json.loads(line)["epoch_seconds"] for line in open(run / "metrics.jsonl"))
    else:
        from arrays import elbo_parts
        ds = load_dataset(meta["train"]["dataset"])
        test_x = binarized_test_set(ds.test_x) if model.cfg.likelihood == "bernoulli" else as_float(ds.test_x)
        parts, _ = elbo_parts(model, test_x)
        elbo = {"test_elbo": float(parts[:, 0].mean()), "test_kl": [float(k) for k in parts[:, 2:].mean(0)]}
        seconds = 0.0
    on_cell(meta["epoch"], meta["step"], seconds, elbo, lambda eps: generate_images(model, eps), None)


def width_of(cfg: ModelConfig) -> str:
    """The size preset's name, or the channels and dense width when they were given."""
    preset = ModelConfig(size=cfg.size, image_shape=cfg.image_shape)
    if (cfg.channels, cfg.hidden) == (preset.channels, preset.hidden): return cfg.size
    return f"c{'-'.join(map(str, cfg.channels))}-h{cfg.hidden}"


def recipe_of(cfg: ModelConfig, flags: dict) -> tuple[str, dict]:
    """The recipe a run used (from its checkpoint), named as the training command names it: one of RECIPES,
    or the authors' plus what differs, e.g. authors+kl_warmup=600."""
    recipe = {"combiner": cfg.combiner, "likelihood": cfg.likelihood, "sigma_x": cfg.sigma_x,
              "kl_warmup": flags["kl_warmup"], "lr": flags["lr"]}
    diff = lambda name: [k for k in RECIPES[name] if RECIPES[name][k] != recipe[k]]
    name = next((n for n in RECIPES if not diff(n)), "authors")          # a named recipe, or the authors' + changes
    return name + "".join(f"+{k}={recipe[k]}" for k in diff(name)), recipe


def run_study(args) -> None:
    import evaluate
    ds = load_dataset("mnist", args.data_dir)
    fast.enable()
    if not args.train_only:
        clf, _ = evaluate.load_classifier(Path(args.classifier), ds, 2)
        _, test_features = evaluate.classify(clf, ds.test_x)

    def cell_writer(cfg: ModelConfig, label: str, recipe: dict, seed: int, folder: Path, trainer: str,
                    trained_code: dict | None = None):
        """on_cell(epoch, step, seconds, elbo, generate_fn, state): measure one snapshot and append its row; state (the
        weights of a torch run, else None) is first written as a checkpoint that sample.py and evaluate.py load."""
        width = width_of(cfg)

        def on_cell(epoch, step, seconds, elbo, generate_fn, state):
            t0 = time.perf_counter()
            checkpoint = folder / f"e{epoch}" if state is not None else folder
            if state is not None:
                checkpoint.mkdir(parents=True, exist_ok=True)
                from tinygrad import Tensor
                meta = {"config": cfg.to_dict(), "train": {"dataset": "mnist", "seed": seed, **recipe,
                                                           "trainer": "torch"}, "step": step, "epoch": epoch,
                        "code": code_version()}
                atomic_safe_save({f"model.{k}": Tensor(v) for k, v in state.items()}, checkpoint / CHECKPOINT, meta)
            if args.train_only:
                print(f"saved {checkpoint} (not measured: --train-only)", file=sys.stderr, flush=True)
                return
            if cfg.model == "vlae": measured = measure(generate_fn, cfg.latent_dims, elbo, clf, test_features)
            else: measured = measure_hvae(generate_fn, checkpoint, cfg.latent_dims, elbo, clf, test_features)
            trained_at = trained_code if trained_code is not None else code_version()
            row = {"model": cfg.model, "recipe": label, **recipe, "width": width, "channels": list(cfg.channels),
                   "hidden": cfg.hidden, "seed": seed, "epoch": epoch, "step": step, "trainer": trainer,
                   "train_seconds": round(seconds, 1), "threads": args.threads if trainer == "torch" else None,
                   "checkpoint": str(checkpoint), **measured, "measure_seconds": round(time.perf_counter() - t0, 1),
                   "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv),
                   "trained_at": trained_at, "measured_at": code_version()}
            RESULTS.parent.mkdir(exist_ok=True)
            with open(RESULTS, "a") as f: f.write(json.dumps(row) + "\n")
            print(summary(row), file=sys.stderr, flush=True)
        return on_cell

    for run in args.measure:                  # checkpoints of train.py or of the mirror, measured as they are
        model, meta = load_model(run)
        label, recipe = recipe_of(model.cfg, meta["train"])
        code = meta.get("code") or ({"commit": args.trained_at, "dirty": False} if args.trained_at else {})
        folder = run if run.is_dir() else run.parent
        measure_run(run, cell_writer(model.cfg, label, recipe, meta["train"]["seed"], folder,
                                     meta["train"].get("trainer", "tinygrad"), code))
    for name in ([] if args.measure else args.recipe):
        recipe = dict(RECIPES[name])
        for k in recipe:
            if getattr(args, k) is not None: recipe[k] = getattr(args, k)
        label = name + "".join(f"+{k}={getattr(args, k)}" for k in RECIPES[name] if getattr(args, k) is not None)
        cfg = ModelConfig(model=args.model, size=args.size, combiner=recipe["combiner"],
                          likelihood=recipe["likelihood"],
                          sigma_x=recipe["sigma_x"], channels=args.channels or (), hidden=args.hidden or 0)
        for seed in args.seeds:
            folder = Path(args.out) / f"{args.model}-{label}-{width_of(cfg)}" / f"s{seed}"
            on_cell = cell_writer(cfg, label, recipe, seed, folder, args.trainer)
            if args.trainer == "torch": torch_cells(args, cfg, recipe, seed, ds, on_cell)
            else: tinygrad_cells(args, cfg, recipe, seed, folder, on_cell)


def checks(row: dict, measure: str | None = None) -> str:
    by = row["fig5"]["by_measure"]
    c = row["fig5"]["checks"] if measure is None else {k: v["verdict"] for k, v in by[measure].items()}
    return "/".join(c.values())


def summary(row: dict) -> str:
    if row.get("model") == "hvae":
        return (f"HVAE {row['recipe']} {row['width']} seed {row['seed']} epoch {row['epoch']}: Fig. 3 top layer leads "
                f"the pixel variance: {row['fig3']['verdict']} "
                f"(shares {' / '.join(f'{v:.2f}' for v in row['pixel_var_share'])}); "
                f"Fig. 2 Frechet distance Gibbs {row['gibbs_frechet']:.0f} vs ancestral "
                f"{row['ancestral_frechet']:.0f}, within 20 %: {row['fig2']['verdict']}; "
                f"test ELBO {row['test_elbo']:.2f}")
    return (f"{row['recipe']} {row['width']} seed {row['seed']} epoch {row['epoch']} ({row['trainer']}): "
            f"Fig. 5 resample {checks(row, 'resample')}, grid {checks(row, 'grid')}, verdict {checks(row)}; "
            f"test ELBO {row['test_elbo']:.2f}, prior FD {row['prior_frechet']:.0f}")


def groups(rows: list[dict]) -> dict:
    """Rows grouped by (recipe, width, trainer, epoch): the seeds of one cell of the study. A seed measured twice (a
    re-run, or the same checkpoint measured again) counts once, by its last row."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["recipe"], r["width"], r["trainer"], r["epoch"]), {})[r["seed"]] = r
    return {k: [g[s] for s in sorted(g)] for k, g in sorted(out.items())}


def commits(g: list[dict]) -> str:
    c = sorted({r["trained_at"].get("commit", "?")[:7] + ("+" if r["trained_at"].get("dirty") else "") for r in g})
    return ", ".join(c)


def tally(verdicts) -> str:
    """'holds / unclear / fails': how many of the verdicts are each."""
    verdicts = list(verdicts)
    return " / ".join(str(verdicts.count(v)) for v in ("holds", "unclear", "fails"))


def hvae_table(rows: list[dict]) -> str:
    """Fig. 3 and Fig. 2 for the HVAE: per cell, pixel-variance shares (mean over seeds), the Frechet distances, and
    in how many seeds each claim holds / is unclear / fails (evaluate.layer_leads, evaluate.fig2_verdict)."""
    lines = ["| recipe | width | trainer | epochs | seeds | pixel variance eps_1 / eps_2 / eps_3 | top leads (Fig. 3) "
             "| FD Gibbs / ancestral | Gibbs within 20 % (Fig. 2) | test ELBO | trained at |", "|---" * 11 + "|"]
    for (recipe, width, trainer, epoch), g in groups(rows).items():
        share = np.mean([r["pixel_var_share"] for r in g], 0)
        fd = " ".join(f"{r['gibbs_frechet']:.0f}/{r['ancestral_frechet']:.0f}" for r in g)
        lines.append(f"| {recipe} | {width} | {trainer} | {epoch} | {','.join(str(r['seed']) for r in g)} | "
                     f"{' / '.join(f'{v:.2f}' for v in share)} | "
                     f"{tally(r['fig3']['verdict'] for r in g)} | {fd} | {tally(r['fig2']['verdict'] for r in g)} | "
                     f"{np.mean([r['test_elbo'] for r in g]):.1f} | {commits(g)} |")
    return "\n".join(lines)


def restarts(g: list[dict]) -> str:
    """Restarts picked by the ELBO, an unsupervised criterion (docs/fig5-protocol.md, second round): of every pair of
    seeds, the run with the higher test ELBO is kept; k/n = in how many of the n pairs the kept run holds Fig. 5."""
    picked = [max(pair, key=lambda r: r["test_elbo"]) for pair in itertools.combinations(g, 2)]
    return f"{sum(r['fig5']['holds'] for r in picked)}/{len(picked)}" if picked else "-"


def table(rows: list[dict]) -> str:
    """One line per (recipe, width, trainer, epoch) over distinct seeds: how many seeds each Fig. 5 check holds /
    is unclear / fails in (evaluate.fig5_verdict), how many hold all three, how often a restart picked by the ELBO
    does (restarts), mean test ELBO, the commits."""
    names = ("bottom = thickness", "middle = width/slant", "top = identity")
    lines = ["| recipe | width | trainer | epochs | seeds | bottom = thickness | middle = width/slant | top = identity "
             "| all three hold | ELBO pick of 2 | test ELBO | prior FD | trained at |", "|---" * 13 + "|"]
    for (recipe, width, trainer, epoch), g in groups(rows).items():
        n = len(g)
        cells = [tally(r["fig5"]["checks"][c] for r in g) for c in names]
        lines.append(f"| {recipe} | {width} | {trainer} | {epoch} | {','.join(str(r['seed']) for r in g)} | "
                     + " | ".join(cells) + f" | **{sum(r['fig5']['holds'] for r in g)}/{n}** | {restarts(g)} | "
                     f"{np.mean([r['test_elbo'] for r in g]):.1f} | {np.mean([r['prior_frechet'] for r in g]):.0f} | "
                     f"{commits(g)} |")
    return "\n".join(lines) + "\n\nEach check: seeds where it holds / is unclear / fails (docs/fig5-protocol.md)."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", action="store_true", help="print the table of study/results.jsonl and exit")
    p.add_argument("--recipe", default="authors", help=f"comma-separated, from {', '.join(RECIPES)}")
    p.add_argument("--model", default="vlae", choices=("vlae", "hvae"))
    p.add_argument("--size", default="narrow", choices=sorted(SIZES), help="network width")
    p.add_argument("--channels", default=None, help="conv channels instead of --size's, e.g. 32,64")
    p.add_argument("--hidden", type=int, default=None, help="dense width instead of --size's, e.g. 512")
    for k, t in (("combiner", str), ("likelihood", str), ("sigma_x", float), ("kl_warmup", int), ("lr", float)):
        p.add_argument(f"--{k.replace('_', '-')}", type=t, default=None, help=f"override the recipe's {k}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each a separate run")
    p.add_argument("--epochs", default="3", help="comma-separated epochs at which to measure; trains to the largest")
    p.add_argument("--trainer", default="torch", choices=("torch", "tinygrad"))
    p.add_argument("--measure", nargs="*", default=[], type=Path,
                   help="instead of training: measure these run folders of train.py (e.g. out/mnist-vlae) and add rows")
    p.add_argument("--trained-at", default=None, metavar="COMMIT", help="with --measure: the commit that trained "
                   "checkpoints which do not record it (those made before the record existed)")
    p.add_argument("--train-only", action="store_true",
                   help="save the checkpoints without measuring them (measure later with --measure)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default="out/study", help="folder for the checkpoints")
    p.add_argument("--classifier", default="out/mnist-classifier.safetensors", help="evaluate.py's cached classifier")
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (default $VLAE_DATA, then ./data)")
    args = p.parse_args(argv)
    args.recipe = args.recipe.split(",")
    if unknown := [r for r in args.recipe if r not in RECIPES]:
        p.error(f"--recipe {','.join(unknown)}: choose from {', '.join(RECIPES)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.epochs = sorted({int(e) for e in args.epochs.split(",")})
        args.channels = tuple(int(c) for c in args.channels.split(",")) if args.channels else None
    except ValueError:
        p.error("--seeds, --epochs and --channels take comma-separated integers, e.g. 0,1,2")
    if min(args.epochs) < 1: p.error("--epochs must be >= 1")
    if args.trainer == "tinygrad" and (args.channels or args.hidden):
        p.error("--channels and --hidden need --trainer torch: train.py chooses widths with --size only")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        rows = [json.loads(line) for line in open(RESULTS)] if RESULTS.exists() else []
        rows = [r for r in rows if r.get("trained_at", {}).get("commit")]     # rows that name their code
        vlae_rows = [r for r in rows if r.get("model", "vlae") == "vlae"]
        hvae_rows = [r for r in rows if r.get("model") == "hvae"]
        print(table(vlae_rows) if vlae_rows else f"no VLAE results yet in {RESULTS}: run a study first")
        if hvae_rows: print("\n" + hvae_table(hvae_rows))
        return 0
    try:
        run_study(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
