"""Train a VLAE (paper Eq. 14) or the Markov HVAE baseline (Eq. 5) on MNIST, with checkpoints, a log and PNGs.

    python train.py --dataset mnist                  # writes out/mnist-vlae/
    python train.py --dataset mnist --model hvae     # the same loop for the HVAE; writes out/mnist-hvae/
    python train.py --dataset mnist --resume         # continues from out/mnist-vlae/checkpoint.safetensors
    DEV=CUDA python train.py --size paper            # the authors' full network on a GPU (DEV=METAL, DEV=CL ...)

The run folder gets checkpoint.safetensors (weights, Adam state, step, RNG state and the config as JSON metadata,
written atomically after every epoch), metrics.jsonl (one line per epoch), samples.png and reconstructions.png.
Ctrl-C or SIGTERM finishes the current step, saves a checkpoint there and exits (130 / 143); --resume continues
with the same batches and ends with the same weights, bit for bit on a CPU, as a run that was never stopped.
"""
from __future__ import annotations
import argparse, json, math, signal, sys, time
from pathlib import Path
import numpy as np
from tinygrad import Tensor, TinyJit, Device, Context, dtypes, nn
from tinygrad.helpers import tqdm
from data import DataError, as_float, load_dataset, batches, binarized_test_set, image_grid, over_each_other, save_png
from vlae import ModelConfig, SIZES, default_size, n_params, weights
from kernels import load_programs, save_programs, search_slowest
from checkpoint import (CHECKPOINT, MODELS, UserError, build_model, checkpoint_tensors, load_weights, optimizer_state,
                        read_checkpoint, save_checkpoint)

# Training flags left unset take these, or, with --resume, the checkpoint's values: a plain --resume continues exactly
# The authors' recipe at the time of the paper (../shared/DESIGN.md; README, Reproducing the paper): Adam 2e-4, KL
# warm-up T = 15000, with ModelConfig's gated combiner and sigma_x = 0.25
TRAIN_DEFAULTS = {"dataset": "mnist", "epochs": 3, "batch_size": 100, "lr": 2e-4, "kl_warmup": 15000, "seed": 0,
                  "subset": 0, "log_every": 50}
DATA_ORDER = ("dataset", "batch_size", "seed", "subset")    # these fix which batch comes next: --resume keeps them
# The authors' code sizes per dataset (../shared/DESIGN.md): 3 layers of 2 on MNIST, 4 layers on SVHN and CelebA
LATENT_DIMS = {"mnist": (2, 2, 2), "fashion-mnist": (2, 2, 2), "svhn": (5, 5, 5, 10), "celeba": (10, 10, 10, 10)}


class Stopped(Exception):
    """SIGINT or SIGTERM stopped training between two steps; main() prints the message and exits with 128 + signal."""
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = 128 + signum


# ---------------------------------------------------------------------------------------------------------
# One training loop for both models: anything with .elbo(x) -> ELBO(elbo, recon, kl), .encode, .decode, .generate
# ---------------------------------------------------------------------------------------------------------

def kl_weight(step: int, warmup: int) -> float:
    """The authors' KL warm-up, 1 - exp(-step / warmup); warmup = 0 gives the plain ELBO from the first step."""
    return 1.0 - math.exp(-step / warmup) if warmup > 0 else 1.0


