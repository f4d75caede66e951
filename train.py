"""Train a VLAE (paper Eq. 14) or the Markov HVAE baseline (Eq. 5) on MNIST, with checkpoints, a log and PNGs.

    python train.py --dataset mnist                  # writes out/mnist-vlae/
    python train.py --dataset mnist --model hvae     # the same loop for the HVAE; writes out/mnist-hvae/
    python train.py --dataset mnist --resume         # continues from out/mnist-vlae/checkpoint.safetensors
    DEV=CUDA python train.py --size paper            # the authors' full network on a GPU (DEV=METAL, DEV=CL ...)

The run folder gets checkpoint.safetensors (weights, Adam state, step, RNG state and the config as JSON metadata,
written atomically after every epoch), metrics.jsonl (one line per epoch), samples.png and reconstructions.png.
"""
from __future__ import annotations
import argparse, json, math, os, sys, time
from pathlib import Path
import numpy as np
from tinygrad import Tensor, TinyJit, Device, Context, nn
from tinygrad.helpers import tqdm
from tinygrad.nn.state import safe_save, safe_load, safe_load_metadata, load_state_dict
from data import DataError, load_dataset, batches, image_grid, over_each_other, save_png
from vlae import VLAE, ModelConfig, SIZES, cached_jit, default_size, n_params, weights
from hvae import HVAE

MODELS = {"vlae": VLAE, "hvae": HVAE}
CHECKPOINT = "checkpoint.safetensors"
BATCH = 100                 # evaluation and sampling run at this batch size (padded): one compile each
DEFAULT_EPOCHS = 3


class UserError(Exception):
    """A mistake in flags, files or run folders; main() prints its one-line message and exits with code 2."""


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors with the config, step and RNG state as JSON metadata, written atomically
# ---------------------------------------------------------------------------------------------------------

def build_model(cfg: ModelConfig):
    return MODELS[cfg.model](cfg)


def optimizer_state(opt) -> dict[str, Tensor]:
    """Adam's moments and bias-correction powers (the params themselves are saved with the model)."""
    state = {"b1_t": opt.b1_t, "b2_t": opt.b2_t}
    for i, (m, v) in enumerate(zip(opt.m, opt.v)): state[f"m.{i}"], state[f"v.{i}"] = m, v
    return state


def rng_counter() -> Tensor:
    """tinygrad's on-device RNG draws from (seed, counter); saving the counter makes a resumed run continue
    the same stream of random numbers."""
    if Device.DEFAULT not in Tensor._device_rng_counters: Tensor.rand(1).realize()
    return Tensor._device_rng_counters[Device.DEFAULT]


def save_checkpoint(path: Path, model, opt, meta: dict) -> None:
    """Write to a temporary file, flush it to disk, then rename over the old checkpoint: a crash at any moment
    leaves either the previous checkpoint or the new one, never a half-written file."""
    state = {f"model.{k}": v for k, v in weights(model).items()}
    state |= {f"optim.{k}": v for k, v in optimizer_state(opt).items()}
    state["rng.counter"] = rng_counter()
    atomic_safe_save(state, path, meta)


