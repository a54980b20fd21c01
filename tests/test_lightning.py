import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from pyro_amortized import SemiAmortizedGuide, Trace_IWELBO, Validation
from pyro_amortized.diagnostics import log_marginal_likelihood
from pyro_amortized.lightning import PyroLightningModule, steps_per_epoch

JOB = Path(__file__).resolve().parent / "lightning_job.py"
ROOT = JOB.parents[1]


def _run(out: Path, *args: str) -> dict:
    """Runs the job script (its own processes, as DDP needs) and loads every worker's record."""
    result = subprocess.run(
        [sys.executable, str(JOB), str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        int(path.stem[4:]): torch.load(path, weights_only=False)
        for path in sorted(out.glob("rank*.pt"))
    }


def _figures(history: dict) -> dict:
    """A history without its epoch times, which no two runs share."""
    return {k: v for k, v in history.items() if k != "epoch_time"}


def test_the_module_needs_module_local_params():
    from lightning_job import build

    with pyro.settings.context(module_local_params=True):
        module, _ = build()
    with pyro.settings.context(module_local_params=False):
        with pytest.raises(ValueError, match="module_local_params=True"):
            PyroLightningModule(
                module.model, module.guide, module.loss, module.train_data, batch_size=8
            )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size must be an int >= 1"),
        (dict(batch_size=True), r"PyroLightningModule: batch_size must be an int >= 1, got True"),
        (dict(batch_size=8, lr=0.0), "lr must be > 0"),
        (dict(batch_size=8, lr=float("nan")), "lr must be > 0"),
        (dict(batch_size=8, log_marginal_every=2), "log_marginal_every must be >= 0"),
        (dict(batch_size=8, log_marginal_every=-1), "log_marginal_every must be an int >= 0"),
        (dict(batch_size=8, log_marginal_samples=True), "log_marginal_samples must be an int"),
        (dict(batch_size=8, log_marginal_rows=0), "log_marginal_rows must be an int >= 1"),
        (
            dict(batch_size=8, validation=Validation(torch.zeros(3, 4))),
            r"valid rows have shape \(4,\)",
        ),
        (dict(batch_size=8, validation=torch.zeros(3, 5)), "validation must be None or a Valid"),
        (
            dict(batch_size=8, validation=Validation(torch.zeros(3, 5), patience=2)),
            r"early stopping is Lightning's .*EarlyStopping\('valid_bound', mode='max', patie",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    from lightning_job import build

    with pyro.settings.context(module_local_params=True):
        module, _ = build()
        with pytest.raises(ValueError, match=match):
            PyroLightningModule(
                module.model, module.guide, module.loss, module.train_data, **kwargs
            )


def test_parameters_exist_before_configure_optimizers():
    from lightning_job import build

    with pyro.settings.context(module_local_params=True):
        module, _ = build()
        optimizer = module.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    expected = [*module.model.decoder.parameters(), *module.guide.encoder.parameters()]
    assert expected and all(id(p) in optimized for p in expected)
    # the data is not part of the state (checkpoints stay small)
    assert all(not torch.equal(v, module.train_data) for v in module.state_dict().values())


@pytest.mark.slow
def test_two_ddp_workers_draw_disjoint_rows_and_end_with_identical_parameters(tmp_path):
    records = _run(tmp_path, "--devices", "2", "--epochs", "2")
    assert set(records) == {0, 1}
    first, second = records[0], records[1]
    for epoch in (0, 1):
        a, b = set(first["seen"][epoch].tolist()), set(second["seen"][epoch].tolist())
        assert not a & b
        assert a | b == set(range(96))  # 96 rows: each worker draws 48 in 6 steps of 8
    assert first["global_step"] == 12
    # DDP averages the gradients, so every step leaves the same parameters on both workers
    assert first["params"].keys() == second["params"].keys()
    assert all(torch.equal(first["params"][k], second["params"][k]) for k in first["params"])
    # the history's bounds are averaged over the workers, so every worker has the same
    assert _figures(first["history"]) == _figures(second["history"])
    history = first["history"]
    assert len(history["train_loss"]) == 2 and len(history["step_losses"]) == 12
    assert history["steps"] == 12 and all(v is not None for v in history["valid_bound"])
    # the epoch's loss is the mean of its steps' (six steps of equal size)
    assert history["train_loss"][0] == pytest.approx(sum(history["step_losses"][:6]) / 6)


@pytest.mark.slow
def test_the_ddp_validation_bound_equals_the_single_process_one(tmp_path):
    single = _run(tmp_path / "one", "--validate")[0]
    double = _run(tmp_path / "two", "--validate", "--devices", "2")[0]
    # the same parameters (seeded construction); the two bounds differ by Monte Carlo error
    # only, whose variance two independent draws per row estimate
    draws = single["valid_pointwise"]
    variance = ((draws[0] - draws[1]) ** 2 / 2).sum() / draws.shape[1] ** 2
    se = float((2 * variance).sqrt())
    assert abs(single["valid_bound"] - double["valid_bound"]) < 5 * se, (single, double, se)


@pytest.mark.slow
def test_resuming_from_a_checkpoint_continues_the_run_exactly(tmp_path):
    # Lightning's ModelCheckpoint writes epoch=E.ckpt at the end of every epoch
    whole = _run(tmp_path / "whole", "--epochs", "4", "--checkpoint-dir", str(tmp_path))[0]
    resumed = _run(
        tmp_path / "resumed", "--epochs", "4", "--ckpt-path", str(tmp_path / "epoch=1.ckpt")
    )[0]
    # the same minibatches (the sampler's order depends on seed and epoch) and the same
    # draws (the checkpoint keeps torch's RNG state, and the resumed run's sanity check
    # leaves it alone): the resumed epochs are the whole run's, and so is the history the
    # checkpoint carried over
    assert sorted(resumed["seen"]) == [2, 3]
    assert _figures(resumed["history"]) == _figures(whole["history"])
    assert resumed["global_step"] == whole["global_step"] == 48
    assert all(torch.equal(resumed["params"][k], whole["params"][k]) for k in whole["params"])


def _trainer(**kwargs):
    import lightning.pytorch as pl

    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    options.update(enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**options, **kwargs)


def test_the_validation_bound_is_fits_even_for_a_refining_guide():
    from lightning_job import build

    with pyro.settings.context(module_local_params=True):
        built, data = build()
        refining = SemiAmortizedGuide(built.guide, num_steps=3)
        train, valid = data[:96], data[96:]
        module = PyroLightningModule(
            built.model,
            refining,
            Trace_IWELBO(4),
            train,
            validation=Validation(valid, batch_size=24),
            batch_size=8,
            log_marginal_every=1,
            log_marginal_samples=8,
            log_marginal_rows=40,
        )
        # Lightning validates under torch.inference_mode (its default), where the
        # refinement's gradient steps could not run
        torch.manual_seed(3)
        logged = _trainer().validate(module, verbose=False)[0]
        torch.manual_seed(3)
        bound = Validation(valid, batch_size=24, loss=module.valid_loss).bound(
            module.model, refining
        )
        refining.eval()  # as Lightning leaves it for on_validation_epoch_end
        log_px = log_marginal_likelihood(
            module.model, refining, valid[:40], num_samples=8, progress=False
        )
    # the same chunks and draws: equal up to the order of the float sums
    assert logged["valid_bound"] == pytest.approx(bound, rel=1e-6, abs=0)
    assert logged["valid_log_px"] == pytest.approx(log_px.mean().item(), rel=1e-6, abs=0)


def test_schedule_history_and_resample_per_step_and_epoch():
    from lightning_job import build

    calls, seeds = [], []

    def schedule(epoch, step, loss):
        calls.append((epoch, step))
        loss.kl_weight = min(step / 10, 1.0)

    def resample(x, generator):
        seeds.append(generator.initial_seed())
        return x + 0.1 * torch.randn(x.shape, generator=generator)

    with pyro.settings.context(module_local_params=True):
        built, data = build()
        module = PyroLightningModule(
            built.model,
            built.guide,
            Trace_IWELBO(2),
            data[:96],
            validation=Validation(data[96:]),
            batch_size=8,
            schedule=schedule,
            resample=resample,
            seed=7,
        )
        _trainer(max_epochs=2, num_sanity_val_steps=0).fit(module)
    steps = steps_per_epoch(96, 8)
    assert steps == 12 and calls == [(s // steps, s) for s in range(2 * steps)]
    assert module.loss.kl_weight == 1.0
    # a generator per epoch, seeded by (seed, epoch); the warm-up's by the seed alone
    assert len(seeds) == 3 and seeds[0] == 7 and len(set(seeds)) == 3
    history = module.history
    assert history.epochs == 2 and history.steps == 24 and len(history.step_losses) == 24
    for epoch in range(2):  # twelve steps of eight rows each
        steps_of_epoch = history.step_losses[epoch * steps : (epoch + 1) * steps]
        assert history.train_loss[epoch] == pytest.approx(sum(steps_of_epoch) / steps)
    assert history.best_epoch == max(range(2), key=history.valid_bound.__getitem__)
    assert len(history.epoch_time) == 2 and all(t > 0 for t in history.epoch_time)


def test_steps_per_epoch_drops_the_rows_ddp_cannot_share():
    assert steps_per_epoch(96, 8, 2) == 6
    assert steps_per_epoch(97, 8, 2) == 6  # 48 rows per worker
    assert steps_per_epoch(100, 8, 1) == 13  # one process keeps the short last step


def test_the_deprecated_validation_keywords_warn_and_build_the_same_module():
    from lightning_job import build

    with pyro.settings.context(module_local_params=True):
        built, data = build()
        args = (built.model, built.guide, built.loss, data[:96])
        loss = Trace_IWELBO(2)
        new = PyroLightningModule(
            *args, batch_size=8, validation=Validation(data[96:], batch_size=16, loss=loss)
        )
        with pytest.warns(FutureWarning) as warned:
            old = PyroLightningModule(
                *args, batch_size=8, valid=data[96:], valid_batch_size=16, valid_loss=loss
            )
        with pytest.raises(ValueError, match="as the deprecated valid=, not both"):
            PyroLightningModule(
                *args, batch_size=8, validation=Validation(data[96:]), valid=data[96:]
            )
        with pytest.raises(TypeError, match="unexpected keyword argument 'valid_size'"):
            PyroLightningModule(*args, batch_size=8, valid_size=16)
    assert sorted(str(w.message) for w in warned) == [
        "PyroLightningModule: valid= is deprecated and will be removed in the next release; "
        "pass validation=Validation(valid)",
        "PyroLightningModule: valid_batch_size= is deprecated and will be removed in the next "
        "release; pass validation=Validation(valid, batch_size=...)",
        "PyroLightningModule: valid_loss= is deprecated and will be removed in the next "
        "release; pass validation=Validation(valid, loss=...)",
    ]
    for module in (new, old):
        assert torch.equal(module.valid_data, data[96:]) and module.valid_loss is loss
        assert module.valid_batch_size == 16 and len(module.val_dataloader()) == 4  # 64 rows
