r"""Training on PyTorch Lightning, for models that outgrow one process.

:class:`PyroLightningModule` wraps the same ``(model, guide, loss)`` that
:func:`~pyro_amortized.fit` trains, so Lightning's ``Trainer`` runs it on any number of
processes or GPUs (DDP), with its own checkpointing and loggers. Nothing here is
distributed code: minibatches are index batches from a ``DataLoader`` (a
``DistributedSampler`` under DDP, so no two workers draw the same datapoints), the
model's data plate takes them as ``subsample=idx`` so every worker's loss is scaled by
N / B and estimates the whole data set's, and DDP averages the workers' gradients.

Needs the ``lightning`` package (``pip install "pyro-amortized[lightning]"``) and
``pyro.settings.set(module_local_params=True)`` before the model and guide are built, so
their parameters live in the modules, where the optimizer, DDP and checkpoints see them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pyro
import torch
from pyro.infer import ELBO
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .checks import check_count, check_counts, check_rate
from .diagnostics import log_marginal_likelihood
from .training import History, Schedule, Validation, validation_option

__all__ = ["PyroLightningModule", "steps_per_epoch"]


class PyroLightningModule(pl.LightningModule):
    r"""A ``LightningModule`` that trains a Pyro model and guide on minibatches of rows.

    The model convention is :func:`~pyro_amortized.fit`'s: ``model(data, idx)`` with
    ``idx`` the minibatch's row indices, taken by the data plate as ``subsample=idx``.
    The constructor calls the loss once on the first ``batch_size`` rows, so an autoguide's
    lazily built encoder exists before ``configure_optimizers`` (and before DDP wraps the
    module and broadcasts rank 0's parameters).

    **Training.** Minibatches come from a ``DistributedSampler`` seeded with ``seed``
    (under DDP it gives each of the W workers its own ``N // W`` rows per epoch, none
    drawn twice). Each step calls ``schedule(epoch, step, loss)`` (``step`` is the global
    step, e.g. to anneal ``loss.entropy_weight``) and minimizes ``loss(model,
    guide)(data, idx)``, which estimates the loss of the whole training set; DDP
    averages the workers' gradients. Under DDP, workers other than rank 0 reseed torch's
    RNG with ``torch.initial_seed() + rank`` in ``setup``, so their Monte Carlo
    draws are independent.

    **Validation** is :func:`~pyro_amortized.fit`'s (:meth:`Validation.bound
    <pyro_amortized.Validation.bound>`): every validation row once (worker r takes rows r,
    r + W, ...), in chunks of ``validation.batch_size`` rows with the model and guide in
    ``.eval()`` mode and gradients off (but out of ``torch.inference_mode``, so a
    :class:`~pyro_amortized.SemiAmortizedGuide` can refine), chunk losses weighted by chunk
    size / ``len(validation.data)`` and summed over the workers. Lightning's sanity check
    leaves torch's RNG as it found it. Early stopping is Lightning's ``EarlyStopping``
    callback on ``"valid_bound"`` (``mode="max"``), not ``validation.patience``.

    **Logged** (to Lightning's loggers and progress bar): ``"bound"``, the negative loss
    per datapoint of the step on this worker, at every ``log_every_n_steps``-th step (the
    ``Trainer``'s; the steps its loggers write); ``"train_bound"``, the epoch's mean over
    all workers' steps; ``"valid_bound"``; and with ``log_marginal_every = k``, every k-th
    epoch, ``"valid_log_px"``, the mean
    :func:`~pyro_amortized.diagnostics.log_marginal_likelihood` of the first
    ``log_marginal_rows`` validation rows. :attr:`history` holds the same figures as the
    :class:`~pyro_amortized.History` that ``fit`` returns.

    Strategies that pickle the module (``ddp_spawn``) train as well, but Pyro's autoguides
    drop their reference to the model when pickled, on the original object too, so
    ``guide.model`` is gone afterwards in the launching process; ``ddp`` (which runs the
    script once per worker) and ``ddp_notebook`` (fork) pickle nothing.

    **Checkpoints** are Lightning's (``ModelCheckpoint``, ``trainer.fit(ckpt_path=...)``)
    and also hold :attr:`history` and every worker's torch RNG state (and CUDA's), so a
    resumed run continues exactly as the uninterrupted one, given the same arguments and
    number of workers. The data is kept out of them.

    Arguments:
        model: A Pyro model following the convention above, an ``nn.Module``.
        guide: Its guide, an ``nn.Module`` (e.g. ``AutoAmortizedNormal``).
        loss: The objective, a :class:`pyro.infer.ELBO` such as
            :class:`~pyro_amortized.Trace_IWELBO`.
        train: Training data, one row per datapoint.
        batch_size: Rows per step on each worker.
        validation: The validation data, its chunk size (defaults to ``batch_size``) and
            its objective (defaults to ``loss``; pass an unannealed one when ``schedule``
            anneals ``loss``), as for :func:`~pyro_amortized.fit`, without a patience;
            or ``None``.
        optimizer: ``optimizer(parameters) -> torch.optim.Optimizer``; defaults to Adam
            with learning rate ``lr``.
        lr: Adam's learning rate when ``optimizer`` is ``None``.
        schedule: Called as ``schedule(epoch, step, loss)`` before every training step.
        log_marginal_every: Every how many epochs to log ``"valid_log_px"``; 0 never.
        log_marginal_samples: Importance samples per datapoint for it.
        log_marginal_rows: Validation rows it uses.
        seed: Seed of the shuffling.
        resample: ``resample(train, generator)`` gives the data each epoch trains on, as
            in ``fit`` (e.g. dynamic binarization); the generator is seeded by ``seed`` and
            the epoch, so every worker, and a resumed run, draws the same data.
        **deprecated: The flat keywords of the previous release, still accepted for this
            one with a ``FutureWarning``: ``valid``, ``valid_batch_size`` and ``valid_loss``
            (now ``validation=Validation(valid, batch_size=..., loss=...)``).

    Attributes:
        history: The run's :class:`~pyro_amortized.History`, resumed epochs included.

    Raises:
        ValueError: ``module_local_params`` is off, ``model`` or ``guide`` is not an
            ``nn.Module``, an argument is out of range, or the validation options are given
            both as ``validation=`` and in the deprecated spelling.

    References:
        Pyro's example ``svi_lightning.py``, which this generalizes to minibatch indices,
        validation, schedules and exact resumption.
    """

    def __init__(
        self,
        model: nn.Module,
        guide: nn.Module,
        loss: ELBO,
        train: Tensor,
        *,
        batch_size: int,
        validation: Validation | None = None,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        lr: float = 1e-3,
        schedule: Schedule | None = None,
        log_marginal_every: int = 0,
        log_marginal_samples: int = 100,
        log_marginal_rows: int = 1000,
        seed: int = 0,
        resample: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        **deprecated: Any,
    ):
        super().__init__()
        owner = "PyroLightningModule"
        if not pyro.settings.get("module_local_params"):
            raise ValueError(
                "PyroLightningModule needs pyro.settings.set(module_local_params=True) before "
                "the model and guide are built: their parameters must live in the modules, "
                "where Lightning's optimizer, DDP and checkpoints see them"
            )
        if not isinstance(model, nn.Module) or not isinstance(guide, nn.Module):
            raise ValueError(
                "PyroLightningModule needs the model and guide as nn.Modules (a PyroModule "
                f"model, an autoguide), got {type(model).__name__} and {type(guide).__name__}"
            )
        if not isinstance(train, Tensor) or train.dim() == 0 or len(train) < 1:
            raise ValueError("PyroLightningModule: train must be a tensor with one row or more")
        check_counts(
            owner,
            batch_size=batch_size,
            log_marginal_samples=log_marginal_samples,
            log_marginal_rows=log_marginal_rows,
        )
        validation = validation_option(owner, validation, deprecated, train)
        if validation is not None and validation.patience is not None:
            raise ValueError(
                f"{owner}: early stopping is Lightning's here: leave out the Validation's "
                "patience and give the Trainer callbacks=[EarlyStopping('valid_bound', "
                f"mode='max', patience={validation.patience})]"
            )
        check_rate(owner, "lr", lr)
        check_count(owner, "log_marginal_every", log_marginal_every, minimum=0)
        if log_marginal_every and validation is None:
            raise ValueError(
                f"{owner}: log_marginal_every must be >= 0, and > 0 only with validation data "
                f"(validation=Validation(...)); got {log_marginal_every}"
            )
        self.model, self.guide, self.loss = model, guide, loss
        self.valid_loss = loss if validation is None or validation.loss is None else validation.loss
        self.elbo = loss(model, guide)
        self.valid_elbo = self.valid_loss(model, guide)
        # plain attributes, not buffers: the data stays out of state_dict and checkpoints
        self.train_data = train
        self.valid_data = None if validation is None else validation.data
        self.batch_size = batch_size
        self.valid_batch_size = batch_size
        if validation is not None and validation.batch_size is not None:
            self.valid_batch_size = validation.batch_size
        self.make_optimizer, self.lr = optimizer, lr
        self.schedule = schedule
        self.log_marginal_every = log_marginal_every
        self.log_marginal_samples = log_marginal_samples
        self.log_marginal_rows = log_marginal_rows
        self.seed = seed
        self.resample = resample
        self.history = History()
        self._epoch: _Epoch | None = None
        with torch.no_grad():
            generator = torch.Generator(train.device).manual_seed(seed)
            warm = train if resample is None else resample(train, generator)
            rows = torch.arange(min(batch_size, len(train)), device=train.device)
            self.elbo(warm, _subsample(rows, len(train)))

    # ------------------------------------------------------------- data
    def _world(self) -> tuple[int, int]:
        trainer = self._trainer
        return (trainer.world_size, trainer.global_rank) if trainer else (1, 0)

    def train_dataloader(self) -> DataLoader:
        world_size, rank = self._world()
        indices = _Rows(len(self.train_data))
        # a DistributedSampler even in one process: its order depends on (seed, epoch) only,
        # so a resumed run draws the same minibatches; drop_last leaves out the padding by
        # which two workers would draw the same datapoint
        sampler = DistributedSampler(
            indices, world_size, rank, shuffle=True, seed=self.seed, drop_last=world_size > 1
        )
        return _loader(indices, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.valid_data is None:
            return []
        world_size, rank = self._world()
        indices = _Rows(len(self.valid_data))
        return _loader(indices, self.valid_batch_size, _EveryRowOnce(indices, world_size, rank))

    def setup(self, stage: str) -> None:
        # the data follows the module to its device (a GPU per worker under DDP)
        self.train_data = self.train_data.to(self.device)
        if self.valid_data is not None:
            self.valid_data = self.valid_data.to(self.device)
        world_size, rank = self._world()
        if rank > 0:
            # the workers were seeded alike (and built alike: DDP also broadcasts rank 0's
            # parameters); their Monte Carlo draws must be independent all the same
            torch.manual_seed((torch.initial_seed() + rank) % 2**64)

    # ------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        self._epoch = _Epoch(time.perf_counter())
        if self.resample is not None:
            # seeded by (seed, epoch): every worker, and a resumed run, draws the same data
            generator = torch.Generator(self.device)
            generator.manual_seed(self.seed * 1_000_003 + self.current_epoch)
            self._train_epoch_data = self.resample(self.train_data, generator)
        else:
            self._train_epoch_data = self.train_data

    def training_step(self, idx: Tensor, batch_idx: int) -> Tensor:
        if self.schedule is not None:
            self.schedule(self.current_epoch, self.global_step, self.loss)
        loss = self.elbo(self._train_epoch_data, _subsample(idx, len(self.train_data)))
        value = loss.detach() / len(self.train_data)
        self._epoch.step_losses.append(value)
        self._epoch.rows.append(len(idx))
        # at the steps Lightning writes to its loggers: a self.log costs about a millisecond
        # (a tenth of a small VAE's step), and the progress bar shows the last value anyway
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("bound", -value, prog_bar=True, batch_size=len(idx))
        return loss

    def on_train_epoch_end(self) -> None:
        if self._epoch is not None:  # no validation at this epoch's end
            self._end_epoch(None)

    def _end_epoch(self, valid_bound: float | None) -> None:
        """Appends the epoch to :attr:`history`, with the workers' values averaged."""
        epoch, self._epoch = self._epoch, None
        history = self.history
        train_loss = math.nan
        if epoch.step_losses:
            # one collective per epoch: the workers took the same number of steps
            losses = self._reduce(torch.stack(epoch.step_losses), "mean").tolist()
            rows = epoch.rows
            history.step_losses.extend(losses)
            train_loss = sum(v * r for v, r in zip(losses, rows, strict=True)) / sum(rows)
        history.add_epoch(train_loss, valid_bound, time.perf_counter() - epoch.began)
        history.steps = self.global_step
        self.log("train_bound", -history.train_loss[-1], sync_dist=True)

    def _reduce(self, value: Tensor, op: str) -> Tensor:
        return self.trainer.strategy.reduce(value, reduce_op=op) if self._trainer else value

    # ------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._valid_total = torch.zeros((), device=self.device)
        if self.trainer.sanity_checking:
            # Lightning's sanity check draws nothing in an uninterrupted run's later epochs,
            # so it must not move the RNG (a resumed run checks again)
            self._sanity_rng = _rng_state(self.device)

    def validation_step(self, idx: Tensor, batch_idx: int) -> None:
        # Lightning validates under torch.inference_mode, in which no gradient can be taken,
        # and a SemiAmortizedGuide's refinement needs some: no_grad instead, as fit does
        with torch.inference_mode(False), torch.no_grad():
            # each chunk's loss is scaled up to the whole set (N / B); weighted by B / N
            loss = self.valid_elbo(self.valid_data, _subsample(idx.clone(), len(self.valid_data)))
        self._valid_total -= loss * len(idx) / len(self.valid_data) ** 2

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            _set_rng_state(self._sanity_rng, self.device)
            return
        bound = self._reduce(self._valid_total, "sum")
        self.log("valid_bound", bound, prog_bar=True, sync_dist=True)
        every = self.log_marginal_every
        if every and (self.current_epoch + 1) % every == 0:
            self.log("valid_log_px", self._mean_log_marginal(), sync_dist=True)
        if self.trainer.state.fn == "fit" and self._epoch is not None:
            if self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                self._end_epoch(bound.item())

    def _mean_log_marginal(self) -> Tensor:
        world_size, rank = self._world()
        rows = self.valid_data[: self.log_marginal_rows]
        mine = rows[rank::world_size]
        if not len(mine):  # fewer rows than workers
            return self._reduce(torch.zeros((), device=self.device), "sum") / len(rows)
        with torch.inference_mode(False), torch.no_grad():
            total = log_marginal_likelihood(
                self.model,
                self.guide,
                mine.clone(),
                num_samples=self.log_marginal_samples,
                chunk_size=min(self.log_marginal_samples, 100),
                progress=False,
            ).sum()
        return self._reduce(total, "sum") / len(rows)

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning keeps no RNG state; every worker's (Pyro's draws) is saved so a resumed
        # run continues as the uninterrupted one would have
        state = {k: _gather(v.to(self.device)).cpu() for k, v in _rng_state(self.device).items()}
        checkpoint["rng_states"] = state
        checkpoint["history"] = self.history.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        world_size, rank = self._world()
        if states is not None and len(states["cpu"]) == world_size:
            _set_rng_state({k: v[rank] for k, v in states.items()}, self.device)
        if "history" in checkpoint:
            self.history = History.from_dict(checkpoint["history"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.make_optimizer is None:  # a method, not a lambda: ddp_spawn pickles the module
            return torch.optim.Adam(self.elbo.parameters(), lr=self.lr)
        return self.make_optimizer(self.elbo.parameters())


@dataclass
class _Epoch:
    """The running record of a training epoch on this worker."""

    began: float
    step_losses: list[Tensor] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


def steps_per_epoch(num_data: int, batch_size: int, world_size: int = 1) -> int:
    """Training steps per epoch of :class:`PyroLightningModule` on each of ``world_size``
    workers, e.g. to size an annealing schedule given in epochs.

    Arguments:
        num_data: Rows of the training data.
        batch_size: Rows per step on each worker.
        world_size: Number of workers (``trainer.world_size``).
    """
    rows = num_data // world_size if world_size > 1 else num_data  # the sampler's drop_last
    return math.ceil(rows / batch_size)


class _EveryRowOnce(DistributedSampler):
    """Worker r's rows r, r + W, r + 2W, ... in order: every row once, none padded in.

    A ``DistributedSampler``, so Lightning does not shard it a second time.
    """

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def _gather(value: Tensor) -> Tensor:
    """``value`` of every worker, stacked in rank order."""
    if not torch.distributed.is_initialized():
        return value[None]
    values = [torch.empty_like(value) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(values, value)
    return torch.stack(values)


def _subsample(idx: Tensor, rows: int) -> Tensor | None:
    # all rows: no subsampling (as fit does), which an amortized guide could not tell from
    # a context holding only the minibatch's rows
    return None if len(idx) == rows else idx


class _Rows(Dataset):
    """Row indices ``0 .. n - 1``; a minibatch is fetched as one ``LongTensor``.

    (A ``TensorDataset`` would fetch each index as a tensor and stack them again: a
    millisecond a step on 2 cores, a tenth of a small VAE's step.)
    """

    def __init__(self, rows: int):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> int:
        return index

    def __getitems__(self, indices: list[int]) -> Tensor:
        return torch.tensor(indices)


def _as_is(batch: Tensor) -> Tensor:
    return batch


def _loader(indices: _Rows, batch_size: int, sampler: DistributedSampler) -> DataLoader:
    # a generator of its own: a DataLoader otherwise draws its workers' base seed from
    # torch's global RNG, which Pyro's draws (and a resumed run's) depend on
    return DataLoader(
        indices, batch_size, sampler=sampler, collate_fn=_as_is, generator=torch.Generator()
    )


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].to(torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8), device)
