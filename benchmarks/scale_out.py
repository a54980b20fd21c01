r"""The VAE trained on PyTorch Lightning: its overhead against ``fit()``, and 1 process against 2.

Both measurements train the VAE of ``models/vae.py`` with its defaults (20 latents, 200-200
tanh MLPs, IWAE-5 with DReG, batch 100, fused Adam with learning rate 1e-3), built by the
CLI's own ``build``, from the same seed.

1. **Overhead, in this process.** Round after round, in an order that alternates,
   ``fit()`` and a single-process Lightning ``Trainer`` running
   :class:`~pyro_amortized.lightning.PyroLightningModule` each train ``--epochs`` epochs
   from the same initialization, bare (no checkpoints, logger or progress bar) and as the
   CLI runs them (a checkpoint every epoch; Lightning's CSV logger). Each run gives the
   median of its epoch times (``History.epoch_time``: training and validation, the first
   epoch left out as warm-up) and its whole call's wall time per epoch (construction,
   Lightning's sanity check and the first epoch included). The table shows each
   Lightning/fit ratio's median over the rounds; a first round, unrecorded, warms up.
2. **One process against two**, as subprocesses in rotating order: Lightning on one process
   with one thread, one process with two threads, and two DDP processes (gloo) with one
   thread each. An epoch is a pass over all training rows in every case (each DDP worker
   takes half). The table shows the median over rounds of each run's median epoch time.

Run from the repository root, alone on the machine::

    python benchmarks/scale_out.py                                  # digits
    python benchmarks/scale_out.py --dataset binarized-mnist \
        --root ../shared/data/binarized_mnist --epochs 3 --rounds 3

Results are printed as Markdown tables and written to ``runs/benchmarks/scale_out_<dataset>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import torch  # noqa: E402

from models._vae_training import VALID_BATCH_SIZE, adam_options  # noqa: E402
from models.datasets import load_dataset  # noqa: E402
from models.vae import build, parse_args  # noqa: E402
from pyro_amortized import Checkpoint, Validation, fit  # noqa: E402
from pyro_amortized.optim import Adam  # noqa: E402

CONTESTANTS = ("fit", "lightning", "fit+checkpoints", "lightning+checkpoints+logger")
PROCESSES = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (1, 2), "2 processes": (2, 1)}


def _vae(args: argparse.Namespace, data):
    """The CLI's model, guide and loss, from the seed."""
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    return build(parse_args(args.vae), data.train)


def train_fit(args, data, *, checkpoints: bool, directory: Path):
    model, guide, loss = _vae(args, data)
    began = time.perf_counter()
    history = fit(
        model,
        guide,
        loss,
        data.train,
        validation=Validation(data.valid, batch_size=VALID_BATCH_SIZE),
        epochs=args.epochs,
        batch_size=100,
        optimizer=Adam(adam_options(1e-3)),
        checkpoint=Checkpoint(directory / "checkpoint.pt", resume=False) if checkpoints else None,
        seed=args.seed,
        progress=False,
    )
    return history, time.perf_counter() - began


def train_lightning(args, data, *, checkpoints: bool, directory: Path, devices: int = 1):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from pyro_amortized.lightning import PyroLightningModule

    with pyro.settings.context(module_local_params=True):
        model, guide, loss = _vae(args, data)
        began = time.perf_counter()
        module = PyroLightningModule(
            model,
            guide,
            loss,
            data.train,
            batch_size=100,
            validation=Validation(data.valid, batch_size=VALID_BATCH_SIZE),
            optimizer=lambda params: torch.optim.Adam(params, **adam_options(1e-3)),
            seed=args.seed,
        )
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            logger=CSVLogger(directory) if checkpoints else False,
            callbacks=[ModelCheckpoint(directory / "checkpoints", save_last=True)]
            if checkpoints
            else None,
            enable_checkpointing=checkpoints,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=10,
        )
        trainer.fit(module)
    return module.history, time.perf_counter() - began, trainer.is_global_zero


def _summary(history, wall: float) -> dict:
    return {
        "epoch_time": statistics.median(history.epoch_time[1:] or history.epoch_time),
        "wall_per_epoch": wall / history.epochs,
        "valid_bound": history.valid_bound[-1],
    }


