"""fit(): minibatch SVI with progress bar, validation, early stopping and resumable checkpoints.

The options that travel together are values: :class:`Validation` (the validation data, its
chunk size, its objective and the early-stopping patience) and :class:`Checkpoint` (the
file and whether to resume from it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, SVI
from pyro.optim import PyroOptim
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn
from tqdm import tqdm

from .checks import check_bool, check_count, check_counts, check_device
from .optim import JointOptim

__all__ = ["Checkpoint", "History", "Validation", "fit"]

CHECKPOINT_FORMAT = 1

Schedule = Callable[[int, int, ELBO], None]


@dataclass
class History:
    """What :func:`fit` recorded, one entry per epoch unless said otherwise.

    Epochs and steps are counted from 0, so ``valid_bound[best_epoch]`` is the best bound.

    Attributes:
        train_loss: Mean training loss per datapoint of each epoch (nats; the negative
            bound of the training objective), each step's loss weighted by its batch size.
        valid_bound: Validation bound per datapoint after each epoch (nats; higher is
            better), ``None`` for epochs run without a validation set.
        epoch_time: Seconds each epoch took (training and validation, not the checkpoint).
        step_losses: Loss per datapoint of every step, in order.
        best_epoch: Epoch of the highest validation bound, ``None`` without validation.
        steps: Number of optimization steps taken so far.
        stopped_early: Whether training stopped because the validation bound had not
            improved for ``patience`` epochs.
    """

    train_loss: list[float] = field(default_factory=list)
    valid_bound: list[float | None] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    steps: int = 0
    stopped_early: bool = False

    @property
    def epochs(self) -> int:
        """Number of completed epochs."""
        return len(self.train_loss)

    def add_epoch(self, train_loss: float, valid_bound: float | None, seconds: float) -> None:
        """Records a completed epoch, and makes it ``best_epoch`` if its bound is the highest."""
        self.train_loss.append(train_loss)
        self.valid_bound.append(valid_bound)
        self.epoch_time.append(seconds)
        if valid_bound is not None and (
            self.best_epoch is None or valid_bound > self.valid_bound[self.best_epoch]
        ):
            self.best_epoch = self.epochs - 1

    def to_dict(self) -> dict[str, Any]:
        """The history as a dict of plain Python values (lists, floats, ints, None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> History:
        """The inverse of :meth:`to_dict`."""
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True, eq=False)
class Validation:
    r"""Validation for :func:`fit`: the data whose bound is computed after every epoch, and
    early stopping on it.

    The bound is the one of :meth:`bound`: per datapoint, the model and guide in evaluation
    mode, in chunks of ``batch_size`` rows.

    Arguments:
        data: Validation data, a tensor with one row per datapoint, its rows shaped as the
            training rows.
        batch_size: Rows per validation chunk; ``None`` takes :func:`fit`'s
            ``batch_size`` (and in :meth:`bound`, all rows in one call).
        loss: Objective of the bound; ``None`` takes :func:`fit`'s ``loss``. Pass an
            unannealed one (e.g. a second ``Trace_IWELBO``) when ``schedule`` anneals the
            training objective, so the validation bound is the bound.
        patience: Stop after this many epochs without a higher validation bound; ``None``
            trains all epochs.

    Raises:
        ValueError: An argument is of the wrong type or out of range.

    Example:
        >>> validation = Validation(torch.zeros(20, 2), batch_size=10, patience=5)
        >>> validation
        Validation(data=<tensor of shape (20, 2)>, batch_size=10, loss=None, patience=5)
    """

    data: Tensor
    _: KW_ONLY
    batch_size: int | None = None
    loss: ELBO | None = None
    patience: int | None = None

    def __post_init__(self) -> None:
        data = self.data
        if not isinstance(data, Tensor) or data.dim() == 0 or data.shape[0] < 1:
            got = f"shape {tuple(data.shape)}" if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(
                f"Validation: data must be a tensor with at least one row (one row per "
                f"datapoint), got {got}"
            )
        check_count("Validation", "batch_size", self.batch_size, optional=True)
        if self.loss is not None and not isinstance(self.loss, ELBO):
            raise ValueError(
                "Validation: loss must be None (fit's loss) or a pyro.infer.ELBO, got "
                f"{type(self.loss).__name__}"
            )
        check_count("Validation", "patience", self.patience, optional=True)

    def __repr__(self) -> str:
        return (
            f"Validation(data=<tensor of shape {tuple(self.data.shape)}>, batch_size="
            f"{self.batch_size}, loss={self.loss!r}, patience={self.patience})"
        )

    def bound(self, model: Callable, guide: Callable) -> float:
        r"""The validation bound per datapoint, as :func:`fit` computes it after every epoch
        (nats; higher is better).

        That is ``-loss.loss(model, guide, data, idx) / len(data)`` under
        ``torch.no_grad()``, with the model and guide in evaluation mode (``.eval()``, when
        they are ``nn.Module``\ s, put back in their mode afterwards: a
        :class:`~pyro_amortized.SemiAmortizedGuide` then refines), in chunks of
        ``batch_size`` rows averaged with weights chunk size / ``len(data)`` (each chunk's
        loss is already scaled up to the whole set). With one chunk of every row ``idx``
        is ``None``.

        Arguments:
            model: The Pyro model, called as ``model(data, idx)``.
            guide: Its guide, called alike.

        Raises:
            ValueError: ``loss`` is ``None`` (:func:`fit` fills in its own objective).
        """
        if self.loss is None:
            raise ValueError(
                "Validation.bound needs an objective: pass Validation(data, loss=...) (fit "
                "fills in its own loss)"
            )
        modules = [m for m in (model, guide) if isinstance(m, nn.Module)]
        modes = [m.training for m in modules]
        for module in modules:
            module.eval()
        try:
            with torch.no_grad():
                return self._chunked_bound(model, guide)
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)

    def _chunked_bound(self, model: Callable, guide: Callable) -> float:
        data, chunk, loss = self.data, self.batch_size, self.loss
        size = data.shape[0]
        if chunk is None or chunk >= size:
            # One call on the whole set: idx=None, so the plate is not subsampled.
            return -loss.loss(model, guide, data, None) / size
        total = 0.0
        for idx in torch.arange(size, device=data.device).split(chunk):
            # Each chunk's loss is scaled by size / len(idx) to the whole set: divided by
            # size it is a per-datapoint loss, and the chunks weigh by their share of rows.
            total += loss.loss(model, guide, data, idx) / size * (len(idx) / size)
        return -total


