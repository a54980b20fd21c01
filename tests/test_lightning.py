import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from pyro_amortized.lightning import PyroLightningModule

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


def test_the_module_needs_module_local_params():
    from lightning_job import build

    with pyro.settings.context(module_local_params=True):
        module, _ = build()
    with pyro.settings.context(module_local_params=False):
        with pytest.raises(ValueError, match="module_local_params=True"):
            PyroLightningModule(
                module.model, module.guide, module.loss, module.train_data, batch_size=8
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
    # the logged bounds are averaged over the workers
    assert first["epoch_bounds"] == second["epoch_bounds"]


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
    whole = _run(tmp_path / "whole", "--epochs", "4")[0]
    checkpoint = tmp_path / "two_epochs.ckpt"
    first = _run(tmp_path / "first", "--epochs", "2", "--save", str(checkpoint))[0]
    resumed = _run(tmp_path / "resumed", "--epochs", "4", "--ckpt-path", str(checkpoint))[0]
    assert first["epoch_bounds"] == whole["epoch_bounds"][:2]
    # the same minibatches (the sampler's order depends on seed and epoch) and the same
    # draws (the checkpoint keeps torch's RNG state): the resumed epochs are the whole run's
    assert resumed["epoch_bounds"] == whole["epoch_bounds"][2:]
    assert resumed["global_step"] == whole["global_step"] == 48
    assert all(torch.equal(resumed["params"][k], whole["params"][k]) for k in whole["params"])
