import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from models._vae_training import train_lightning
from models.datasets import load_dataset
from models.vae import VAE, build, main, parse_args, train
from pyro_amortized import AutoAmortizedNormal, Trace_IWELBO


def test_vae_cli_runs_one_epoch_on_digits(tmp_path, capsys):
    results = main(
        ["--epochs", "1", "--out", str(tmp_path), "--no-progress", "--eval-samples", "20"]
        + ["--hidden", "16", "--latent", "2"]
    )
    assert all(math.isfinite(v) for v in results.values())
    for name in ("curves", "data", "reconstructions", "samples", "posteriors"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / "checkpoint.pt").exists()
    printed = capsys.readouterr().out
    assert "test log p(x) (IWAE-20)" in printed and "time per epoch" in printed
    assert "test ELBO" in printed  # K=5 by default: the ELBO is reported beside the bound
    # ELBO surgery beside the active units: KL = I_q[n; z] + KL(q(z) || p(z)) on the test set
    assert "test mutual information I_q[n; z]" in printed and "test marginal KL" in printed
    kl, mi = results["test average_kl"], results["test mutual_information"]
    assert kl == pytest.approx(mi + results["test marginal_kl"], abs=1e-9)


def test_vae_cli_patience_zero_trains_every_epoch_and_validate_runs(tmp_path):
    # fit itself takes patience=None for "never stop early" and rejects 0
    common = ["--out", str(tmp_path), "--no-progress", "--eval-samples", "2", "--validate"]
    common += ["--hidden", "8", "--latent", "2", "--epochs", "3"]
    main(common + ["--patience", "0"])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["completed_epochs"] == 3 and not state["history"]["stopped_early"]


@pytest.mark.parametrize("guide", ["iaf", "flow"])
def test_vae_cli_with_flow_guides(tmp_path, guide):
    estimator = "iwae" if guide == "iaf" else "dreg"  # the IAF's inverse makes DReG slow
    results = main(
        ["--epochs", "1", "--out", str(tmp_path), "--no-progress", "--eval-samples", "20"]
        + ["--hidden", "16", "--latent", "2", "--guide", guide, "--estimator", estimator]
    )
    assert all(math.isfinite(v) for v in results.values())
    if guide == "iaf":
        assert (tmp_path / "posteriors.png").stat().st_size > 1000
    # the auxiliary flow's q(z | x) has no density, so no surgery; the IAF's has one
    assert ("test mutual_information" in results) == (guide == "iaf")


@pytest.mark.parametrize("trainer", ["fit", "lightning"])
def test_vae_cli_warmup_and_entropy_annealing_ramp_per_step(tmp_path, trainer):
    args = parse_args(
        ["--epochs", "1", "--warmup", "2", "--anneal-entropy", "1", "--no-progress"]
        + ["--hidden", "8", "--latent", "2", "--trainer", trainer]
    )
    data = load_dataset("digits")
    with pyro.settings.context(module_local_params=trainer == "lightning"):
        model, guide, loss = build(args, data.train)
        if trainer == "fit":
            history = train(args, model, guide, loss, data, tmp_path / "checkpoint.pt")
        else:
            history, rank_zero = train_lightning(args, model, guide, loss, data, tmp_path)
            assert rank_zero
    steps = math.ceil(len(data.train) / args.batch_size)  # one epoch; the last step is steps - 1
    assert history.steps == steps
    assert loss.kl_weight == pytest.approx((steps - 1) / (2 * steps))
    assert loss.entropy_weight == pytest.approx((steps - 1) / steps)
    assert math.isfinite(history.valid_bound[0])


# resuming, Lightning warns that it writes into a directory of checkpoints
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_vae_cli_on_lightning_writes_checkpoints_and_logs_and_resumes(tmp_path, capsys):
    common = ["--trainer", "lightning", "--out", str(tmp_path), "--no-progress"]
    common += ["--eval-samples", "5", "--hidden", "8", "--latent", "2"]
    results = main(common + ["--epochs", "1"])
    assert all(math.isfinite(v) for v in results.values())
    assert "| epochs | 1 (best 0) |" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "best.ckpt").exists()
    # the same --out again: Lightning resumes from last.ckpt and trains the second epoch only
    main(common + ["--epochs", "2"])
    assert "| epochs | 2 (best " in capsys.readouterr().out
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["epoch"] == 1 and len(state["history"]["train_loss"]) == 2
    logged = []
    for run in ("version_0", "version_1"):
        with open(tmp_path / "lightning" / run / "metrics.csv") as file:
            logged.append([int(r["epoch"]) for r in csv.DictReader(file) if r["valid_bound"]])
    assert logged == [[0], [1]]
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_vae_cli_on_two_ddp_processes(tmp_path):
    from pyro_amortized.lightning import steps_per_epoch

    command = [sys.executable, "-m", "models.vae", "--trainer", "lightning", "--devices", "2"]
    command += ["--strategy", "ddp", "--accelerator", "cpu", "--epochs", "2", "--warmup", "1"]
    command += ["--out", str(tmp_path), "--no-progress", "--eval-samples", "5"]
    command += ["--hidden", "8", "--latent", "2"]
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # both workers ran the script; rank 0 alone reports
    assert result.stdout.count("scikit-learn's bundled") == 1
    assert result.stdout.count("| test log p(x) (IWAE-5) |") == 1
    history = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["history"]
    assert history["steps"] == 2 * steps_per_epoch(1297, 100, 2) == 14
    assert len(history["train_loss"]) == 2 and all(map(math.isfinite, history["valid_bound"]))