@dataclass(frozen=True)
class Checkpoint:
    """Checkpointing for :func:`fit`: the file written at the end of every epoch, and
    whether a run resumes from it.

    Arguments:
        path: The checkpoint file, a ``str`` or ``os.PathLike`` (kept as a ``Path``). Its
            directory is created if needed.
        resume: Resume from ``path`` when the file exists; with ``False`` an existing file
            is overwritten at the end of the first epoch.

    Raises:
        ValueError: ``path`` is not a path or ``resume`` not a bool.

    Example:
        >>> Checkpoint("runs/vae.pt", resume=False)
        Checkpoint(path=PosixPath('runs/vae.pt'), resume=False)
    """

    path: str | os.PathLike
    _: KW_ONLY
    resume: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)):
            raise ValueError(
                f"Checkpoint: path must be a str or an os.PathLike (the file to write), got "
                f"{self.path!r}"
            )
        check_bool("Checkpoint", "resume", self.resume)
        object.__setattr__(self, "path", Path(self.path))


def fit(
    model: Callable,
    guide: Callable,
    loss: ELBO,
    train: Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: PyroOptim,
    validation: Validation | None = None,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
    schedule: Schedule | None = None,
    seed: int = 0,
    progress: bool = True,
    resample: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    device: str | torch.device | None = None,
    **deprecated: Any,
) -> History:
    r"""Train ``model`` and ``guide`` by minibatch SVI, with validation and checkpoints.

    **The model convention.** The model (and the guide) is called as
    ``model(train, idx)`` with ``idx`` a ``LongTensor`` of the minibatch's row indices,
    so the model is written as

    .. code-block:: python

        def model(x, idx=None):
            with pyro.plate("data", x.shape[0], subsample=idx) as ind:
                ...
                pyro.sample("x", ..., obs=x[ind])

    :class:`~pyro_amortized.AutoAmortizedNormal` recognizes ``subsample=`` taken from the
    model's arguments by itself and encodes only the minibatch's rows. Pyro scales the
    minibatch's log-densities by ``N / B``, so every step's loss estimates the loss of
    the whole training set; ``History`` reports it divided by ``N``, per datapoint. When
    ``batch_size >= len(train)`` every step is full-batch and ``idx`` is ``None``.

    Epochs and steps are counted from 0 (in ``History``, ``schedule`` and error messages).
    **Each epoch** draws a permutation of the rows from a ``torch.Generator`` seeded with
    ``seed`` (owned by ``fit``, so shuffling does not touch the global RNG; on the data's
    device), calls
    ``schedule(epoch, step, loss)`` before each step (``step`` is the global step count,
    from 0), takes ``svi.step(train, idx)`` on each minibatch (the last one may be smaller),
    then, with a ``validation``, computes its bound per datapoint (:meth:`Validation.bound`:
    the model and guide in evaluation mode, in chunks, under ``torch.no_grad()``). Sampling
    inside Pyro uses torch's global RNG: seed it with ``pyro.set_rng_seed`` before calling
    ``fit``.

    **Checkpoints.** With ``checkpoint=Checkpoint(PATH)`` (or just ``PATH``) a checkpoint is
    written at the end of every epoch, atomically (to ``PATH.tmp``, then renamed), so a
    crash never leaves a broken file. It holds the values of every Pyro parameter the model
    and guide use, the optimizer's state, the model's and guide's ``state_dict()`` (when they
    are ``nn.Module``\ s: buffers are not in Pyro's parameter store), the history, the global
    RNG states (torch, Python, NumPy, CUDA) and the shuffling generator's state. When
    ``PATH`` exists and the checkpoint's ``resume`` is true, ``fit`` first calls the guide
    and the loss once to create the lazily built parameters (an autoguide's encoder), then
    loads the checkpoint into them (in place) with the optimizer's and RNGs' states, and
    goes on with the next epoch: the run continues exactly as it would have without the
    interruption, step losses included, given the same arguments. The optimizer's state held
    before the call is discarded in favor of the checkpoint's. If the checkpoint already
    holds ``epochs`` epochs (or training had stopped early and still would), the state is
    loaded and nothing is trained. The file is read with ``torch.load(weights_only=True)``,
    which runs no code from it. A run resumes on the device type it was written on (the
    shuffling generator's state is the device's).

    **Devices.** As in Pyro, the data's device decides: the guide builds its networks on
    the device (and in the dtype) of the data it is first called with, its plates draw
    their indices there, and the objectives and diagnostics create their tensors there; a
    model that writes ``pyro.plate(..., device=x.device)`` and creates its tensors from
    ``x`` (``x.new_zeros``) runs anywhere. ``device=None`` moves nothing: ``train`` and the
    validation data must then be on one device, with the model's and guide's parameters.
    With ``device="cuda"`` (any ``torch.device``) ``fit`` first moves there ``train``, the
    validation data and the model and guide when they are ``nn.Module``\ s
    (``.to(device)``: a ``PyroModule`` model and the amortized guides, parameters built
    so far included); networks a function model registers with ``pyro.module`` are the
    caller's to move. Move before an optimizer's first step (its state stays where it
    was made) and call the guide afterwards on data on that device.

    Arguments:
        model: A Pyro model following the convention above: an ``nn.Module`` (e.g. a
            ``PyroModule``) or a function registering its networks with ``pyro.module``.
        guide: A Pyro guide, typically :class:`~pyro_amortized.AutoAmortizedNormal`.
        loss: The training objective, a :class:`pyro.infer.ELBO` such as
            :class:`~pyro_amortized.Trace_IWELBO`.
        train: Training data, a tensor with one row per datapoint.
        epochs: Total number of epochs, counting those of a resumed checkpoint.
        batch_size: Rows per training step.
        optimizer: A :class:`pyro.optim.PyroOptim`, e.g. ``pyro_amortized.optim.Adam``.
        validation: The validation data and its options (chunk size, objective,
            early-stopping patience), or ``None`` to train without validation.
        checkpoint: Where to write checkpoints and whether to resume, a :class:`Checkpoint`;
            a path stands for ``Checkpoint(path)``; ``None`` writes no checkpoints.
        schedule: Called as ``schedule(epoch, step, loss)`` before every step, e.g. to
            set ``loss.entropy_weight``. It must depend on its arguments only: nothing
            about it is checkpointed.
        seed: Seed of the shuffling generator.
        progress: Show a ``tqdm`` progress bar (on stderr) with the epoch's running loss
            per datapoint and the last validation bound. ``False`` prints nothing.
        resample: ``resample(train, generator)`` gives the data each epoch trains on,
            drawn with fit's generator so that a resumed run draws the same; e.g. dynamic
            binarization of grey-level images,
            ``lambda x, g: torch.bernoulli(x, generator=g)``. The generator is on the
            data's device.
        device: Where to train (see **Devices** above): ``None`` keeps the data, model and
            guide where they are; a ``torch.device`` or a string such as ``"cuda"`` moves
            them there first.
        **deprecated: The flat keywords of the previous release, each still accepted
            for this one with a ``FutureWarning``: ``valid``, ``valid_batch_size``,
            ``valid_loss`` and ``patience`` (now ``validation=Validation(valid,
            batch_size=..., loss=..., patience=...)``) and ``resume`` (now
            ``checkpoint=Checkpoint(path, resume=...)``).

    Returns:
        The :class:`History` of the whole run, resumed epochs included.

    Raises:
        ValueError: An argument is invalid (or given both in its deprecated and its new
            spelling); the checkpoint was written for different data, batch size, seed,
            model or guide; or the guide's data plate does not take the minibatch indices
            (an ``AutoAmortizedNormal`` first called without them), which would make every
            step silently full-batch.
        FloatingPointError: A step's loss (or a validation bound) is NaN or infinite.
            The message names the epoch and step; the checkpoint file keeps the last
            epoch completed before it. Parameters in memory are those after the failed
            step and should not be used.

    Example:
        >>> import pyro.distributions as dist
        >>> from pyro_amortized import AutoAmortizedNormal, Trace_IWELBO
        >>> from pyro_amortized.optim import Adam
        >>> def model(x, idx=None):
        ...     with pyro.plate("data", x.shape[0], subsample=idx) as ind:
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[ind])
        >>> guide = AutoAmortizedNormal(model, hidden_dims=(8,))
        >>> history = fit(model, guide, Trace_IWELBO(2), torch.randn(20, 2), epochs=2,
        ...               batch_size=8, optimizer=Adam({"lr": 0.01}),
        ...               validation=Validation(torch.randn(10, 2)), progress=False)
        >>> history.epochs, history.steps, history.best_epoch is not None
        (2, 6, True)
    """
    checkpoint = _checkpoint_option(checkpoint, deprecated)  # takes resume= out
    _check_problem(model, guide, loss, train)
    device = check_device("fit", "device", device, optional=True)
    validation = validation_option("fit", validation, deprecated, train)
    if device is not None:
        train = train.to(device)
        for module in (model, guide):
            if isinstance(module, nn.Module):
                module.to(device)
    if validation is not None:
        if device is not None:
            validation = dataclasses.replace(validation, data=validation.data.to(device))
        elif validation.data.device != train.device:
            raise ValueError(
                f"fit: the validation data is on {validation.data.device} but train is on "
                f"{train.device}; put them on one device, or pass device= to move both"
            )
    check_counts("fit", epochs=epochs, batch_size=batch_size)
    _check_steps(optimizer, schedule, resample, seed)
    check_bool("fit", "progress", progress)
    num_data = train.shape[0]
    patience = None
    if validation is not None:
        patience = validation.patience
        # fit's own batch size and objective where the validation names none; with a single
        # training row the guide never saw subsample indices and could not follow them, so
        # the whole set is then one chunk
        chunk = batch_size if validation.batch_size is None else validation.batch_size
        validation = dataclasses.replace(
            validation,
            batch_size=None if num_data == 1 else chunk,
            loss=loss if validation.loss is None else validation.loss,
        )
    path = None if checkpoint is None else checkpoint.path
    config = {
        "num_data": num_data,
        "batch_size": batch_size,
        "seed": seed,
        "device": train.device.type,  # the shuffling generator's state is the device's
    }

    state = None
    if path is not None and checkpoint.resume and path.exists():
        state = _read_checkpoint(path, config)
    # the warm-up sees data like an epoch's, from a generator of its own (fit's stays put)
    warm = train
    if resample is not None:
        warm = resample(train, torch.Generator(train.device).manual_seed(seed))
    valid_loss = loss if validation is None else validation.loss
    names = _warm_up(model, guide, loss, valid_loss, warm, batch_size)
    generator = torch.Generator(train.device).manual_seed(seed)
    history = History()
    if state is not None:
        _restore(state, model, guide, optimizer, names, path)
        generator.set_state(state["generator"])
        history = History.from_dict(state["history"])
        written = path  # the last good checkpoint, should this run fail
    else:
        written = None

    svi = SVI(model, guide, optimizer, loss)
    num_batches = 1 if batch_size >= num_data else math.ceil(num_data / batch_size)
    if patience is not None and _since_best(history) >= patience:
        history.stopped_early = True
        return history
    history.stopped_early = False
    start = history.epochs
    with tqdm(
        total=epochs * num_batches,
        initial=min(start, epochs) * num_batches,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for epoch in range(start, epochs):
            bar.set_description(f"epoch {epoch + 1}/{epochs}")
            began = time.perf_counter()
            epoch_loss = 0.0  # sum over steps of (per-datapoint loss) * (batch rows)
            rows_seen = 0
            # drawn from fit's generator, so a resumed run redraws exactly the same data
            data = train if resample is None else resample(train, generator)
            for step, idx in enumerate(_minibatches(num_data, batch_size, generator, train)):
                if schedule is not None:
                    schedule(epoch, history.steps, loss)
                value = svi.step(data, idx)
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"loss became {value} at epoch {epoch}, step {step} (global step "
                        f"{history.steps}); {_last_good(path, written)}"
                    )
                value /= num_data
                rows = num_data if idx is None else len(idx)
                history.step_losses.append(value)
                history.steps += 1
                epoch_loss += value * rows
                rows_seen += rows
                bar.update()
                bar.set_postfix(_postfix(epoch_loss / rows_seen, history), refresh=False)

            bound = None
            if validation is not None:
                bound = validation.bound(model, guide)
                if not math.isfinite(bound):
                    raise FloatingPointError(
                        f"the validation bound became {bound} at epoch {epoch} (global step "
                        f"{history.steps}); {_last_good(path, written)}"
                    )
            history.add_epoch(epoch_loss / num_data, bound, time.perf_counter() - began)
            if patience is not None and _since_best(history) >= patience:
                history.stopped_early = True
            bar.set_postfix(_postfix(history.train_loss[-1], history))

            if path is not None:
                _write_checkpoint(path, model, guide, optimizer, names, history, generator, config)
                written = path
            if history.stopped_early:
                break
    return history


