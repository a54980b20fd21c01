"""A variational autoencoder written as an ordinary Pyro model, trained with an IWAE bound.

The model is plain Pyro; the guide, the objective and the training loop come from
pyro_amortized. With no arguments it trains on scikit-learn's bundled digits::

    python -m models.vae
    python -m models.vae --dataset binarized-mnist --root DIR --latent 50 --epochs 20 \\
        --eval-samples 5000

The second is the run of the README's quality bar, where ``benchmarks/reference_vae.py``
trains it side by side with a VAE written out in plain PyTorch.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import statistics
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

import pyro_amortized.optim
from models.datasets import DATASET_NAMES, Dataset, load_dataset
from pyro_amortized import (
    ESTIMATORS,
    AutoAmortizedFlow,
    AutoAmortizedIAF,
    AutoAmortizedNormal,
    History,
    LinearSchedule,
    MLPEncoder,
    Trace_IWELBO,
    fit,
)
from pyro_amortized.diagnostics import (
    InferenceGaps,
    active_units,
    inference_gaps,
    log_marginal_likelihood,
)
from pyro_amortized.plotting import (
    plot_image_grid,
    plot_posterior_contours,
    plot_training_curves,
)
from pyro_amortized.refinement import MODES, REFINE_DEFAULTS, SemiAmortizedGuide, refine

ACTIVATIONS = {"tanh": nn.Tanh, "elu": nn.ELU}
# Rows per validation chunk: few chunks, so little per-call overhead, and K x 1000 x D
# floats of memory.
VALID_BATCH_SIZE = 1000


class VAE(PyroModule):
    r"""z ~ N(0, I), x | z ~ Bernoulli(decoder(z)) (or a Normal), one z per row of ``x``.

    Arguments:
        num_pixels: Dimension of each datapoint.
        latent_dim: Dimension of z.
        hidden_dims: Hidden widths of the decoder.
        activation: ``"tanh"`` or ``"elu"``.
        likelihood: ``"bernoulli"`` for binary data (the decoder gives logits) or
            ``"normal"`` for real-valued data (the decoder gives means; one learned scale
            per pixel).
        pixel_mean: Mean of the training data; the decoder's output bias starts at its logit
            (Bernoulli) or at it (Normal), so training starts from the marginal model.
    """

    def __init__(
        self,
        num_pixels: int,
        *,
        latent_dim: int = 50,
        hidden_dims: Sequence[int] = (200, 200),
        activation: str = "tanh",
        likelihood: str = "bernoulli",
        pixel_mean: Tensor | None = None,
    ):
        super().__init__()
        if likelihood not in ("bernoulli", "normal"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'normal', got {likelihood!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        layers: list[nn.Module] = []
        width = latent_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
            width = hidden
        layers.append(nn.Linear(width, num_pixels))
        self.decoder = nn.Sequential(*layers)
        if pixel_mean is not None:
            with torch.no_grad():
                bias = (
                    pixel_mean.clamp(1e-3, 1 - 1e-3).logit()
                    if likelihood == "bernoulli"
                    else pixel_mean
                )
                self.decoder[-1].bias.copy_(bias)
        if likelihood == "normal":
            self.log_scale = nn.Parameter(torch.zeros(num_pixels))

    def forward(self, x: Tensor, idx: Tensor | None = None) -> None:
        with pyro.plate("data", x.shape[0], subsample=idx):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            out = self.decoder(z)
            rows = x if idx is None else x[idx]
            if self.likelihood == "bernoulli":
                pyro.sample("x", dist.Bernoulli(logits=out).to_event(1), obs=rows)
            else:
                pyro.sample("x", dist.Normal(out, self.log_scale.exp()).to_event(1), obs=rows)

    @torch.no_grad()
    def mean_image(self, z: Tensor) -> Tensor:
        """The decoder's mean for latents ``z``: pixel probabilities, or means."""
        out = self.decoder(z)
        return out.sigmoid() if self.likelihood == "bernoulli" else out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a VAE with an amortized guide and an importance-weighted bound."
    )
    parser.add_argument("--dataset", default="digits", choices=DATASET_NAMES)
    parser.add_argument("--root", default=None, help="directory holding the data files")
    parser.add_argument("--download", action="store_true", help="fetch missing data files")
    parser.add_argument(
        "--guide",
        default="normal",
        choices=["normal", "iaf", "flow"],
        help="normal: the encoder's diagonal Normal; iaf: then inverse autoregressive flow "
        "steps; flow: Cremer et al.'s coupling flow with an auxiliary variable",
    )
    parser.add_argument(
        "--num-transforms", type=int, default=2, help="flow steps of --guide iaf and flow"
    )
    parser.add_argument(
        "--iaf-stable",
        action="store_true",
        help="--guide iaf with the sigmoid update of Kingma et al. (stable=True)",
    )
    parser.add_argument("--num-particles", type=int, default=5)
    parser.add_argument("--estimator", default="dreg", choices=list(ESTIMATORS))
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, nargs="+", default=[200, 200])
    parser.add_argument("--latent", type=int, default=20)
    parser.add_argument("--activation", default="tanh", choices=sorted(ACTIVATIONS))
    parser.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "normal"])
    parser.add_argument(
        "--anneal-entropy",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="raise the entropy weight of the bound from 0 to 1 over this many epochs "
        "(Cremer et al.'s annealing)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="KL warm-up: raise the weight of the log-prior and entropy terms from 0 to 1 "
        "over this many epochs",
    )
    parser.add_argument(
        "--gaps",
        type=int,
        default=0,
        metavar="N",
        help="after training, split the inference gap of the first N test points into "
        "approximation and amortization gaps (Cremer et al.)",
    )
    parser.add_argument(
        "--gap-families",
        nargs="+",
        default=["normal", "flow"],
        choices=["normal", "flow", "iaf"],
        help="families of the per-datapoint posteriors q* of --gaps (the guide's own is "
        "always fitted)",
    )
    parser.add_argument(
        "--gap-max-steps",
        type=int,
        default=5000,
        help="cap on the Adam steps of each per-datapoint posterior of --gaps",
    )
    parser.add_argument(
        "--refine-steps",
        type=int,
        default=0,
        metavar="N",
        help="refine every test posterior by N gradient steps from the encoder "
        "(semi-amortized inference) and report the test bounds before and after; with "
        "--refine-mode savi or sa-vae, train with N steps too",
    )
    parser.add_argument(
        "--refine-mode",
        default="test",
        choices=list(MODES),
        help="test: refine only to evaluate; savi: train the decoder at the refined "
        "posterior and the encoder on its own bound (Krishnan et al.); sa-vae: "
        "backpropagate through the steps into the encoder (Kim et al.)",
    )
    parser.add_argument(
        "--refine-lr", type=float, default=REFINE_DEFAULTS["step_size"], help="Adam's step size"
    )
    parser.add_argument("--eval-samples", type=int, default=1000, help="S of the test log p(x)")
    parser.add_argument(
        "--patience",
        type=int,
        default=20,
        help="stop after this many epochs without a better validation bound (0: never)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trainer",
        default="fit",
        choices=["fit", "lightning"],
        help="fit: pyro_amortized.fit in this process; lightning: PyTorch Lightning's "
        "Trainer, on --devices processes or GPUs (needs the lightning extra)",
    )
    parser.add_argument(
        "--devices", type=int, default=1, help="--trainer lightning: processes (or GPUs)"
    )
    parser.add_argument(
        "--strategy",
        default="auto",
        help="--trainer lightning: Lightning's strategy, e.g. ddp (gloo on CPUs, NCCL on GPUs)",
    )
    parser.add_argument(
        "--accelerator",
        default="auto",
        help="--trainer lightning: cpu, gpu, or auto (a GPU when there is one)",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="Pyro's validation of every distribution's arguments and values at every step "
        "(off by default, as in Pyro's own VAE example: it costs about 7%% of an epoch)",
    )
    parser.add_argument("--out", default=None, help="output directory (default runs/<time>)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.trainer == "fit" and (
        args.devices != 1 or args.strategy != "auto" or args.accelerator != "auto"
    ):
        parser.error("--devices, --strategy and --accelerator need --trainer lightning")
    if args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    if "spawn" in args.strategy:
        parser.error(
            f"--strategy {args.strategy} pickles the guide, and a pickled Pyro autoguide drops "
            "its model (on the original too), which the evaluation needs: use --strategy ddp"
        )
    if args.refine_mode != "test" and args.refine_steps < 1:
        parser.error(
            f"--refine-mode {args.refine_mode} trains with refinement: pass --refine-steps N"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Trains, prints a results table and writes figures; returns the table's numbers.

    With ``--trainer lightning`` under DDP every worker runs this function; the workers
    other than rank 0 return an empty dict after training.
    """
    args = parse_args(argv)
    out = Path(args.out or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    # Lightning needs the parameters in the modules, where its optimizer and DDP see them
    lightning = args.trainer == "lightning"
    with pyro.settings.context(module_local_params=True) if lightning else nullcontext():
        pyro.set_rng_seed(args.seed)
        pyro.clear_param_store()
        data = load_dataset(args.dataset, root=args.root, download=args.download)
        say = _rank_zero_print() if lightning else print
        say(data.description)
        model, guide, loss = build(args, data.train)
        trained = guide
        if args.refine_mode != "test":
            trained = SemiAmortizedGuide(
                guide, num_steps=args.refine_steps, step_size=args.refine_lr, mode=args.refine_mode
            )
        if lightning:
            history, rank_zero = train_lightning(args, model, trained, loss, data, out)
            if not rank_zero:
                return {}
        else:
            history = train(args, model, trained, loss, data, out / "checkpoint.pt")
        out.mkdir(parents=True, exist_ok=True)
        results = evaluate(args, model, guide, data)
        if args.refine_steps:
            results.update(refined_bounds(args, model, guide, data.test))
        units = active_units(guide, data.test)
        print_table(results, units, args.latent, history, args)
        write_figures(out, model, guide, data.test, history, data.image_shape)
        if args.gaps:
            report = gaps(args, model, guide, data.test[: args.gaps], out)
            results.update({f"gaps: {label}": value for label, value in report.rows()})
    print(f"figures and checkpoint in {out}/")
    results["active units"] = units.count
    return results


def _rank_zero_print() -> Callable[..., None]:
    # Lightning's DDP workers run this script too; they know their rank from the environment
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only(print)


def gaps(
    args: argparse.Namespace,
    model: VAE,
    guide: AutoAmortizedNormal | AutoAmortizedIAF | AutoAmortizedFlow,
    test: Tensor,
    out: Path,
) -> InferenceGaps:
    """The inference-gap report of ``test``: printed, and saved as gaps.json and gaps.png."""
    report = inference_gaps(
        model,
        guide,
        test,
        families=args.gap_families,
        num_samples=args.eval_samples,
        chunk_size=100,  # 100 draws x N images x 784 logits at a time
        max_steps=args.gap_max_steps,
        progress=not args.no_progress,
    )
    print()
    print(report.table())
    print(f"({report.seconds:.0f} s)")
    report.plot(out / "gaps.png")
    with open(out / "gaps.json", "w") as file:
        json.dump(report.to_dict(), file)
    return report


def build(
    args: argparse.Namespace, train: Tensor
) -> tuple[VAE, AutoAmortizedNormal | AutoAmortizedIAF, Trace_IWELBO]:
    """The model, the guide (an MLP encoder mirroring the decoder) and the training objective."""
    model = VAE(
        train.shape[1],
        latent_dim=args.latent,
        hidden_dims=args.hidden,
        activation=args.activation,
        likelihood=args.likelihood,
        pixel_mean=train.mean(0),
    )
    # h(x), the context of the flow steps, has the latent's size (as in Kingma et al.)
    context_dim = args.latent if args.guide in ("iaf", "flow") else 0
    encoder = MLPEncoder(
        train.shape[1],
        args.latent,
        args.hidden,
        activation=ACTIVATIONS[args.activation],
        context_dim=context_dim,
    )
    flow = {"encoder": encoder, "context_dim": context_dim, "flow_hidden_dims": args.hidden}
    if args.guide == "iaf":
        guide = AutoAmortizedIAF(
            model, num_transforms=args.num_transforms, stable=args.iaf_stable, **flow
        )
    elif args.guide == "flow":
        guide = AutoAmortizedFlow(model, num_flows=args.num_transforms, **flow)
    else:
        guide = AutoAmortizedNormal(model, encoder=encoder)
    loss = Trace_IWELBO(args.num_particles, estimator=args.estimator)
    return model, guide, loss


def train(
    args: argparse.Namespace,
    model: VAE,
    guide: AutoAmortizedNormal,
    loss: Trace_IWELBO,
    data: Dataset,
    checkpoint: Path,
    *,
    epochs: int | None = None,
) -> History:
    """Trains with :func:`~pyro_amortized.fit` for ``epochs`` (default ``args.epochs``) in all.

    With an existing ``checkpoint`` it resumes from it, as :func:`fit` does.
    """
    schedule, valid_loss = annealing(args, math.ceil(len(data.train) / args.batch_size))
    with pyro.validation_enabled(args.validate):
        return fit(
            model,
            guide,
            loss,
            data.train,
            valid=data.valid,
            valid_loss=valid_loss,
            schedule=schedule,
            epochs=args.epochs if epochs is None else epochs,
            batch_size=args.batch_size,
            optimizer=pyro_amortized.optim.Adam(adam_options(args.lr)),
            valid_batch_size=VALID_BATCH_SIZE,
            patience=args.patience or None,
            checkpoint=checkpoint,
            seed=args.seed,
            progress=not args.no_progress,
            resample=_binarize if data.dynamic_binarization else None,
        )


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
        valid=data.valid,
        valid_batch_size=VALID_BATCH_SIZE,
        valid_loss=valid_loss,
        optimizer=functools.partial(torch.optim.Adam, **adam_options(args.lr)),
        schedule=schedule,
        seed=args.seed,
        resample=_binarize if data.dynamic_binarization else None,
    )
    last = checkpoints / "last.ckpt"
    with pyro.validation_enabled(args.validate):
        trainer.fit(module, ckpt_path=last if last.exists() else None)
    # the evaluation runs on rank 0 alone, on the CPU, where the data is
    module.cpu()
    return module.history, trainer.is_global_zero


def adam_options(lr: float) -> dict:
    """Adam's options: torch's fused kernel where it runs on the CPU (torch >= 2.4).

    The fused kernel updates each tensor in one pass instead of a dozen elementwise ops;
    on the MNIST VAE that is 0.5 ms of a 7-8 ms step on 2 cores. The update is Adam's
    all the same, up to float rounding.
    """
    return {"lr": lr, "fused": True} if torch.__version__ >= "2.4" else {"lr": lr}


def evaluate(
    args: argparse.Namespace, model: VAE, guide: AutoAmortizedNormal, data: Dataset
) -> dict[str, float]:
    """Mean bounds per datapoint: the training bound on every split, the test ELBO and log p(x)."""
    train = data.train
    if data.dynamic_binarization:  # evaluate on one fixed binarization of the grey levels
        train = _binarize(train, torch.Generator().manual_seed(args.seed))
    K = args.num_particles
    results = {
        f"train bound (IWAE-{K})": _mean_bound(model, guide, train, K),
        f"valid bound (IWAE-{K})": _mean_bound(model, guide, data.valid, K),
        f"test bound (IWAE-{K})": _mean_bound(model, guide, data.test, K),
    }
    if K > 1:
        results["test ELBO"] = _mean_bound(model, guide, data.test, 1)
    results[f"test log p(x) (IWAE-{args.eval_samples})"] = _mean_bound(
        model, guide, data.test, args.eval_samples, progress=not args.no_progress
    )
    return results


def refined_bounds(args: argparse.Namespace, model: VAE, guide, test: Tensor) -> dict[str, float]:
    """The test ELBO (one draw per image) and log p(x) after ``args.refine_steps``
    refinement steps from the encoder (:func:`~pyro_amortized.refinement.refine`), the
    refined posterior being the proposal; the encoder's own are :func:`evaluate`'s."""
    steps = args.refine_steps
    refined = refine(guide, model, test, num_steps=steps, step_size=args.refine_lr)
    results = {}
    for label, num_samples in (
        ("ELBO", 1),
        (f"log p(x) (IWAE-{args.eval_samples})", args.eval_samples),
    ):
        value = log_marginal_likelihood(
            refined.model,
            refined.guide,
            test,
            num_samples=num_samples,
            batch_size=100,
            progress=num_samples > 1 and not args.no_progress,
        )
        results[f"test {label}, refined {steps} steps"] = value.mean().item()
    return results


def _binarize(x: Tensor, generator: torch.Generator) -> Tensor:
    """Dynamic binarization: every epoch sees a new Bernoulli draw of the grey levels."""
    return torch.bernoulli(x, generator=generator)


def _mean_bound(
    model: VAE, guide: AutoAmortizedNormal, data: Tensor, num_samples: int, progress: bool = False
) -> float:
    estimates = log_marginal_likelihood(
        model, guide, data, num_samples=num_samples, batch_size=100, progress=progress
    )
    return estimates.mean().item()


def print_table(results, units, latent_dim, history, args) -> None:
    epoch_time = statistics.median(history.epoch_time) if history.epoch_time else math.nan
    print()
    print(f"| {args.dataset}, K={args.num_particles}, {args.estimator} | nats per datapoint |")
    print("|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.3f} |")
    print(f"| active units | {units.count} of {latent_dim} |")
    print(f"| epochs | {history.epochs} (best {history.best_epoch}) |")
    print(f"| time per epoch | {epoch_time:.2f} s |")


def write_figures(out: Path, model: VAE, guide, test: Tensor, history, image_shape) -> None:
    shown = test[:50]
    curves = {"train bound": [-v for v in history.train_loss]}
    curves["valid bound"] = [v for v in history.valid_bound if v is not None]
    plot_training_curves(curves, out / "curves.png")
    plot_image_grid(shown, out / "data.png", image_shape=image_shape, title="test images")
    z = guide.median(shown)["z"]
    plot_image_grid(
        model.mean_image(z),
        out / "reconstructions.png",
        image_shape=image_shape,
        title="reconstructions (posterior median)",
    )
    prior = torch.randn(50, model.latent_dim, dtype=test.dtype)
    plot_image_grid(
        model.mean_image(prior), out / "samples.png", image_shape=image_shape, title="samples"
    )
    if model.latent_dim == 2:
        if isinstance(guide, AutoAmortizedFlow) and guide.auxiliary:
            # q(z | x) is only bounded (through r(v | x, z)), not evaluated, so no contours
            print("posterior contours skipped: the auxiliary flow has no closed-form q(z | x)")
            return
        posteriors = guide.encode if hasattr(guide, "encode") else _joint_posterior(guide)
        plot_posterior_contours(model, posteriors, test, out / "posteriors.png")


def _joint_posterior(guide: AutoAmortizedIAF):
    # The VAE has one local site, z: the first columns of the flow's joint latent.
    return lambda x: {"z": guide.get_posterior(x)}


if __name__ == "__main__":
    main()