def atomic_safe_save(state: dict[str, Tensor], path: Path, meta: dict) -> None:
    """safe_save with JSON metadata, written to a temporary file, flushed and renamed over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        safe_save(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
        with open(tmp, "rb+") as f: os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({e.strerror}); free disk space or choose another --out. "
                        f"The previous file, if any, is untouched") from None


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict]:
    """The tensors and the decoded metadata of a checkpoint, or a UserError saying what to do."""
    if path.is_dir() or not path.suffix: path = path / CHECKPOINT
    if not path.exists():
        run, model = path.parent, "hvae" if "hvae" in path.parent.name else "vlae"
        command = "python train.py --dataset mnist" + (" --model hvae" if model == "hvae" else "")
        if run != Path(f"out/mnist-{model}"): command += f" --out {run}"
        raise UserError(f"no checkpoint in {run}: train one first with `{command}`, or point at a run folder "
                        f"that holds {CHECKPOINT}")
    try:
        _, _, header = safe_load_metadata(str(path))
        meta = {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}
        state = safe_load(str(path))
        if "config" not in meta: raise ValueError("no config in its metadata")
    except Exception as e:  # a truncated or foreign file fails in many ways; all mean the same to the user
        raise UserError(f"{path} is not a readable checkpoint of this project ({type(e).__name__}: {e}); "
                        f"delete it and train again, or point at another run folder") from None
    return state, meta


def load_part(obj, state: dict[str, Tensor], prefix: str) -> None:
    """Copy the checkpoint tensors named prefix.* into obj (a model, or the dict of optimizer_state)."""
    load_state_dict(obj, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, verbose=False)


def load_model(path: Path):
    """Rebuild a model from the config stored in a checkpoint and load its weights (for sample.py, evaluate.py)."""
    state, meta = read_checkpoint(path)
    cfg = ModelConfig(**meta["config"])
    model = build_model(cfg)
    load_part(model, state, "model.")
    return model, meta


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
        self.step = TinyJit(self._step)

    def _step(self, x: Tensor, beta: Tensor) -> Tensor:
        """One Adam step on a batch x (B, C, H, W); returns (loss, recon, kl_1..kl_L) of this batch."""
        with Context(TRAINING=1):
            self.opt.zero_grad()
            out = self.model.elbo(x)
            kl = Tensor.stack(*out.kl, dim=1).mean(axis=0)              # (L,) mean KL per layer
            loss = (beta * kl).sum() - out.recon.mean()                 # -ELBO, with the KL warm-up weight beta
            loss.backward()
            self.opt.step()
            stats = Tensor.cat(loss.reshape(1), out.recon.mean().reshape(1), kl)
            Tensor.realize(stats, self.totals.assign(self.totals + stats))
            return stats


def evaluate(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example ELBO parts (N, 2+L): elbo, recon, kl_1..kl_L, for every row of x (eval mode: BatchNorm uses its
    running statistics), and the images decoded from the posterior means (N, C, H, W)."""
    def parts(x: Tensor) -> tuple[Tensor, Tensor]:
        out = model.elbo(x)
        recon_mean = model.decode([mu for mu, _ in model.encode(x)])
        return Tensor.stack(out.elbo, out.recon, *out.kl, dim=1).realize(), recon_mean.realize()
    jit = cached_jit(model, "evaluate", parts)
    return batched(lambda xb: jit(xb[0]), [x])


def batched(fn, arrays: list[np.ndarray]):
    """fn(list of (BATCH, ...) Tensors) -> Tensor or tuple of Tensors, applied to the rows of arrays, outputs
    concatenated as numpy. The last chunk is padded with copies of its last row, so every call has the same shape
    and a jitted fn compiles once."""
    n, outs = len(arrays[0]), []
    for i in range(0, n, BATCH):
        chunk = [a[i:i + BATCH] for a in arrays]
        pad = BATCH - len(chunk[0])
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) if pad else c for c in chunk]
        ret = fn([Tensor(np.ascontiguousarray(c, dtype=np.float32)) for c in chunk])
        outs.append([r.numpy()[:BATCH - pad] for r in (ret if isinstance(ret, tuple) else (ret,))])
    cat = [np.concatenate(parts) for parts in zip(*outs)]
    return tuple(cat) if len(cat) > 1 else cat[0]