class Trainer:
    def __init__(self, model, lr: float):
        self.model = model
        # Adam splits these into parameters and buffers (BatchNorm running statistics); it realizes both in each
        # step, which is what makes the running statistics update at all.
        self.opt = nn.optim.Adam(list(weights(model).values()), lr=lr)
        L = len(model.cfg.latent_dims)
        self.totals = Tensor.zeros(2 + L).contiguous().realize()   # running sums of (loss, recon, kl_1..kl_L)
        # steps taken, and the first of them (1-based) whose loss was nan or inf (0: none yet): kept on the device
        # and read at log points, so that naming the exact step costs no sync per step
        self.steps = Tensor.zeros(1, dtype=dtypes.int32).contiguous().realize()
        self.first_bad = Tensor.zeros(1, dtype=dtypes.int32).contiguous().realize()
        # Everything the step reads and updates is made a buffer now: left lazy, the initial weights' random draws and
        # Adam's zero moments would be folded into the first step's graph, which then takes 2-3x longer to build
        Tensor.realize(*weights(model).values(), *optimizer_state(self.opt).values(), self.opt.lr)
        self.jit = TinyJit(self._step)

    def step(self, x: Tensor, beta: Tensor) -> Tensor:
        """One jitted training step (see _step). The first call builds and compiles the graph, the second captures
        it, and from then on each call replays the captured kernels; after the capture the compiled kernels are
        saved for the next run (kernels.save_programs)."""
        stats = self.jit(x, beta)
        if self.jit.cnt == 2: save_programs()
        return stats

    def step_tensors(self, x: Tensor, beta: Tensor) -> tuple[list[Tensor], Tensor]:
        """The graph of one Adam step on a batch x (B, C, H, W), not yet run: the tensors to realize (new weights
        and Adam state, the running sums) and the batch's (loss, recon, kl_1..kl_L). Needs Context(TRAINING=1)."""
        self.opt.zero_grad()
        out = self.model.elbo(x)
        kl = Tensor.stack(*out.kl, dim=1).mean(axis=0)              # (L,) mean KL per layer
        loss = (beta * kl).sum() - out.recon.mean()                 # -ELBO, with the KL warm-up weight beta
        loss.backward()
        stats = Tensor.cat(loss.reshape(1), out.recon.mean().reshape(1), kl)
        n = self.steps + 1
        first_bad = ((self.first_bad == 0) & ~loss.isfinite()).where(n, self.first_bad)
        updates = [self.totals.assign(self.totals + stats), self.steps.assign(n), self.first_bad.assign(first_bad)]
        return [*self.opt.schedule_step(), stats, *updates], stats

    def _step(self, x: Tensor, beta: Tensor) -> Tensor:
        """One Adam step, run as one schedule (the optimizer's update and the statistics together)."""
        with Context(TRAINING=1):
            tensors, stats = self.step_tensors(x, beta)
            Tensor.realize(*tensors)
            return stats


def write_pngs(trainer: Trainer, out: Path, test_x: np.ndarray, recon: np.ndarray, epoch: int, tag: str) -> None:
    model = trainer.model
    rng = np.random.default_rng(1234)                                   # the same prior draws every epoch
    eps = [Tensor(rng.standard_normal((100, d)).astype(np.float32)) for d in model.cfg.latent_dims]
    samples = model.generate_jit(eps).numpy()
    save_png(image_grid(samples, 10, scale=2), out / "samples.png", f"{tag} prior samples, epoch {epoch}")
    save_png(image_grid(over_each_other(test_x[:30], recon[:30], 10), 10, scale=2), out / "reconstructions.png",
             f"{tag} test images (odd rows) and reconstructions, epoch {epoch}")


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a Variational Ladder Autoencoder (Zhao, Song & Ermon 2017).")
    p.add_argument("--dataset", default=None,
                   help="mnist (default), fashion-mnist, svhn or celeba; see README, Datasets")
    p.add_argument("--model", default=None, choices=sorted(MODELS), help="which model to train (default vlae)")
    # training and model flags default to None: a fresh run fills in the defaults, a resumed one its checkpoint's
    p.add_argument("--epochs", type=int, default=None, help="total epochs (default 3; a resumed run stops there)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 100, the authors' value)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4, the authors')")
    p.add_argument("--latent-dims", default=None,
                   help="code size per layer, bottom first (default: the authors' 2,2,2 for mnist and fashion-mnist, "
                        "5,5,5,10 for svhn, 10,10,10,10 for celeba)")
    p.add_argument("--size", default=None, choices=sorted(SIZES),
                   help="network width: paper = the authors' network; default: paper on a GPU, medium on a CPU")
    p.add_argument("--combiner", default=None, choices=["concat", "gated"],
                   help="how v_l(z_l) joins z~_{l+1}: gated add (authors' code, default) or concat (Eq. 11)")
    p.add_argument("--likelihood", default=None, choices=["gaussian", "bernoulli"],
                   help="r(x|z): fixed-variance gaussian (the paper's, default) or bernoulli (binarized x)")
    p.add_argument("--sigma-x", type=float, default=None,
                   help="std of the gaussian likelihood (default 0.25, the authors')")
    p.add_argument("--kl-warmup", type=int, default=None,
                   help="KL weight 1 - exp(-step / N) as in the authors' code (default 15000); 0 turns warm-up off")
    p.add_argument("--seed", type=int, default=None, help="seed for weights, data order and sampling noise (default 0)")
    p.add_argument("--out", default=None, help="run folder (default out/<dataset>-<model>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its flags unless given (--epochs, --lr, "
                        "--kl-warmup and --log-every may change; the data order may not)")
    p.add_argument("--data-dir", default=None, help="folder holding <dataset>/ (default $VLAE_DATA, then ./data)")
    p.add_argument("--subset", type=int, default=None, help="train on the first N training images (default 0 = all)")
    p.add_argument("--log-every", type=int, default=None,
                   help="steps between progress-bar updates and loss-log entries (default 50; each is a sync)")
    p.add_argument("--kernel-search", type=int, default=2, metavar="N",
                   help="before training, run tinygrad's kernel search (BEAM) on the N slowest kernels of the step, "
                        "once per network and device; the result is kept for later runs (default 2; 0: off)")
    args = p.parse_args(argv)
    args.out = Path(args.out or f"out/{args.dataset or 'mnist'}-{args.model or 'vlae'}")
    return args


