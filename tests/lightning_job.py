"""A tiny model trained by ``PyroLightningModule``, run as a script by ``test_lightning.py``.

``python tests/lightning_job.py OUT --devices N [--epochs E] [--ckpt-path P]
[--checkpoint-dir D] [--validate]`` trains (on N CPU processes with DDP and gloo when
N > 1) and writes ``OUT/rank{r}.pt`` per worker: the row indices it drew per epoch, its
final parameters, its ``History`` and validation bound, and on rank 0 two independent
draws of every validation row's bound.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

N_TRAIN, N_VALID, BATCH = 96, 64, 8


def build(seed: int = 0):
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.nn import PyroModule
    from torch import nn

    from pyro_amortized import AutoAmortizedNormal, Trace_IWELBO, Validation
    from pyro_amortized.lightning import PyroLightningModule

    class Model(PyroModule):
        def __init__(self):
            super().__init__()
            self.decoder = nn.Linear(2, 5)

        def forward(self, x, idx=None):
            with pyro.plate("data", x.shape[0], subsample=idx) as ind:
                z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x[ind])

    class Recording(PyroLightningModule):
        """Records the rows each step draws."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen: dict[int, list] = {}

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).append(batch.cpu())
            return super().training_step(batch, batch_idx)

    pyro.settings.set(module_local_params=True)
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(N_TRAIN + N_VALID, 5, generator=generator) @ torch.randn(
        5, 5, generator=generator
    )
    torch.manual_seed(seed)
    model = Model()
    guide = AutoAmortizedNormal(model, hidden_dims=(16,))
    module = Recording(
        model,
        guide,
        Trace_IWELBO(4),
        data[:N_TRAIN],
        validation=Validation(data[N_TRAIN:]),
        batch_size=BATCH,
        lr=0.02,
    )
    return module, data


def main(argv: list[str] | None = None) -> None:
    import lightning.pytorch as pl
    import torch

    from pyro_amortized.diagnostics import log_marginal_likelihood

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="Lightning's ModelCheckpoint: epoch=E.ckpt each epoch",
    )
    parser.add_argument("--validate", action="store_true", help="only the validation bound")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    module, data = build()
    callbacks = []
    if args.checkpoint_dir:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(args.checkpoint_dir, "{epoch}", save_top_k=-1)
        )
    # Lightning's defaults otherwise, its sanity check of two validation chunks included
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if args.validate:
        trainer.validate(module, verbose=False)
    else:
        trainer.fit(module, ckpt_path=args.ckpt_path)
    rank = trainer.global_rank
    record = {
        "seen": {epoch: torch.cat(rows) for epoch, rows in module.seen.items()},
        "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "history": module.history.to_dict(),
        "valid_bound": float(trainer.callback_metrics["valid_bound"]),
        "global_step": trainer.global_step,
    }
    if rank == 0:
        # two independent draws of every validation row's bound: their differences give the
        # Monte Carlo variance of a bound averaged over the rows
        with torch.no_grad():
            record["valid_pointwise"] = torch.stack(
                [
                    log_marginal_likelihood(
                        module.model, module.guide, data[N_TRAIN:], num_samples=4, progress=False
                    )
                    for _ in range(2)
                ]
            )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.save(record, Path(args.out) / f"rank{rank}.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