@pytest.mark.parametrize("guide", ["normal", "iaf"])
def test_vae_cli_gaps_table_and_files(tmp_path, capsys, guide):
    results = main(
        ["--epochs", "1", "--out", str(tmp_path), "--no-progress", "--eval-samples", "20"]
        + ["--hidden", "16", "--latent", "2", "--guide", guide, "--gaps", "10"]
        + ["--gap-max-steps", "20"]
    )
    out = capsys.readouterr().out
    assert "| amortization gap |" in out and "| L[q*_flow] |" in out
    saved = json.loads((tmp_path / "gaps.json").read_text())
    assert saved["family"] == guide
    assert len(saved["per_datapoint"]["log_px"]) == 10
    assert max(saved["per_datapoint"][f"steps_{guide}"]) == 20
    assert results["gaps: inference gap"] == pytest.approx(saved["mean"]["inference gap"])
    assert (tmp_path / "gaps.png").stat().st_size > 1000


def test_output_bias_starts_at_the_logit_of_the_pixel_means():
    mean = torch.tensor([0.1, 0.5, 0.9])
    vae = VAE(3, latent_dim=2, hidden_dims=(4,), pixel_mean=mean)
    assert torch.allclose(vae.decoder[-1].bias, mean.logit())


def test_gaussian_likelihood_and_elu():
    x = torch.randn(30, 5)
    vae = VAE(5, latent_dim=2, hidden_dims=(8,), activation="elu", likelihood="normal")
    guide = AutoAmortizedNormal(vae, hidden_dims=(8,))
    svi = pyro.infer.SVI(vae, guide, pyro.optim.Adam({"lr": 0.01}), Trace_IWELBO(3))
    losses = [svi.step(x, torch.arange(10)) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(likelihood="poisson"), "likelihood"), (dict(activation="relu6"), "activation")],
)
def test_bad_vae_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAE(4, **kwargs)


def test_vae_cli_refine_steps_report_the_test_elbo_before_and_after(tmp_path):
    results = main(
        ["--epochs", "2", "--out", str(tmp_path), "--no-progress", "--eval-samples", "20"]
        + ["--hidden", "16", "--latent", "2", "--num-particles", "1", "--refine-steps", "30"]
    )
    before = results["test bound (IWAE-1)"]  # the encoder's test ELBO, one draw
    after = results["test ELBO, refined 30 steps"]
    # After 2 epochs the encoder is far from each image's best Normal. Measured: 30 steps
    # gain 1.3 to 1.5 nats, against a standard error of 0.39 for the difference of the
    # two one-draw means over the 250 test images (unpaired).
    assert after > before, (before, after)


@pytest.mark.parametrize("mode", ["savi", "sa-vae"])
def test_vae_cli_trains_with_refinement(tmp_path, capsys, mode):
    results = main(
        ["--epochs", "1", "--out", str(tmp_path), "--no-progress", "--eval-samples", "5"]
        + ["--hidden", "8", "--latent", "2", "--refine-steps", "2", "--refine-mode", mode]
    )
    assert all(math.isfinite(v) for v in results.values())
    printed = capsys.readouterr().out
    assert "test log p(x) (IWAE-5), refined 2 steps" in printed and "test ELBO |" in printed


def test_vae_cli_devices_need_the_lightning_trainer(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--devices", "2"])
    assert "--devices, --strategy and --accelerator need --trainer lightning" in (
        capsys.readouterr().err
    )


def test_vae_cli_device_cpu_gives_the_default_runs_numbers(tmp_path):
    common = ["--epochs", "1", "--no-progress", "--eval-samples", "5", "--hidden", "8"]
    common += ["--latent", "2", "--batch-size", "400"]
    default = main(common + ["--out", str(tmp_path / "default")])
    pyro.clear_param_store()
    on_cpu = main(common + ["--out", str(tmp_path / "cpu"), "--device", "cpu"])
    assert on_cpu == default
    assert parse_args([]).device == torch.device("cpu")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "gpu"], "--device must be a torch.device or a device string"),
        (["--trainer", "lightning", "--device", "cuda"], "pass --accelerator gpu, not --device"),
    ],
)
def test_vae_cli_refuses_a_bad_device(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_vae_cli_refuses_spawning_strategies(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--trainer", "lightning", "--devices", "2", "--strategy", "ddp_spawn"])
    assert "use --strategy ddp" in capsys.readouterr().err


def test_vae_cli_refine_mode_needs_refine_steps(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--refine-mode", "savi"])
    assert "--refine-mode savi trains with refinement" in capsys.readouterr().err
