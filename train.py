"""Train a VLAE (paper Eq. 14) or the Markov HVAE baseline (Eq. 5) on MNIST, with checkpoints, a log and PNGs.

    python train.py --dataset mnist                  # writes out/mnist-vlae/
    python train.py --dataset mnist --model hvae     # the same loop for the HVAE; writes out/mnist-hvae/
    python train.py --dataset mnist --resume         # continues from out/mnist-vlae/checkpoint.safetensors
    DEV=CUDA python train.py --size paper            # the authors' full network on a GPU (DEV=METAL, DEV=CL ...)

After every epoch the run folder gets checkpoint.safetensors (weights, Adam state, step, RNG state, the config;
written atomically), a line of metrics.jsonl, curves.png, samples-epochN.png (the same prior draws every epoch;
samples.png is the latest) and reconstructions.png. Ctrl-C or SIGTERM finishes the step, saves a checkpoint and
exits (130 / 143); --resume then ends with the same weights, bit for bit on a CPU, as a run never stopped.
"""
from __future__ import annotations
import argparse, dataclasses, json, math, shutil, signal, sys, time
from pathlib import Path
import numpy as np
from tinygrad import Tensor, Device, Context, dtypes, nn
from tinygrad.helpers import tqdm
from data import DATASETS, DataError, as_float, batches, binarized_test_set, load_dataset
from files import image_grid, line_charts, over_each_other, save_png
from vlae import ModelConfig, SIZES, n_params, weights
from arrays import elbo_parts, generate_images
import fast
from checkpoint import (CHECKPOINT, MODELS, StopSignals, Stopped, UserError, build_model, checkpoint_tensors,
                        code_version, load_weights, optimizer_state, read_checkpoint, save_checkpoint)

# The authors' code sizes per dataset (github.com/ermongroup/Variational-Ladder-Autoencoder)
LATENT_DIMS = {"mnist": (2, 2, 2), "fashion-mnist": (2, 2, 2), "svhn": (5, 5, 5, 10), "celeba": (10, 10, 10, 10)}
# A plain --resume continues exactly: these flags, unless given, take the checkpoint's values (not the defaults),
# and those of DATA_ORDER, which fix which batch comes next, may not change; nor may the model's (MODEL_FLAGS)
RESUMED = ("dataset", "epochs", "batch_size", "lr", "kl_warmup", "seed", "subset", "log_every")
DATA_ORDER = ("dataset", "batch_size", "seed", "subset")
MODEL_FLAGS = ("model", "latent_dims", "size", "combiner", "likelihood", "sigma_x")


# One training loop for both models: anything with .elbo(x) -> ELBO(elbo, recon, kl), .encode, .decode, .generate

def kl_weight(step: int, warmup: int) -> float:
    """The authors' KL warm-up, 1 - exp(-step / warmup); warmup = 0 gives the plain ELBO from the first step."""
    return 1.0 - math.exp(-step / warmup) if warmup > 0 else 1.0


class Trainer:
    def __init__(self, model, lr: float):
        self.model = model
        # Adam realizes the BatchNorm running statistics (its buffers) in each step too: that is what updates them
        self.opt = nn.optim.Adam(list(weights(model).values()), lr=lr)
        self.totals = Tensor.zeros(2 + model.L).contiguous().realize()   # running sums of (loss, recon, kl_1..kl_L)
        # steps taken, and the first (1-based) whose loss was nan or inf (0: none): read at log points, not every step
        self.steps, self.first_bad = (Tensor.zeros(1, dtype=dtypes.int32).contiguous().realize() for _ in range(2))
        # Everything the step reads and updates made a buffer now, not folded into the first step's graph
        Tensor.realize(*weights(model).values(), *optimizer_state(self.opt).values(), self.opt.lr)
        self.step = self.jit = fast.jit(self._step)     # step(x, beta): _step jitted (tinygrad's TinyJit unless fast/)

    def step_tensors(self, x: Tensor, beta: Tensor) -> tuple[list[Tensor], Tensor]:
        """The graph of one Adam step on a batch x (B, C, H, W), not yet run: the tensors to realize (new weights
        and Adam state, the running sums) and the batch's (loss, recon, kl_1..kl_L). Needs Context(TRAINING=1)."""
        self.opt.zero_grad()
        out = self.model.elbo(x)
        kl = Tensor.stack(*out.kl, dim=1).mean(axis=0)              # (L,) mean KL per layer
        loss = (beta * kl).sum() - out.recon.mean()                 # -ELBO (Eq. 14; Eq. 5), KL warmed up by beta
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