# ------------------------------------------------------------------ arguments
# The flat keywords of the previous release and the field of Validation each stands for.
_VALIDATION_KEYWORDS = {
    "valid": "data",
    "valid_batch_size": "batch_size",
    "valid_loss": "loss",
    "patience": "patience",
}


def validation_option(
    owner: str, validation: Validation | None, deprecated: dict[str, Any], train: Tensor
) -> Validation | None:
    """The :class:`Validation` that ``validation=`` or the deprecated flat keywords spell,
    checked against the training data.

    ``deprecated`` holds the keyword arguments the caller took as ``**deprecated`` (those of
    :func:`fit` other than ``resume``, those of
    :class:`~pyro_amortized.lightning.PyroLightningModule`): ``valid``,
    ``valid_batch_size``, ``valid_loss`` and ``patience`` each give a ``FutureWarning`` that
    names the new spelling and are mapped onto a :class:`Validation`. Without ``valid``
    data, a ``patience`` is refused and the other two are ignored, as they were. To be
    removed with the flat keywords in the next release.

    Arguments:
        owner: The function or class the options were passed to, for the messages.
        validation: What the caller passed as ``validation=``.
        deprecated: The caller's other keyword arguments.
        train: The training data (already checked), whose rows the validation rows match.

    Raises:
        ValueError: ``validation`` is not a :class:`Validation`, its rows are shaped
            unlike ``train``'s, both ``validation=`` and a flat keyword were passed, or a
            flat one is invalid (the message names it as it was passed).
        TypeError: ``deprecated`` holds another keyword, as Python says of an unexpected one.
    """
    for name in deprecated:
        if name not in _VALIDATION_KEYWORDS:
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
    if deprecated:
        if validation is not None:
            raise ValueError(
                f"{owner}: pass the validation options either as validation=Validation(...) "
                f"or as the deprecated {', '.join(f'{name}=' for name in deprecated)}, not both"
            )
        validation = _from_deprecated(owner, deprecated)
    if validation is None:
        return None
    if not isinstance(validation, Validation):
        raise ValueError(
            f"{owner}: validation must be None or a Validation(data, ...), got {validation!r}"
        )
    if validation.data.shape[1:] != train.shape[1:]:
        raise ValueError(
            f"{owner}: valid rows have shape {tuple(validation.data.shape[1:])} but train rows "
            f"have shape {tuple(train.shape[1:])}"
        )
    return validation


