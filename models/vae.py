"""A variational autoencoder written as an ordinary Pyro model, trained with an IWAE bound.

The model is plain Pyro; the guide, the objective and the training loop come from
pyro_amortized. With no arguments it trains on scikit-learn's bundled digits::

    python -m models.vae
    python -m models.vae --dataset binarized-mnist --root DIR --latent 50 --epochs 20 \\
        --eval-samples 5000

The second is the run of the README's quality bar, where ``benchmarks/reference_vae.py``
trains it side by side with a VAE written out in plain PyTorch. The evaluation lives in
``models._vae_evaluation``; the annealing, Adam's options and the Lightning trainer in
``models._vae_training``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

import pyro_amortized.optim
from models._vae_evaluation import (
    evaluate,
    gaps,
    print_table,
    refined_bounds,
    surgery,
    write_figures,
)
from models._vae_training import (
    VALID_BATCH_SIZE,
    adam_options,
    annealing,
    rank_zero_print,
    train_lightning,
)
from models.datasets import DATASET_NAMES, Dataset, binarize, load_dataset
from pyro_amortized import (
    ESTIMATORS,
    AutoAmortizedIAF,
    AutoAmortizedNormal,
    AutoAmortizedRealNVP,
    History,
    MLPEncoder,
    Trace_IWELBO,
    Validation,
    fit,
)
from pyro_amortized.checks import check_device
from pyro_amortized.diagnostics import active_units
from pyro_amortized.refinement import MODES, RefineOptions, SemiAmortizedGuide

__all__ = ["ACTIVATIONS", "VAE", "build", "main", "parse_args", "train"]

ACTIVATIONS = {"tanh": nn.Tanh, "elu": nn.ELU}


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
        "--refine-lr", type=float, default=RefineOptions.lr, help="Adam's step size"
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
        "--device",
        default="cpu",
        help="--trainer fit: where the data, model and guide live, e.g. cuda or cuda:1 "
        "(default cpu, so the command gives the same numbers on every machine)",
    )
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
    if args.trainer == "lightning" and args.device != "cpu":
        parser.error("--trainer lightning places itself: pass --accelerator gpu, not --device")
    try:
        args.device = check_device("models.vae", "--device", args.device)
    except ValueError as error:
        parser.error(str(error))
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
        say = rank_zero_print() if lightning else print
        say(data.description)
        # the data's device decides: the splits go there, and the model and guide with them
        device = args.device
        data = dataclasses.replace(
            data,
            train=data.train.to(device),
            valid=data.valid.to(device),
            test=data.test.to(device),
        )
        model, guide, loss = build(args, data.train)
        model.to(device)
        guide.to(device)
        trained = guide
        if args.refine_mode != "test":
            trained = SemiAmortizedGuide(
                guide, num_steps=args.refine_steps, lr=args.refine_lr, mode=args.refine_mode
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
        split = surgery(model, guide, data.test)
        print_table(results, units, args.latent, history, args, split)
        write_figures(out, model, guide, data.test, history, data.image_shape)
        if args.gaps:
            report = gaps(args, model, guide, data.test[: args.gaps], out)
            results.update({f"gaps: {label}": value for label, value in report.rows()})
    print(f"figures and checkpoint in {out}/")
    results["active units"] = units.count
    if split is not None:
        for name in ("average_kl", "mutual_information", "marginal_kl"):
            results[f"test {name}"] = getattr(split, name).value
    return results


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
        guide = AutoAmortizedRealNVP(model, num_transforms=args.num_transforms, **flow)
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
            validation=Validation(
                data.valid,
                batch_size=VALID_BATCH_SIZE,
                loss=valid_loss,
                patience=args.patience or None,
            ),
            schedule=schedule,
            epochs=args.epochs if epochs is None else epochs,
            batch_size=args.batch_size,
            optimizer=pyro_amortized.optim.Adam(adam_options(args.lr)),
            checkpoint=checkpoint,
            seed=args.seed,
            progress=not args.no_progress,
            resample=binarize if data.dynamic_binarization else None,
            device=getattr(args, "device", None),
        )


if __name__ == "__main__":
    main()