def binarized_test_set(x: np.ndarray) -> np.ndarray:
    """A fixed binarization of the test set (seed 0), so that Bernoulli test ELBOs compare across runs."""
    return (np.random.default_rng(0).random(x.shape, dtype=np.float32) < x).astype(np.float32)


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
    p = argparse.ArgumentParser(description="Train a Variational Ladder Autoencoder (Zhao, Song & Ermon 2017).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="dataset name (mnist)")
    p.add_argument("--model", default="vlae", choices=sorted(MODELS), help="which model to train")
    p.add_argument("--epochs", type=int, default=None, help="total epochs to train (a resumed run stops there)")
    p.add_argument("--batch-size", type=int, default=100, help="images per step (the authors used 100)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    # model flags default to None so that --resume can tell which ones were given
    p.add_argument("--latent-dims", default=None, help="code size per layer, bottom first, e.g. 2,2,2 (default)")
    p.add_argument("--size", default=None, choices=sorted(SIZES),
                   help="network width: paper = the authors' network; default: paper on a GPU, narrow on CPU")
    p.add_argument("--combiner", default=None, choices=["concat", "gated"],
                   help="how v_l(z_l) joins z~_{l+1}: concat (Eq. 11, default) or gated add (authors' code)")
    p.add_argument("--likelihood", default=None, choices=["gaussian", "bernoulli"],
                   help="r(x|z): fixed-variance gaussian (the paper's, default) or bernoulli (binarized x)")
    p.add_argument("--sigma-x", type=float, default=None, help="std of the gaussian likelihood (default 0.1)")
    p.add_argument("--kl-warmup", type=int, default=1000,
                   help="KL weight 1 - exp(-step / N) as in the authors' code; 0 turns warm-up off")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and sampling noise")
    p.add_argument("--out", default=None, help="run folder (default out/<dataset>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--data-dir", default=None, help="folder holding <dataset>/ (default $VLAE_DATA, then ./data)")
    p.add_argument("--subset", type=int, default=0, help="train on the first N training images only (0 = all)")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress-bar updates (each is a sync)")
    args = p.parse_args(argv)
    args.out = Path(args.out or f"out/{args.dataset}-{args.model}")
    return args


def model_config(args, image_shape: tuple) -> ModelConfig:
    """The ModelConfig the flags ask for; flags left unset take the defaults."""
    try:
        dims = tuple(int(d) for d in (args.latent_dims or "2,2,2").split(","))
    except ValueError:
        raise UserError(f"--latent-dims {args.latent_dims!r} is not a comma-separated list of integers, e.g. 2,2,2")
    if len(dims) < 2 or min(dims) < 1:
        raise UserError(f"--latent-dims {args.latent_dims}: give at least 2 layers, each of size >= 1, e.g. 2,2,2")
    return ModelConfig(model=args.model, image_shape=image_shape, latent_dims=dims,
                       size=args.size or default_size(), combiner=args.combiner or "concat",
                       likelihood=args.likelihood or "gaussian",
                       sigma_x=args.sigma_x if args.sigma_x is not None else 0.1)


def check_args(args) -> None:
    if args.epochs is not None and args.epochs < 1: raise UserError(f"--epochs must be >= 1 (got {args.epochs})")
    if args.batch_size < 1: raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if not args.lr > 0: raise UserError(f"--lr must be > 0 (got {args.lr})")
    if args.sigma_x is not None and not args.sigma_x > 0: raise UserError(f"--sigma-x must be > 0 (got {args.sigma_x})")
    if args.kl_warmup < 0: raise UserError(f"--kl-warmup must be >= 0 (got {args.kl_warmup})")
    if args.subset < 0: raise UserError(f"--subset must be >= 0 (got {args.subset})")
    if args.log_every < 1: raise UserError(f"--log-every must be >= 1 (got {args.log_every})")


def check_resume(args, cfg: ModelConfig, saved: dict) -> None:
    """A flag given together with --resume must agree with the checkpoint's config."""
    saved_cfg = ModelConfig(**saved)
    given = {"latent_dims": args.latent_dims and cfg.latent_dims, "size": args.size, "combiner": args.combiner,
             "likelihood": args.likelihood, "sigma_x": args.sigma_x, "model": args.model}
    for k, v in given.items():
        if v is not None and v != getattr(saved_cfg, k):
            raise UserError(f"--resume: the checkpoint in {args.out} was trained with {k}={getattr(saved_cfg, k)}, "
                            f"not {v}; drop that flag, or start a new run with another --out")


def train(args) -> dict:
    """Train per args; returns the last epoch's metrics."""
    check_args(args)
    ds = load_dataset(args.dataset, args.data_dir)
    train_x = ds.train_x[:args.subset] if args.subset else ds.train_x
    if len(train_x) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(train_x)} images)")
    cfg = model_config(args, ds.image_shape)
    ckpt_path = args.out / CHECKPOINT
    Tensor.manual_seed(args.seed)

    if args.resume:
        state, meta = read_checkpoint(ckpt_path)
        check_resume(args, cfg, meta["config"])
        cfg = ModelConfig(**meta["config"])
        if meta["train"]["batch_size"] != args.batch_size or meta["train"]["seed"] != args.seed:
            raise UserError(f"--resume: the checkpoint in {args.out} used --batch-size {meta['train']['batch_size']} "
                            f"--seed {meta['train']['seed']}; pass those (or leave them at their defaults)")
    elif ckpt_path.exists():
        raise UserError(f"{ckpt_path} already exists: pass --resume to continue that run, or --out NEW_FOLDER "
                        f"to start another")

    model = build_model(cfg)
    trainer = Trainer(model, args.lr)
    step, epoch = 0, 0
    if args.resume:
        load_part(model, state, "model.")
        load_part(optimizer_state(trainer.opt), state, "optim.")
        rng_counter().assign(state["rng.counter"].to(Device.DEFAULT)).realize()
        step, epoch = meta["step"], meta["epoch"]
    epochs = args.epochs or (meta["train"]["epochs"] if args.resume else DEFAULT_EPOCHS)
    Tensor.realize(*weights(model).values())

    tag = f"{cfg.model.upper()} {cfg.size} {cfg.latent_dims}"
    chosen = "given" if args.size else f"default on {Device.DEFAULT}"
    other = "paper" if cfg.size == "narrow" else "narrow"
    print(f"{tag}: size {cfg.size} ({chosen}; --size {other} for the other), {n_params(model):,} parameters, "
          f"{cfg.likelihood} likelihood, device {Device.DEFAULT}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    binarize = cfg.likelihood == "bernoulli"
    test_x = binarized_test_set(ds.test_x) if binarize else ds.test_x
    steps_per_epoch = len(train_x) // args.batch_size
    train_meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"epochs": epochs}
    metrics = {}

    while epoch < epochs:
        t0 = time.perf_counter()
        trainer.totals.assign(Tensor.zeros_like(trainer.totals)).realize()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", disable=None)  # off when not a tty
        for i, (xb, _) in enumerate(batches(train_x, ds.train_y, args.batch_size, args.seed, epoch, binarize=binarize)):
            step += 1
            stats = trainer.step(Tensor(xb), Tensor([kl_weight(step, args.kl_warmup)]))
            if (i + 1) % args.log_every == 0 or i + 1 == steps_per_epoch:
                s = stats.numpy()                                       # the only sync in the loop
                if not np.isfinite(s).all():
                    raise UserError(f"loss became {s[0]} at step {step}; the checkpoint in {args.out} (if any) is "
                                    f"the last good state: lower --lr and --resume, or start again")
                bar.set_description(f"epoch {epoch + 1}/{epochs} step {step} loss {s[0]:.1f} recon {s[1]:.1f} "
                                    f"kl {' '.join(f'{k:.2f}' for k in s[2:])}")
                if bar.disable: print(bar.desc.rstrip(": "), file=sys.stderr, flush=True)
            bar.update(1)
        bar.update(close=True)
        epoch += 1
        train_time = time.perf_counter() - t0
        totals = trainer.totals.numpy() / steps_per_epoch
        parts, recon = evaluate(model, test_x)
        metrics = {"epoch": epoch, "step": step, "kl_weight": kl_weight(step, args.kl_warmup),
                   "train_loss": float(totals[0]), "train_recon": float(totals[1]),
                   "train_kl": [float(k) for k in totals[2:]],
                   "test_elbo": float(parts[:, 0].mean()), "test_recon": float(parts[:, 1].mean()),
                   "test_kl": [float(k) for k in parts[:, 2:].mean(0)],
                   "epoch_seconds": round(train_time, 1), "images_per_second": round(steps_per_epoch *
                                                                                     args.batch_size / train_time, 1)}
        with open(args.out / "metrics.jsonl", "a") as f: f.write(json.dumps(metrics) + "\n")
        write_pngs(trainer, args.out, test_x, recon, epoch, tag)
        save_checkpoint(ckpt_path, model, trainer.opt, {"config": cfg.to_dict(), "train": train_meta,
                                                        "step": step, "epoch": epoch, "metrics": metrics})
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
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint (written at the end of each epoch) is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