def model_config(args, image_shape: tuple) -> ModelConfig:
    """The ModelConfig the flags ask for; flags left unset take the defaults (the authors' code sizes per dataset)."""
    try:
        dims = tuple(int(d) for d in args.latent_dims.split(",")) if args.latent_dims else LATENT_DIMS[args.dataset]
    except ValueError:
        raise UserError(f"--latent-dims {args.latent_dims!r} is not a comma-separated list of integers, e.g. 2,2,2")
    if len(dims) < 2 or min(dims) < 1:
        raise UserError(f"--latent-dims {args.latent_dims}: give at least 2 layers, each of size >= 1, e.g. 2,2,2")
    if args.likelihood == "bernoulli" and image_shape[0] != 1:
        raise UserError(f"--likelihood bernoulli binarizes grey-scale digits; {args.dataset} is in colour: use the "
                        f"default gaussian likelihood")
    return ModelConfig(model=args.model or "vlae", image_shape=image_shape, latent_dims=dims,
                       size=args.size or default_size(), combiner=args.combiner or ModelConfig.combiner,
                       likelihood=args.likelihood or "gaussian",
                       sigma_x=args.sigma_x if args.sigma_x is not None else ModelConfig.sigma_x)


def check_args(args) -> None:
    """Flags that are given must make sense (those left unset are filled in by training_flags)."""
    def given(k): return getattr(args, k) is not None
    if given("epochs") and args.epochs < 1: raise UserError(f"--epochs must be >= 1 (got {args.epochs})")
    if given("batch_size") and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if given("lr") and not args.lr > 0: raise UserError(f"--lr must be > 0 (got {args.lr})")
    if given("sigma_x") and not args.sigma_x > 0: raise UserError(f"--sigma-x must be > 0 (got {args.sigma_x})")
    if given("kl_warmup") and args.kl_warmup < 0: raise UserError(f"--kl-warmup must be >= 0 (got {args.kl_warmup})")
    if given("subset") and args.subset < 0: raise UserError(f"--subset must be >= 0 (got {args.subset})")
    if args.kernel_search < 0: raise UserError(f"--kernel-search must be >= 0 (got {args.kernel_search})")
    if given("log_every") and args.log_every < 1: raise UserError(f"--log-every must be >= 1 (got {args.log_every})")


def training_flags(args, saved: dict | None) -> None:
    """Fill the training flags left unset: from the checkpoint's when resuming (saved), else TRAIN_DEFAULTS.
    A resumed run may not change the flags that fix the data order."""
    for k in DATA_ORDER:
        if saved and k in saved and getattr(args, k) is not None and getattr(args, k) != saved[k]:
            flag = "--" + k.replace("_", "-")
            raise UserError(f"--resume: the checkpoint in {args.out} was trained with {flag} {saved[k]}, not "
                            f"{getattr(args, k)}; drop that flag (a resumed run keeps its data order), or start a new "
                            f"run with another --out")
    for k, default in TRAIN_DEFAULTS.items():
        if getattr(args, k) is None: setattr(args, k, (saved or {}).get(k, default))


def check_resume(args, saved: dict) -> None:
    """A model flag given together with --resume must agree with the checkpoint's config."""
    saved_cfg, cfg = ModelConfig(**saved), model_config(args, tuple(saved["image_shape"]))
    given = {"latent_dims": args.latent_dims and cfg.latent_dims, "size": args.size, "combiner": args.combiner,
             "likelihood": args.likelihood, "sigma_x": args.sigma_x, "model": args.model}
    for k, v in given.items():
        if v is not None and v != getattr(saved_cfg, k):
            raise UserError(f"--resume: the checkpoint in {args.out} was trained with {k}={getattr(saved_cfg, k)}, "
                            f"not {v}; drop that flag, or start a new run with another --out")