class Run:
    """A training run in progress: its Trainer, where it stands, and what the loop does besides stepping."""
    def __init__(self, trainer: Trainer, cfg: ModelConfig, args):
        self.trainer, self.cfg, self.args, self.path = trainer, cfg, args, args.out / CHECKPOINT
        self.step, self.epoch, self.batch = 0, 0, 0     # steps taken, epochs completed, batches of this epoch done
        self.log, self.metrics = [], {}                 # this epoch's log points (log_point); the last epoch's metrics
        self.first_step, self.saved_step = 0, None      # where this process started; the checkpoint's step on disk
        self.tag = f"{cfg.model.upper()} {cfg.size} {cfg.latent_dims}"

    def resume(self, state: dict, meta: dict) -> None:
        trainer = self.trainer
        totals = trainer.totals if "train.totals" in state else None         # (absent from older checkpoints)
        load_weights(trainer.model, state, self.path, trainer.opt, totals)
        Tensor.realize(*checkpoint_tensors(trainer.model, trainer.opt, totals).values())  # buffers before a step
        self.step, self.epoch, self.batch = meta["step"], meta["epoch"], meta.get("batch", 0)
        self.log, self.metrics = meta.get("log", []), meta.get("metrics", {})
        self.first_step = self.saved_step = self.step

    def log_point(self, stats: Tensor, bar, beta: float) -> None:
        s = stats.numpy()                                               # the only sync in the training loop
        self.check_finite()
        self.log.append({"step": self.step, "kl_weight": beta, "loss": float(s[0]), "recon": float(s[1]),
                         "kl": [float(k) for k in s[2:]]})
        bar.set_description(f"epoch {self.epoch + 1}/{self.args.epochs} step {self.step} loss {s[0]:.1f} recon "
                            f"{s[1]:.1f} kl {' '.join(f'{k:.2f}' for k in s[2:])}")
        if bar.disable:
            print(bar.desc.rstrip(": "), file=sys.stderr, flush=True)

    def check_finite(self) -> None:
        if bad := int(self.trainer.first_bad.item()):      # a loss since this process started was nan or inf
            last = f"{self.path} (step {self.saved_step})" if self.saved_step is not None else "none was written"
            raise UserError(f"the loss became nan or inf at step {self.first_step + bad} (seen at step {self.step}); "
                            f"training stopped without saving. The last good checkpoint is {last}: lower --lr and "
                            f"--resume, or start again")

    def save(self) -> None:
        self.check_finite()                             # never overwrite a good checkpoint with a nan
        flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items() if k != "given"}
        meta = {"config": self.cfg.to_dict(), "train": flags, "step": self.step, "epoch": self.epoch,
                "batch": self.batch, "log": self.log, "metrics": self.metrics, "code": code_version()}
        save_checkpoint(self.path, self.trainer.model, self.trainer.opt, meta, self.trainer.totals)
        self.saved_step = self.step

    def save_curves(self) -> None:
        """curves.png: every log point in metrics.jsonl."""
        lines = (self.args.out / "metrics.jsonl").read_text().splitlines()
        log = [p for line in lines for p in json.loads(line).get("train_log", []) if isinstance(p, dict)]
        if not log:                                     # (a run resumed from a checkpoint of older code)
            return
        step, kl = [p["step"] for p in log], np.array([p["kl"] for p in log])
        panels = [(f"{name}, nats", [(name, step, [p[key] for p in log])]) for name, key in
                  (("loss (-ELBO, KL weighted)", "loss"), ("reconstruction log r(x|z)", "recon"))]
        panels += [("KL per layer, nats", [(f"z_{l + 1}", step, kl[:, l]) for l in range(kl.shape[1])]),
                   ("KL weight (warm-up)", [("beta", step, [p["kl_weight"] for p in log])])]
        line_charts(panels, self.args.out / "curves.png", f"{self.tag}: training, at each log point (train.py)")

    def stopped(self, signum: int, steps_per_epoch: int) -> Stopped:
        """After SIGINT or SIGTERM: save a checkpoint at the step reached; returns the exception that ends the run."""
        name = signal.Signals(signum).name
        if self.step == 0:
            return Stopped(signum, f"stopped by {name} before the first step; nothing to save")
        if self.step != self.saved_step:                # (else the signal came during an epoch-end save)
            self.save()
        return Stopped(signum, f"stopped by {name} at step {self.step} (epoch {self.epoch + 1}, batch {self.batch} "
                               f"of {steps_per_epoch}); saved {self.path}: continue with `python train.py --out "
                               f"{self.args.out} --resume`")

    def end_epoch(self, test_x: np.ndarray, steps_per_epoch: int, timed_steps: int, seconds: float) -> None:
        """The epoch's metrics (training means, the test-set ELBO and its parts), the checkpoint, then the files."""
        self.epoch, self.batch, args, model = self.epoch + 1, 0, self.args, self.trainer.model
        totals = self.trainer.totals.numpy() / steps_per_epoch
        parts, recon = elbo_parts(model, test_x)
        self.metrics = {"epoch": self.epoch, "step": self.step, "kl_weight": kl_weight(self.step, args.kl_warmup),
                        "train_loss": float(totals[0]), "train_recon": float(totals[1]),
                        "train_kl": totals[2:].tolist(), "test_elbo": float(parts[:, 0].mean()),
                        "test_recon": float(parts[:, 1].mean()), "test_kl": parts[:, 2:].mean(0).tolist(),
                        "train_log": self.log, "epoch_seconds": round(seconds, 1),
                        "images_per_second": round(timed_steps * args.batch_size / seconds, 1)}
        self.log = []
        self.save()
        rng = np.random.default_rng(1234)
        eps = [rng.standard_normal((100, d)).astype(np.float32) for d in self.cfg.latent_dims]
        try:
            with open(args.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(self.metrics) + "\n")
            samples = save_png(image_grid(generate_images(model, eps), 10, scale=2), args.out /
                               f"samples-epoch{self.epoch}.png", f"{self.tag} prior samples, epoch {self.epoch}")
            shutil.copyfile(samples, args.out / "samples.png")
            self.save_curves()
            save_png(image_grid(over_each_other(test_x[:30], recon[:30], 10), 10, scale=2), args.out /
                     "reconstructions.png", f"{self.tag} test images (odd rows), reconstructions, epoch {self.epoch}")
        except OSError as e:
            raise UserError(f"could not write to {args.out} ({e.strerror}); free disk space and --resume, or choose "
                            f"another --out. {self.path} holds epoch {self.epoch}") from None
        print(f"epoch {self.epoch}: test ELBO {self.metrics['test_elbo']:.2f} nats (recon "
              f"{self.metrics['test_recon']:.2f}, KL per layer {' '.join(f'{k:.2f}' for k in self.metrics['test_kl'])})"
              f", {self.metrics['images_per_second']:.0f} images/s; wrote {self.path}", file=sys.stderr)