def overhead(args, data) -> dict:
    rounds = []
    for r in range(-1, args.rounds):  # round -1 warms up (first calls are slow), unrecorded
        order = CONTESTANTS if r % 2 == 0 else CONTESTANTS[::-1]
        results = {}
        for name in order:
            with tempfile.TemporaryDirectory() as directory:
                checkpoints = "+checkpoints" in name
                if name.startswith("fit"):
                    history, wall = train_fit(
                        args, data, checkpoints=checkpoints, directory=Path(directory)
                    )
                else:
                    history, wall, _ = train_lightning(
                        args, data, checkpoints=checkpoints, directory=Path(directory)
                    )
            results[name] = _summary(history, wall)
            print(f"round {r}: {name}: {results[name]}", file=sys.stderr)
        if r >= 0:
            rounds.append(results)
    return {"rounds": rounds}


def processes(args) -> dict:
    names = list(PROCESSES)
    rounds = []
    for r in range(args.rounds):
        results = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            devices, threads = PROCESSES[name]
            command = [sys.executable, __file__, *_own_argv(args), "--worker", str(devices)]
            environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
            done = subprocess.run(
                command, capture_output=True, text=True, env=environment, cwd=ROOT, check=False
            )
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"round {r}: {name}: {results[name]}", file=sys.stderr)
        rounds.append(results)
    return {"rounds": rounds}


def worker(args, data) -> None:
    """One Lightning run on ``args.worker`` processes; rank 0 prints its summary as JSON."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as directory:
        history, wall, rank_zero = train_lightning(
            args, data, checkpoints=False, directory=Path(directory), devices=args.worker
        )
    if rank_zero:
        print(json.dumps(_summary(history, wall) | {"threads": torch.get_num_threads()}))


def _own_argv(args) -> list[str]:
    argv = ["--dataset", args.dataset, "--epochs", str(args.epochs), "--seed", str(args.seed)]
    return argv + (["--root", args.root] if args.root else [])


def _median(rounds: list[dict], name: str, key: str, over: str | None = None) -> float:
    return statistics.median(r[name][key] / (r[over][key] if over else 1.0) for r in rounds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--root", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of part 1")
    parser.add_argument("--skip-processes", action="store_true")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.vae = ["--dataset", args.dataset, "--seed", str(args.seed)]
    pyro.enable_validation(False)
    data = load_dataset(args.dataset, root=args.root)
    if args.worker:
        worker(args, data)
        return
    torch.set_num_threads(args.threads)
    report = {"dataset": args.dataset, "epochs": args.epochs, "threads": args.threads}
    report["overhead"] = overhead(args, data)
    rounds = report["overhead"]["rounds"]
    print(f"\n{args.dataset}, {args.epochs} epochs, {args.rounds} rounds, {args.threads} thread(s)")
    print("| | median epoch | Lightning / fit | wall per epoch | Lightning / fit |")
    print("|---|---|---|---|---|")
    for name, reference in (
        ("fit", None),
        ("lightning", "fit"),
        ("fit+checkpoints", None),
        ("lightning+checkpoints+logger", "fit+checkpoints"),
    ):
        epoch, wall = _median(rounds, name, "epoch_time"), _median(rounds, name, "wall_per_epoch")
        ratios = ("", "")
        if reference:
            ratios = (
                f"{_median(rounds, name, 'epoch_time', reference):.3f}x",
                f"{_median(rounds, name, 'wall_per_epoch', reference):.3f}x",
            )
        print(f"| {name} | {epoch:.3f} s | {ratios[0]} | {wall:.3f} s | {ratios[1]} |")
    if not args.skip_processes:
        report["processes"] = processes(args)
        rounds = report["processes"]["rounds"]
        print("\n| Lightning on | median epoch | vs 1 process, 1 thread | final valid bound |")
        print("|---|---|---|---|")
        for name in PROCESSES:
            epoch = _median(rounds, name, "epoch_time")
            ratio = _median(rounds, name, "epoch_time", "1 process, 1 thread")
            bound = _median(rounds, name, "valid_bound")
            print(f"| {name} | {epoch:.3f} s | {ratio:.3f}x | {bound:.2f} |")
    out = ROOT / "runs" / "benchmarks" / f"scale_out_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
