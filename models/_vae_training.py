"""How the VAE's CLI trains: annealing ramps, Adam's options, PyTorch Lightning's ``Trainer``."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pyro
import torch

from models.datasets import Dataset, binarize
from pyro_amortized import AutoAmortizedNormal, History, LinearSchedule, Trace_IWELBO, Validation

if TYPE_CHECKING:
    from models.vae import VAE

__all__ = [
    "VALID_BATCH_SIZE",
    "adam_options",
    "annealing",
    "rank_zero_print",
    "train_lightning",
]

# Rows per validation chunk: few chunks, so little per-call overhead, and K x 1000 x D
# floats of memory.
VALID_BATCH_SIZE = 1000


def annealing(
    args: argparse.Namespace, steps_per_epoch: int
) -> tuple[Callable | None, Trace_IWELBO | None]:
    """The schedule of ``--anneal-entropy`` and ``--warmup`` (ramps given in epochs, applied
    per step), and the unannealed validation objective it needs; ``(None, None)`` without."""
    ramps = [
        LinearSchedule(0.0, 1.0, epochs * steps_per_epoch, attribute=attribute)
        for attribute, epochs in (
            ("entropy_weight", args.anneal_entropy),
            ("kl_weight", args.warmup),
        )
        if epochs > 0
    ]
    if not ramps:
        return None, None
    # the validation bound, and early stopping, stay on the unannealed bound
    return _Ramps(ramps), Trace_IWELBO(args.num_particles, estimator=args.estimator)


class _Ramps:
    """Schedules applied in turn before every step."""

    def __init__(self, ramps: list[LinearSchedule]):
        self.ramps = ramps

    def __call__(self, epoch: int, step: int, objective: Trace_IWELBO) -> None:
        for ramp in self.ramps:
            ramp(epoch, step, objective)


def adam_options(lr: float) -> dict:
    """Adam's options: torch's fused kernel where it runs on the CPU (torch >= 2.4).

    The fused kernel updates each tensor in one pass instead of a dozen elementwise ops;
    on the MNIST VAE that is 0.5 ms of a 7-8 ms step on 2 cores. The update is Adam's
    all the same, up to float rounding.
    """
    return {"lr": lr, "fused": True} if torch.__version__ >= "2.4" else {"lr": lr}


def rank_zero_print() -> Callable[..., None]:
    """``print`` on rank 0 alone: Lightning's DDP workers run the CLI too, and know their
    rank from the environment."""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only(print)


def train_lightning(
    args: argparse.Namespace,
    model: VAE,
    guide: AutoAmortizedNormal,
    loss: Trace_IWELBO,
    data: Dataset,
    out: Path,
) -> tuple[History, bool]:
    """Trains with PyTorch Lightning's ``Trainer`` (:class:`PyroLightningModule`) on
    ``args.devices`` processes or GPUs; returns the history and whether this is rank 0.

    Lightning writes ``out/checkpoints/last.ckpt`` after every epoch and
    ``out/checkpoints/best.ckpt`` at the best validation bound, and logs to
    ``out/lightning/version_V/metrics.csv`` (V counts the runs). Given an ``out`` that
    holds a ``last.ckpt`` it resumes from it, as :func:`train` does from its checkpoint.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from pyro_amortized.lightning import PyroLightningModule, steps_per_epoch

    # ramps and log intervals in steps: a worker takes 1/devices of the epoch's steps
    steps = steps_per_epoch(len(data.train), args.batch_size, args.devices)
    schedule, valid_loss = annealing(args, steps)
    checkpoints = out / "checkpoints"
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(checkpoints, "best", monitor="valid_bound", mode="max", save_last=True)
    ]
    if args.patience:
        callbacks.append(EarlyStopping("valid_bound", mode="max", patience=args.patience))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        callbacks=callbacks,
        logger=CSVLogger(out, name="lightning"),
        enable_progress_bar=not args.no_progress,
        enable_model_summary=False,
        log_every_n_steps=min(50, steps),
    )
    module = PyroLightningModule(
        model,
        guide,
        loss,
        data.train,
        batch_size=args.batch_size,
        validation=Validation(data.valid, batch_size=VALID_BATCH_SIZE, loss=valid_loss),
        optimizer=functools.partial(torch.optim.Adam, **adam_options(args.lr)),
        schedule=schedule,
        seed=args.seed,
        resample=binarize if data.dynamic_binarization else None,
    )
    last = checkpoints / "last.ckpt"
    with pyro.validation_enabled(args.validate):
        trainer.fit(module, ckpt_path=last if last.exists() else None)
    # the evaluation runs on rank 0 alone, on the CPU, where the data is
    module.cpu()
    return module.history, trainer.is_global_zero
