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

from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import pyro
import torch
from pyro.infer import ELBO
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from .diagnostics import log_marginal_likelihood
from .training import Schedule

__all__ = ["PyroLightningModule"]


class PyroLightningModule(pl.LightningModule):
    r"""A ``LightningModule`` that trains a Pyro model and guide on minibatches of rows.

    The model convention is :func:`~pyro_amortized.fit`'s: ``model(data, idx)`` with
    ``idx`` the minibatch's row indices, taken by the data plate as ``subsample=idx``.
    The constructor calls the loss once on the first ``batch_size`` rows, so an autoguide's
    lazily built encoder exists before ``configure_optimizers`` (and before DDP wraps the
    module and broadcasts rank 0's parameters).

    Each training step calls ``schedule(epoch, step, loss)`` (e.g. to anneal
    ``loss.entropy_weight``) and minimizes ``loss(model, guide)(data, idx)``. It logs
    ``"bound"``, the negative loss per datapoint (per step and per epoch), and with
    ``valid`` the ``"valid_bound"`` per datapoint after every epoch, averaged over the
    validation chunks with weights chunk size / ``len(valid)`` and over the workers; with
    ``log_marginal_every = k`` also ``"valid_log_px"``, the mean
    :func:`~pyro_amortized.diagnostics.log_marginal_likelihood` of the first
    ``log_marginal_rows`` validation rows, every k-th epoch.

    Arguments:
        model: A Pyro model following the convention above, an ``nn.Module``.
        guide: Its guide, an ``nn.Module`` (e.g. ``AutoAmortizedNormal``).
        loss: The objective, a :class:`pyro.infer.ELBO` such as
            :class:`~pyro_amortized.Trace_IWELBO`.
        train: Training data, one row per datapoint. It stays out of checkpoints.
        batch_size: Rows per step on each worker.
        valid: Validation data with the same row shape, or ``None``.
        valid_batch_size: Rows per validation chunk; defaults to ``batch_size``.
        valid_loss: Objective of the validation bound; defaults to ``loss``.
        optimizer: ``optimizer(parameters) -> torch.optim.Optimizer``; defaults to Adam
            with learning rate ``lr``.
        lr: Adam's learning rate when ``optimizer`` is ``None``.
        schedule: Called as ``schedule(epoch, step, loss)`` before every training step.
        log_marginal_every: Every how many epochs to log ``"valid_log_px"``; 0 never.
        log_marginal_samples: Importance samples per datapoint for it.
        log_marginal_rows: Validation rows it uses.
        seed: Seed of the shuffling (the ``DistributedSampler``'s seed under DDP).

    Raises:
        ValueError: ``module_local_params`` is off, ``model`` or ``guide`` is not an
            ``nn.Module``, or an argument is out of range.

    References:
        Pyro's example ``svi_lightning.py``, which this generalizes to minibatch indices,
        validation and schedules.
    """

    def __init__(
        self,
        model: nn.Module,
        guide: nn.Module,
        loss: ELBO,
        train: Tensor,
        *,
        batch_size: int,
        valid: Tensor | None = None,
        valid_batch_size: int | None = None,
        valid_loss: ELBO | None = None,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        lr: float = 1e-3,
        schedule: Schedule | None = None,
        log_marginal_every: int = 0,
        log_marginal_samples: int = 100,
        log_marginal_rows: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
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
        for name, value in (("batch_size", batch_size), ("valid_batch_size", valid_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"PyroLightningModule: {name} must be an int >= 1, got {value!r}")
        if valid is not None and valid.shape[1:] != train.shape[1:]:
            raise ValueError(
                f"PyroLightningModule: valid rows have shape {tuple(valid.shape[1:])}, train "
                f"rows {tuple(train.shape[1:])}"
            )
        if log_marginal_every < 0 or (log_marginal_every and valid is None):
            raise ValueError(
                "PyroLightningModule: log_marginal_every must be >= 0, and > 0 only with valid "
                f"data; got {log_marginal_every}"
            )
        self.model, self.guide, self.loss = model, guide, loss
        self.valid_loss = valid_loss or loss
        self.elbo = loss(model, guide)
        self.valid_elbo = self.valid_loss(model, guide)
        # plain attributes, not buffers: the data stays out of state_dict and checkpoints
        self.train_data, self.valid_data = train, valid
        self.batch_size = batch_size
        self.valid_batch_size = valid_batch_size or batch_size
        self.make_optimizer = optimizer or (lambda params: torch.optim.Adam(params, lr=lr))
        self.schedule = schedule
        self.log_marginal_every = log_marginal_every
        self.log_marginal_samples = log_marginal_samples
        self.log_marginal_rows = log_marginal_rows
        self.seed = seed
        with torch.no_grad():
            self.elbo(train, torch.arange(min(batch_size, len(train))))

    # ------------------------------------------------------------- data
    def _loader(self, rows: int, batch_size: int, *, shuffle: bool) -> DataLoader:
        indices = TensorDataset(torch.arange(rows))
        trainer = self._trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        # a DistributedSampler even in one process: its order depends on (seed, epoch) only,
        # so a resumed run draws the same minibatches; drop_last (when shuffling) leaves out
        # the padding by which two workers would draw the same datapoint
        sampler = DistributedSampler(
            indices,
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=self.seed,
            drop_last=shuffle and world_size > 1,
        )
        return DataLoader(indices, batch_size=batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(len(self.train_data), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.valid_data is None:
            return []
        return self._loader(len(self.valid_data), self.valid_batch_size, shuffle=False)

    def setup(self, stage: str) -> None:
        # the data follows the module to its device (a GPU per worker under DDP)
        self.train_data = self.train_data.to(self.device)
        if self.valid_data is not None:
            self.valid_data = self.valid_data.to(self.device)

    # ------------------------------------------------------------- steps
    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        (idx,) = batch
        if self.schedule is not None:
            self.schedule(self.current_epoch, self.global_step, self.loss)
        loss = self.elbo(self.train_data, idx)
        self.log(
            "bound",
            -loss.detach() / len(self.train_data),
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(idx),
            sync_dist=True,
        )
        return loss

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        (idx,) = batch
        # each chunk's loss is already scaled up to the whole set (N / B)
        loss = self.valid_elbo(self.valid_data, idx)
        self.log(
            "valid_bound",
            -loss / len(self.valid_data),
            on_epoch=True,
            prog_bar=True,
            batch_size=len(idx),
            sync_dist=True,
        )

    def on_validation_epoch_end(self) -> None:
        every = self.log_marginal_every
        if not every or self.trainer.sanity_checking or (self.current_epoch + 1) % every:
            return
        rows = self.valid_data[: self.log_marginal_rows]
        with torch.no_grad():
            log_px = log_marginal_likelihood(
                self.model,
                self.guide,
                rows,
                num_samples=self.log_marginal_samples,
                chunk_size=min(self.log_marginal_samples, 100),
                progress=False,
            )
        self.log("valid_log_px", log_px.mean(), sync_dist=True)

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning keeps no RNG state; every worker's torch RNG (Pyro's draws) is saved so
        # a resumed run continues as the uninterrupted one would have
        state = torch.get_rng_state()
        states = self.all_gather(state) if self.trainer.world_size > 1 else state[None]
        checkpoint["torch_rng_states"] = states.cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("torch_rng_states")
        world_size = self._trainer.world_size if self._trainer else 1
        if states is not None and len(states) == world_size:
            rank = self._trainer.global_rank if self._trainer else 0
            torch.set_rng_state(states[rank].to(torch.uint8))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.elbo.parameters())