class StopSignals:
    """While active, Ctrl-C (SIGINT) and SIGTERM only set .signum: the training loop checks it between steps, so a
    step is never cut in half and the checkpoint saved after it is consistent. A second signal stops at once."""
    def __enter__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum: raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items(): signal.signal(s, handler)


def search_kernels(cfg: ModelConfig, batch_size: int, top: int) -> list:
    """Kernel search on the `top` slowest kernels of this network's training step at this batch size, unless done
    before on this device, top is 0 or NOOPT is set (kernels.search_slowest decides); returns what was searched."""
    x = Tensor(np.random.default_rng(0).random((batch_size, *cfg.image_shape), dtype=np.float32)).realize()
    beta = Tensor([1.0]).realize()
    t0 = time.perf_counter()
    found = search_slowest(lambda: Trainer(build_model(cfg), lr=1e-3), x, beta, top=top,
                           label=json.dumps(cfg.to_dict(), sort_keys=True))
    if found:
        print(f"searched the {len(found)} slowest kernels of the training step ({sum(ms for _, ms in found):.0f} ms "
              f"of it before) in {time.perf_counter() - t0:.0f} s, kept for later runs (--kernel-search 0 skips "
              f"this)", file=sys.stderr, flush=True)
    return found


def train(args) -> dict:
    """Train per args; returns the last epoch's metrics. Raises Stopped after SIGINT or SIGTERM."""
    check_args(args)
    ckpt_path = args.out / CHECKPOINT
    if args.resume: state, meta = read_checkpoint(ckpt_path)
    elif ckpt_path.exists():
        raise UserError(f"{ckpt_path} already exists: pass --resume to continue that run, or --out NEW_FOLDER "
                        f"to start another")
    training_flags(args, meta["train"] if args.resume else None)
    if args.resume: check_resume(args, meta["config"])
    ds = load_dataset(args.dataset, args.data_dir)
    train_x = ds.train_x[:args.subset] if args.subset else ds.train_x
    if len(train_x) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(train_x)} images)")
    cfg = ModelConfig(**meta["config"]) if args.resume else model_config(args, ds.image_shape)

    load_programs()                                 # kernels compiled by earlier runs (kernels.load_programs)
    search_kernels(cfg, args.batch_size, args.kernel_search)    # once per network and device; not under NOOPT
    Tensor.manual_seed(args.seed)                   # after the search, which draws random numbers
    model = build_model(cfg)
    trainer = Trainer(model, args.lr)
    # step: steps taken; epoch: epochs completed; batch: batches of the current epoch done (> 0 after a stop
    # mid-epoch); log: (step, loss) at the log points of the current epoch
    step, epoch, batch, log = 0, 0, 0, []
    if args.resume:
        totals = trainer.totals if "train.totals" in state else None      # (absent from older checkpoints)
        load_weights(model, state, ckpt_path, trainer.opt, totals)
        Tensor.realize(*checkpoint_tensors(model, trainer.opt, totals).values())  # buffers before the first step
        step, epoch, batch, log = meta["step"], meta["epoch"], meta.get("batch", 0), meta.get("log", [])
    first_step, saved_step = step, (step if args.resume else None)

    def check_finite() -> None:
        """Stop if a loss since this process started was nan or inf, naming the first such step."""
        if bad := int(trainer.first_bad.item()):
            last = f"{ckpt_path} (step {saved_step})" if saved_step is not None else "none was written"
            raise UserError(f"the loss became nan or inf at step {first_step + bad} (seen at step {step}); training "
                            f"stopped without saving. The last good checkpoint is {last}: lower --lr and --resume, "
                            f"or start again")

    def save(metrics: dict) -> None:
        nonlocal saved_step
        check_finite()                                                  # never overwrite a good checkpoint with nan
        save_checkpoint(ckpt_path, model, trainer.opt, {"config": cfg.to_dict(), "train": train_meta, "step": step,
                                                        "epoch": epoch, "batch": batch, "log": log,
                                                        "metrics": metrics}, trainer.totals)
        saved_step = step

    tag = f"{cfg.model.upper()} {cfg.size} {cfg.latent_dims}"
    chosen = "given" if args.size else f"default on {Device.DEFAULT}"
    other = "paper" if cfg.size != "paper" else "medium"
    args.out.mkdir(parents=True, exist_ok=True)
    binarize = cfg.likelihood == "bernoulli"
    test_x = binarized_test_set(ds.test_x) if binarize else as_float(ds.test_x)     # CelebA is kept as uint8
    steps_per_epoch = len(train_x) // args.batch_size
    train_meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    metrics = meta.get("metrics", {}) if args.resume else {}

    with StopSignals() as stop:
        print(f"{tag}: size {cfg.size} ({chosen}; --size {other} for the other), {n_params(model):,} parameters, "
              f"{cfg.likelihood} likelihood, device {Device.DEFAULT}", file=sys.stderr, flush=True)
        while epoch < args.epochs:
            t0, start = time.perf_counter(), batch
            if start == 0: trainer.totals.assign(Tensor.zeros_like(trainer.totals)).realize()
            bar = tqdm(total=steps_per_epoch - start, desc=f"epoch {epoch + 1}/{args.epochs}", disable=None)
            for xb, _ in batches(train_x, ds.train_y, args.batch_size, args.seed, epoch, start, binarize=binarize):
                if stop.signum: break
                step, batch = step + 1, batch + 1
                stats = trainer.step(Tensor(xb), Tensor([kl_weight(step, args.kl_warmup)]))
                if batch % args.log_every == 0 or batch == steps_per_epoch:
                    s = stats.numpy()                                   # the only sync in the loop
                    check_finite()
                    log.append([step, float(s[0])])
                    bar.set_description(f"epoch {epoch + 1}/{args.epochs} step {step} loss {s[0]:.1f} recon "
                                        f"{s[1]:.1f} kl {' '.join(f'{k:.2f}' for k in s[2:])}")
                    if bar.disable: print(bar.desc.rstrip(": "), file=sys.stderr, flush=True)
                bar.update(1)
            bar.update(close=True)
            if stop.signum:
                name = signal.Signals(stop.signum).name
                if step == 0: raise Stopped(stop.signum, f"stopped by {name} before the first step; nothing to save")
                if step != saved_step: save(metrics)        # (else the signal came during an epoch-end save)
                raise Stopped(stop.signum, f"stopped by {name} at step {step} (epoch {epoch + 1}, batch {batch} of "
                                           f"{steps_per_epoch}); saved {ckpt_path}: continue with `python train.py "
                                           f"--out {args.out} --resume`")
            epoch, batch = epoch + 1, 0
            train_time = time.perf_counter() - t0
            totals = trainer.totals.numpy() / steps_per_epoch
            parts, recon = model.elbo_parts(test_x)
            metrics = {"epoch": epoch, "step": step, "kl_weight": kl_weight(step, args.kl_warmup),
                       "train_loss": float(totals[0]), "train_recon": float(totals[1]),
                       "train_kl": [float(k) for k in totals[2:]],
                       "test_elbo": float(parts[:, 0].mean()), "test_recon": float(parts[:, 1].mean()),
                       "test_kl": [float(k) for k in parts[:, 2:].mean(0)], "train_loss_log": log,
                       "epoch_seconds": round(train_time, 1),
                       "images_per_second": round((steps_per_epoch - start) * args.batch_size / train_time, 1)}
            log = []
            save(metrics)                   # first the checkpoint: it is what --resume needs; then the extras
            try:
                with open(args.out / "metrics.jsonl", "a") as f: f.write(json.dumps(metrics) + "\n")
                write_pngs(trainer, args.out, test_x, recon, epoch, tag)
            except OSError as e:
                raise UserError(f"could not write to {args.out} ({e.strerror}); free disk space and --resume, or "
                                f"choose another --out. {ckpt_path} holds epoch {epoch}") from None
            save_programs()                 # the evaluation and sampling kernels too
            print(f"epoch {epoch}: test ELBO {metrics['test_elbo']:.2f} nats (recon {metrics['test_recon']:.2f}, "
                  f"KL per layer {' '.join(f'{k:.2f}' for k in metrics['test_kl'])}), "
                  f"{metrics['images_per_second']:.0f} images/s; wrote {ckpt_path}", file=sys.stderr)
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"interrupted before the step could finish: nothing saved; the last checkpoint in {args.out}, if any, "
              f"is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