def _from_deprecated(owner: str, deprecated: dict[str, Any]) -> Validation | None:
    for name in deprecated:
        field_name = _VALIDATION_KEYWORDS[name]
        spelling = (
            "Validation(valid)" if name == "valid" else f"Validation(valid, {field_name}=...)"
        )
        warnings.warn(
            f"{owner}: {name}= is deprecated and will be removed in the next release; pass "
            f"validation={spelling}",
            FutureWarning,
            stacklevel=4,
        )
    for name in ("valid_batch_size", "patience"):
        check_count(owner, name, deprecated.get(name), optional=True)
    if deprecated.get("valid") is None:
        if deprecated.get("patience") is not None:
            raise ValueError(
                f"{owner}: patience needs a validation set; pass "
                "validation=Validation(data, patience=...)"
            )
        return None
    return Validation(**{_VALIDATION_KEYWORDS[name]: value for name, value in deprecated.items()})


def _checkpoint_option(
    checkpoint: Checkpoint | str | os.PathLike | None, deprecated: dict[str, Any]
) -> Checkpoint | None:
    """fit's ``checkpoint=`` as a :class:`Checkpoint`, with the deprecated ``resume=``
    (taken out of ``deprecated``)."""
    if checkpoint is not None and not isinstance(checkpoint, (Checkpoint, str, os.PathLike)):
        raise ValueError(
            "fit: checkpoint must be None or a path (or a Checkpoint(path, resume=...)), got "
            f"{checkpoint!r}"
        )
    if "resume" not in deprecated:
        return Checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    resume = deprecated.pop("resume")
    if isinstance(checkpoint, Checkpoint):
        raise ValueError(
            "fit: pass resume either in checkpoint=Checkpoint(path, resume=...) or as the "
            "deprecated resume=, not both"
        )
    warnings.warn(
        "fit: resume= is deprecated and will be removed in the next release; pass "
        "checkpoint=Checkpoint(path, resume=...)",
        FutureWarning,
        stacklevel=3,
    )
    check_bool("fit", "resume", resume)
    # without a checkpoint there is nothing to resume from, as before
    return None if checkpoint is None else Checkpoint(checkpoint, resume=resume)


