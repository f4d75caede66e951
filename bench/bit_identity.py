"""Does the training step still compute the same numbers, bit for bit? Builds the default MNIST network as train.py
does (seed 0, --size medium unless given), takes 3 Adam steps on 2 fixed training batches (the first two of epoch 0,
then the first again) with train.py's KL weight, and prints the sha256 of every weight, Adam's state, the RNG
counter and the running sums, by name. Run it before and after a change to the model or its kernels: the same hash
means the same training run.

    DEV=CL python bench/bit_identity.py                    # the default run's network, as train.py trains it
    DEV=CL python bench/bit_identity.py --npz state.npz    # also writes the arrays (to compare two runs)
    python bench/bit_identity.py --runs RUN_A RUN_B         # two whole runs: their checkpoints, tensor by tensor
"""
from __future__ import annotations
import argparse, hashlib, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np
from tinygrad import Device, Tensor
import train
from checkpoint import build_model, checkpoint_tensors, read_checkpoint
from data import batches, load_dataset


def setup(plain: bool) -> None:
    """What train.py sets up before its model is built (before fast/ existed, kernels.load_programs(): the hash of
    that code is bench/bit_identity.py at its first commit)."""
    import fast
    if not plain:
        fast.enable()


def compare_runs(a: Path, b: Path) -> str:
    """Two runs' checkpoints (weights, Adam's state, BN statistics, the loss sums), tensor by tensor, as bytes."""
    (ta, _), (tb, _) = read_checkpoint(a), read_checkpoint(b)
    same = [k for k in ta if k in tb and ta[k].dtype == tb[k].dtype and ta[k].tobytes() == tb[k].tobytes()]
    return f"{len(same)} of {len(ta)} tensors identical ({len(tb)} in {b})" + ("" if len(same) == len(ta) == len(tb)
                                                                               else f"; differ: {sorted(set(ta) - set(same))[:5]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="medium")
    p.add_argument("--plain", action="store_true", help="as train.py --plain (without the fast package)")
    p.add_argument("--npz", default=None, help="also write the arrays here")
    p.add_argument("--runs", nargs=2, type=Path, default=None, metavar="RUN", help="compare two run folders instead")
    a = p.parse_args()
    if a.runs:
        return print(compare_runs(*a.runs))
    # --kl-warmup 15000: the KL weight under which the hashes in docs/performance.md were recorded
    args = train.parse_args(["--dataset", "mnist", "--size", a.size, "--kl-warmup", "15000"])
    setup(a.plain)
    ds = load_dataset(args.dataset, args.data_dir)
    cfg = train.model_config(args, ds.image_shape)
    Tensor.manual_seed(args.seed)
    trainer = train.Trainer(build_model(cfg), args.lr)
    it = batches(ds.train_x, ds.train_y, args.batch_size, args.seed, 0)
    xs = [next(it)[0] for _ in range(2)]
    for step in (1, 2, 3):
        trainer.step(Tensor(xs[(step - 1) % 2]), Tensor([train.kl_weight(step, args.kl_warmup)])).realize()
    arrays = {k: v.numpy() for k, v in sorted(checkpoint_tensors(trainer.model, trainer.opt, trainer.totals).items())}
    h = hashlib.sha256()
    for k, v in arrays.items():
        h.update(f"{k} {v.dtype} {v.shape}\n".encode())
        h.update(np.ascontiguousarray(v).tobytes())
    if a.npz:
        np.savez(a.npz, **arrays)
    print(f"{h.hexdigest()}  {cfg.size} {cfg.latent_dims} on {Device.DEFAULT}: {len(arrays)} tensors after 3 steps")


if __name__ == "__main__":
    main()