def train(args) -> dict:
    """Train per args; returns the last epoch's metrics. Raises Stopped after SIGINT or SIGTERM."""
    cfg, ds, state, meta = setup(args)
    binarize = cfg.likelihood == "bernoulli"
    test_x = binarized_test_set(ds.test_x) if binarize else as_float(ds.test_x)     # CelebA is kept as uint8
    if not args.plain:
        fast.enable()                                           # speed only: fast/, docs/performance.md
    fast.search_kernels(lambda: Trainer(build_model(cfg), lr=1e-3), cfg, args.batch_size, args.kernel_search)
    Tensor.manual_seed(args.seed)                               # after the search, which draws random numbers
    run = Run(Trainer(build_model(cfg), args.lr), cfg, args)
    if args.resume:
        run.resume(state, meta)
    steps_per_epoch = len(ds.train_x) // args.batch_size
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{run.tag}: size {cfg.size} ({'given' if 'size' in args.given else f'default on {Device.DEFAULT}'}), "
          f"{n_params(run.trainer.model):,} parameters, {cfg.likelihood} likelihood, device {Device.DEFAULT}",
          file=sys.stderr, flush=True)
    with StopSignals() as stop:
        while run.epoch < args.epochs:
            t0, start = time.perf_counter(), run.batch
            if start == 0:
                run.trainer.totals.assign(Tensor.zeros_like(run.trainer.totals)).realize()
            bar = tqdm(total=steps_per_epoch - start, desc=f"epoch {run.epoch + 1}/{args.epochs}", disable=None)
            for xb, _ in batches(ds.train_x, ds.train_y, args.batch_size, args.seed, run.epoch, start, binarize):
                if stop.signum:
                    break
                run.step, run.batch = run.step + 1, run.batch + 1
                beta = kl_weight(run.step, args.kl_warmup)
                stats = run.trainer.step(Tensor(xb), Tensor([beta]))
                if run.batch % args.log_every == 0 or run.batch == steps_per_epoch:
                    run.log_point(stats, bar, beta)
                bar.update(1)
            bar.update(close=True)
            if stop.signum:
                raise run.stopped(stop.signum, steps_per_epoch)
            run.end_epoch(test_x, steps_per_epoch, steps_per_epoch - start, time.perf_counter() - t0)
    return run.metrics


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with args.given: the names of those given (a resumed run takes the others from its checkpoint)."""
    p = argparse.ArgumentParser(description="Train a Variational Ladder Autoencoder (Zhao, Song & Ermon 2017).")
    p.add_argument("--dataset", default="mnist", help=f"{', '.join(DATASETS)} (default %(default)s; README, Datasets)")
    p.add_argument("--model", default="vlae", choices=sorted(MODELS), help="the model to train (default %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="epochs in all (default %(default)s; --resume ends there)")
    p.add_argument("--batch-size", type=int, default=100, help="images per step (default %(default)s, the authors')")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default %(default)s, the authors')")
    p.add_argument("--latent-dims", help=f"code size per layer, bottom first (default: {LATENT_DIMS})")
    p.add_argument("--size", choices=sorted(SIZES), help="network width (default paper on a GPU, medium on a CPU)")
    p.add_argument("--combiner", default=ModelConfig.combiner, choices=["concat", "gated"],
                   help="how v_l(z_l) joins z~_{l+1}: gated add (authors' code), concat (Eq. 11) (default %(default)s)")
    p.add_argument("--likelihood", default=ModelConfig.likelihood, choices=["gaussian", "bernoulli"],
                   help="r(x|z): fixed-variance gaussian (the paper's) or bernoulli, binarized x (default %(default)s)")
    p.add_argument("--sigma-x", type=float, default=ModelConfig.sigma_x, help="std of the gaussian r (default 0.25)")
    # The authors' T = 15,000 ends near weight 1 after their days of training; in this run's 1,800 steps it would
    # end at 0.11. T = 600 ends at 0.95, and held Fig. 5 in the most seeds of the recipe search (README, Results)
    p.add_argument("--kl-warmup", type=int, default=600,
                   help="KL weight 1 - exp(-step / N), the authors' warm-up scaled to 3 epochs (default %(default)s); "
                        "0: no warm-up")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and noise (default %(default)s)")
    p.add_argument("--out", help="run folder (default out/<dataset>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its flags unless given "
                   "(--epochs, --lr, --kl-warmup, --log-every may change; the data order and the model may not)")
    p.add_argument("--data-dir", help="folder holding <dataset>/ (default $VLAE_DATA, then ./data)")
    p.add_argument("--subset", type=int, default=0, help="train on the first N training images (default 0 = all)")
    p.add_argument("--log-every", type=int, default=50, help="steps between loss-log entries (default %(default)s)")
    p.add_argument("--kernel-search", type=int, metavar="N", help="tinygrad's kernel search (BEAM) on the N slowest "
                   "kernels of the step, once per network and device (default: 0 on a CPU, OpenCL too, where it found "
                   "nothing faster; 2 elsewhere)")
    p.add_argument("--plain", action="store_true", help="without the fast/ package: the model's plain tinygrad layers "
                   "and jit (slower; the same function up to float rounding)")
    args = p.parse_args(argv)
    p.set_defaults(**{k: None for k in vars(args)})              # parsed again without defaults: what was given
    args.given = {k for k, v in vars(p.parse_args(argv)).items() if v is not None}
    args.out = Path(args.out or f"out/{args.dataset}-{args.model}")
    return args


def latent_dims(text: str) -> tuple:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise UserError(f"--latent-dims {text!r} is not a comma-separated list of integers, e.g. 2,2,2") from None
    if len(dims) < 2 or min(dims) < 1:
        raise UserError(f"--latent-dims {text}: give at least 2 layers, each of size >= 1, e.g. 2,2,2")
    return dims


def model_config(args, image_shape: tuple) -> ModelConfig:
    """The ModelConfig the flags ask for. --size defaults to the authors' network on an accelerator, and on a CPU
    (OpenCL on a CPU too) to `medium`: the authors' convolutions with narrower dense layers, 3 epochs in tens of
    minutes (README, Results over seeds: how often it shows Fig. 5)."""
    dims = latent_dims(args.latent_dims) if args.latent_dims else LATENT_DIMS[args.dataset]
    if args.likelihood == "bernoulli" and image_shape[0] != 1:
        raise UserError(f"--likelihood bernoulli binarizes grey-scale digits; {args.dataset} is in colour: use the "
                        f"default gaussian likelihood")
    size = args.size or ("medium" if fast.on_cpu(Device.DEFAULT) else "paper")
    return ModelConfig(model=args.model, image_shape=image_shape, latent_dims=dims, size=size,
                       combiner=args.combiner, likelihood=args.likelihood, sigma_x=args.sigma_x)


def check_args(args) -> None:
    for k, lowest in {"epochs": 1, "batch_size": 1, "kl_warmup": 0, "subset": 0, "log_every": 1, "kernel_search": 0,
                      "lr": 0, "sigma_x": 0}.items():
        strict = k in ("lr", "sigma_x")                                                  # (not >: nan too)
        if (v := getattr(args, k)) is not None and not (v > lowest if strict else v >= lowest):
            raise UserError(f"--{k.replace('_', '-')} must be {'>' if strict else '>='} {lowest} (got {v})")


def resume_flags(args, meta: dict) -> None:
    """A resumed run: the flags not given take the checkpoint's; a given data-order or model flag must agree."""
    saved, cfg = meta["train"], ModelConfig(**meta["config"])
    for k in DATA_ORDER:
        if k in args.given and k in saved and (given := getattr(args, k)) != saved[k]:
            raise UserError(f"--resume: the checkpoint in {args.out} was trained with --{k.replace('_', '-')} "
                            f"{saved[k]}, not {given}; drop that flag (the data order stays), or use another --out")
    for k in MODEL_FLAGS:
        given = latent_dims(args.latent_dims) if k == "latent_dims" and args.latent_dims else getattr(args, k)
        if k in args.given and given != getattr(cfg, k):
            raise UserError(f"--resume: the checkpoint in {args.out} was trained with {k}={getattr(cfg, k)}, not "
                            f"{given}; drop that flag, or start a new run with another --out")
    for k in RESUMED:
        if k not in args.given and k in saved:
            setattr(args, k, saved[k])


def setup(args):
    """Check the flags (a resumed run's from its checkpoint), load the data (cut to --subset): (config, dataset,
    checkpoint arrays, checkpoint metadata); the last two are None for a new run."""
    path, state, meta = args.out / CHECKPOINT, None, None
    if args.resume:
        state, meta = read_checkpoint(path)
        resume_flags(args, meta)
    elif path.exists():
        raise UserError(f"{path} already exists: pass --resume to continue that run, or --out NEW_FOLDER for another")
    check_args(args)
    ds = load_dataset(args.dataset, args.data_dir)
    if args.subset:
        ds = dataclasses.replace(ds, train_x=ds.train_x[:args.subset], train_y=ds.train_y[:args.subset])
    if len(ds.train_x) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(ds.train_x)} images)")
    cfg = ModelConfig(**meta["config"]) if args.resume else model_config(args, ds.image_shape)
    return cfg, ds, state, meta


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