def _check_problem(model: Callable, guide: Callable, loss: ELBO, train: Tensor) -> None:
    """What fit trains: the model and guide, the objective and the data."""
    if not callable(model):
        raise ValueError(f"fit: model must be a callable Pyro model, got {model!r}")
    if not callable(guide):
        raise ValueError(f"fit: guide must be a callable Pyro guide, got {guide!r}")
    if not isinstance(loss, ELBO):
        raise ValueError(f"fit: loss must be a pyro.infer.ELBO, got {type(loss).__name__}")
    if not isinstance(train, Tensor) or train.dim() == 0 or train.shape[0] < 1:
        raise ValueError(
            "fit: train must be a tensor with at least one row (one row per datapoint), got "
            + (f"shape {tuple(train.shape)}" if isinstance(train, Tensor) else type(train).__name__)
        )


def _check_steps(
    optimizer: PyroOptim, schedule: Schedule | None, resample: Callable | None, seed: int
) -> None:
    """How fit steps: the optimizer, the schedule and resampling, the shuffling's seed."""
    if not isinstance(optimizer, PyroOptim):
        raise ValueError(
            "fit: optimizer must be a pyro.optim.PyroOptim (e.g. pyro_amortized.optim.Adam or "
            f"pyro.optim.Adam), got {type(optimizer).__name__}"
        )
    if schedule is not None and not callable(schedule):
        raise ValueError(
            f"fit: schedule must be None or a callable (epoch, step, loss), got {schedule!r}"
        )
    if resample is not None and not callable(resample):
        raise ValueError(f"fit: resample must be None or a callable, got {resample!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"fit: seed must be an int, got {seed!r}")


# ----------------------------------------------------------------- the loop
def _minibatches(num_data: int, batch_size: int, generator: torch.Generator, train: Tensor):
    if batch_size >= num_data:
        # Full batch: no subsampling, hence no scaling and no permutation to draw.
        yield None
        return
    order = torch.randperm(num_data, generator=generator, device=generator.device)
    yield from order.split(batch_size)


def _since_best(history: History) -> int:
    """Epochs run since the best validation bound (0 when there is none yet)."""
    if history.best_epoch is None:
        return 0
    return history.epochs - 1 - history.best_epoch


def _postfix(loss: float, history: History) -> dict[str, str]:
    postfix = {"loss": f"{loss:.4g}"}
    bounds = [b for b in history.valid_bound if b is not None]
    if bounds:
        postfix["valid"] = f"{bounds[-1]:.4g}"
    return postfix


def _last_good(path: Path | None, written: Path | None) -> str:
    if path is None:
        return "no checkpoint was requested"
    if written is None:
        return f"no checkpoint was written yet (checkpoint={str(path)!r})"
    return f"the last good checkpoint is {written}"


# -------------------------------------------------------------- checkpoints
def _warm_up(
    model: Callable, guide: Callable, loss: ELBO, valid_loss: ELBO, train: Tensor, batch_size: int
) -> list[str]:
    """Build everything that is built lazily, and name the parameters the model and guide use.

    Autoguides create their parameters (the encoder) on their first call, and ELBOs run
    the model and guide once on theirs (to guess plate nesting), which draws random
    numbers. Doing both here, before any checkpoint is loaded, makes a resumed run draw
    exactly the numbers of an uninterrupted one. The warm-up passes proper subsample
    indices whenever it can, so an amortized guide learns where they are even when
    training is full-batch and only the validation is chunked.
    """
    num_data = train.shape[0]
    idx = None
    if num_data > 1:
        idx = torch.arange(min(batch_size, num_data - 1), device=train.device)
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(train, idx)
    if idx is not None:
        _check_guide_follows_indices(guide_trace, num_data, len(idx))
    with poutine.trace(param_only=True) as capture, torch.no_grad():
        loss.loss(model, guide, train, idx)
        if valid_loss is not loss:
            valid_loss.loss(model, guide, train, idx)
    return sorted(capture.trace.nodes)


def _check_guide_follows_indices(guide_trace, num_data: int, batch: int) -> None:
    # Pyro replays the guide's plates into the model, so a guide plate that ignores the
    # indices would make the model see every row at every step: full-batch training
    # that still looks like minibatch training (a hand-written guide whose plate has no
    # subsample=, say).
    for name, site in guide_trace.nodes.items():
        if (
            site["type"] == "sample"
            and isinstance(site["fn"], _Subsample)
            and site["fn"].size == num_data
            and len(site["value"]) != batch
        ):
            raise ValueError(
                f"fit: called with {batch} minibatch indices, the guide's plate '{name}' "
                f"still holds {len(site['value'])} of the {num_data} rows, and Pyro replays it "
                "into the model, so training would not be by minibatches. The guide's plate "
                "must take the same indices as the model's: pyro.plate(..., subsample=idx)."
            )


def _rng_state() -> dict[str, Any]:
    # NumPy's key array becomes a list so the file loads with torch.load(weights_only=True).
    kind, key, position, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "random": random.getstate(),
        "numpy": (kind, key.tolist(), int(position), int(has_gauss), float(cached)),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["random"])
    kind, key, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), position, has_gauss, cached))


def _write_checkpoint(
    path: Path,
    model: Callable,
    guide: Callable,
    optimizer: PyroOptim,
    names: list[str],
    history: History,
    generator: torch.Generator,
    config: dict[str, int],
) -> None:
    store = dict(pyro.get_param_store().named_parameters())
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": config,
        "completed_epochs": history.epochs,
        # Unconstrained values, which are what the optimizer steps; the constraints are
        # rebuilt by the warm-up call (and would not load with weights_only=True).
        "params": {name: store[name].detach() for name in names},
        "optimizer": optimizer.get_state(),
        "model": model.state_dict() if isinstance(model, nn.Module) else None,
        "guide": guide.state_dict() if isinstance(guide, nn.Module) else None,
        "history": history.to_dict(),
        "rng": _rng_state(),
        "generator": generator.get_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _read_checkpoint(path: Path, config: dict[str, int]) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"fit: {path} is not a fit() checkpoint of format {CHECKPOINT_FORMAT} (found "
            f"{found!r}); pass checkpoint=Checkpoint(path, resume=False) to overwrite it"
        )
    for key, value in config.items():
        # checkpoints from before the device key were written on the CPU
        written = state["config"].get(key, "cpu" if key == "device" else None)
        if written != value:
            raise ValueError(
                f"fit: the checkpoint {path} was written with {key}={written} "
                f"but this call has {key}={value}; a resumed run needs the same data, "
                "batch_size, seed and device type (or pass checkpoint=Checkpoint(path, resume=False) to start "
                "over)"
            )
    return state


def _restore(
    state: dict[str, Any],
    model: Callable,
    guide: Callable,
    optimizer: PyroOptim,
    names: list[str],
    path: Path,
) -> None:
    if sorted(state["params"]) != names:
        missing = sorted(set(state["params"]) ^ set(names))
        raise ValueError(
            f"fit: the checkpoint {path} does not match this model and guide: parameters "
            f"{missing} are in only one of them"
        )
    for name, module in (("model", model), ("guide", guide)):
        saved = state[name]
        if saved is not None and isinstance(module, nn.Module):
            try:
                module.load_state_dict(saved)
            except RuntimeError as error:
                raise ValueError(
                    f"fit: the checkpoint {path} does not fit the {name}: {error}"
                ) from error
    # In place: modules, the parameter store and the optimizer all hold these tensors.
    store = dict(pyro.get_param_store().named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            store[name].copy_(value)
    _forget_optimizer_state(optimizer)
    optimizer.set_state(state["optimizer"])
    _set_rng_state(state["rng"])


def _forget_optimizer_state(optimizer: PyroOptim) -> None:
    """Drop the per-tensor optimizers so the checkpoint's state is loaded into new ones.

    PyroOptim applies a state set with ``set_state`` only to tensors it has not seen yet,
    so an optimizer that already stepped these tensors (``fit`` called again in the same
    process after an interruption) would keep its newer state.
    """
    if isinstance(optimizer, JointOptim):
        optimizer.clear()
    else:
        optimizer.optim_objs.clear()
        optimizer.grad_clip.clear()
