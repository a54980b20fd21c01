import dataclasses
import math
import random

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian, exact_encoder
from pyro.nn import PyroModule
from torch import nn

from pyro_amortized import AutoAmortizedNormal, Trace_IWELBO
from pyro_amortized.optim import Adam
from pyro_amortized.training import Checkpoint, History, Validation, fit


class TinyVAE(PyroModule):
    """12-d binary data, a 2-d local latent per row and a global 12-d logit offset."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(2, 12)

    def forward(self, x, idx=None):
        offset = pyro.sample("offset", dist.Normal(x.new_zeros(12), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample=idx) as ind:
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            logits = self.decoder(z) + offset
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x.index_select(0, ind))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    train = torch.bernoulli(torch.full((60, 12), 0.3), generator=g)
    valid = torch.bernoulli(torch.full((20, 12), 0.3), generator=g)
    return train, valid


def build(optim=Adam, lr=0.01):
    """Fresh model, guide, objective and optimizer, as a new process would build them."""
    model = TinyVAE()
    guide = AutoAmortizedNormal(model, hidden_dims=(8,))
    return model, guide, Trace_IWELBO(3), optim({"lr": lr})


def run(data, epochs, **kwargs):
    train, valid = data
    model, guide, loss, optimizer = build(**kwargs.pop("build", {}))
    options = {"validation": Validation(valid), "batch_size": 16, "progress": False, **kwargs}
    history = fit(model, guide, loss, train, epochs=epochs, optimizer=optimizer, **options)
    return history, model, guide


def params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def new_process():
    """What a restarted process has: an empty param store and unrelated RNG states."""
    pyro.clear_param_store()
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)


def assert_same_params(expected, actual):
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def fused_adam(options):
    return Adam({**options, "fused": True})  # its step count is a tensor in the state


@pytest.mark.parametrize(
    "optim", [Adam, fused_adam, pyro.optim.Adam], ids=["joint", "joint-fused", "pyro"]
)
def test_resume_continues_exactly(data, tmp_path, optim):
    pyro.set_rng_seed(1)
    full, *_ = run(data, 4, checkpoint=tmp_path / "a.pt", build={"optim": optim})
    expected = params()

    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    first, *_ = run(data, 2, checkpoint=tmp_path / "b.pt", build={"optim": optim})
    assert first.step_losses == full.step_losses[:8]
    new_process()
    resumed, *_ = run(data, 4, checkpoint=tmp_path / "b.pt", build={"optim": optim})

    assert len(resumed.step_losses) == 16 and resumed.steps == 16
    assert resumed.step_losses[8:] == full.step_losses[8:]  # bit for bit
    assert resumed.train_loss == full.train_loss
    assert resumed.valid_bound == full.valid_bound
    assert resumed.best_epoch == full.best_epoch
    assert_same_params(expected, params())


def test_resume_in_the_same_process_after_an_interruption(data, tmp_path):
    # The optimizer has stepped past the checkpoint when the run is interrupted; calling
    # fit again with the same objects must go back to the checkpoint's state exactly.
    pyro.set_rng_seed(1)
    full, *_ = run(data, 4)
    expected = params()

    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    train, valid = data
    model, guide, loss, optimizer = build()

    def interrupt(epoch, step, loss):
        if step == 10:  # epoch 2, after the checkpoint of epochs 0 and 1
            raise KeyboardInterrupt

    options = {"validation": Validation(valid), "batch_size": 16, "progress": False}
    options["optimizer"] = optimizer
    with pytest.raises(KeyboardInterrupt):
        fit(
            model,
            guide,
            loss,
            train,
            epochs=4,
            schedule=interrupt,
            checkpoint=tmp_path / "c.pt",
            **options,
        )
    resumed = fit(model, guide, loss, train, epochs=4, checkpoint=tmp_path / "c.pt", **options)
    assert resumed.step_losses == full.step_losses
    assert_same_params(expected, params())


def test_checkpoint_write_is_atomic(data, tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    pyro.set_rng_seed(1)
    full, *_ = run(data, 4)

    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    run(data, 2, checkpoint=path)

    def crash(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    new_process()
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        run(data, 4, checkpoint=path)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # the .tmp is gone
    state = torch.load(path, weights_only=True)
    assert state["completed_epochs"] == 2
    new_process()
    resumed, *_ = run(data, 4, checkpoint=path)
    assert resumed.step_losses == full.step_losses


# the objective warns of the NaN as Pyro's ELBOs do, before fit stops on it
@pytest.mark.filterwarnings("ignore:Encountered NaN")
@pytest.mark.parametrize(
    "bad_step, checkpoint, message",
    [
        (5, True, r"epoch 1, step 1 \(global step 5\); the last good checkpoint is .*run\.pt"),
        (2, True, r"epoch 0, step 2 \(global step 2\); no checkpoint was written yet"),
        (6, False, r"epoch 1, step 2 \(global step 6\); no checkpoint was requested"),
    ],
)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    data, tmp_path, bad_step, checkpoint, message
):
    path = tmp_path / "run.pt"

    def poison(epoch, step, loss):
        if step == bad_step:
            loss.entropy_weight = math.nan

    kwargs = {"checkpoint": path} if checkpoint else {}
    with pytest.raises(FloatingPointError, match="loss became nan at " + message):
        run(data, 4, schedule=poison, **kwargs)
    if not checkpoint or bad_step < 4:
        assert not path.exists()
        return
    state = torch.load(path, weights_only=True)
    assert state["completed_epochs"] == 1
    assert len(state["history"]["step_losses"]) == 4
    assert all(math.isfinite(v) for v in state["params"]["decoder$$$weight"].flatten().tolist())
    new_process()
    resumed, *_ = run(data, 3, checkpoint=path)
    assert resumed.epochs == 3 and all(math.isfinite(v) for v in resumed.step_losses)


def test_early_stopping_on_the_validation_bound(data, tmp_path):
    # No learning (lr 0) and a schedule that pushes every logit up by 0.5 a step: with
    # 30% ones in the data the validation bound falls every epoch, by far more than its
    # Monte Carlo noise, so the first epoch is the best one.
    model_holder = {}

    def worsen(epoch, step, loss):
        with torch.no_grad():
            model_holder["model"].decoder.bias.add_(0.5)

    train, valid = data
    model, guide, loss, optimizer = build(optim=pyro.optim.SGD, lr=0.0)
    model_holder["model"] = model
    path = tmp_path / "run.pt"
    options = {"batch_size": 16, "optimizer": optimizer, "progress": False, "checkpoint": path}

    def train_with_patience(patience, **kwargs):
        validation = Validation(valid, patience=patience)
        return fit(model, guide, loss, train, epochs=20, validation=validation, **options, **kwargs)

    history = train_with_patience(2, schedule=worsen)
    assert history.epochs == 3 and history.steps == 12
    assert history.stopped_early and history.best_epoch == 0
    assert history.valid_bound[0] > history.valid_bound[1] > history.valid_bound[2]
    assert torch.load(path, weights_only=True)["history"]["stopped_early"]

    # Resuming with the same patience trains nothing; more patience trains on.
    again = train_with_patience(2)
    assert again.stopped_early and again.steps == 12
    more = train_with_patience(3, schedule=worsen)
    assert more.epochs == 4 and more.stopped_early and more.best_epoch == 0


@pytest.mark.parametrize("batch_size", [16, 100], ids=["minibatch", "full-batch"])
def test_validation_bound_is_the_bound_per_datapoint(batch_size):
    # With the exact posterior as the guide every sample of the bound is log p(x), so the
    # chunked and unchunked validation bounds can be compared to each other and to the
    # evidence at float precision.
    model = LinearGaussian()
    train, valid = model.sample(40), model.sample(25)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model))
    loss = Trace_IWELBO(3)
    bounds = {}
    for chunk in (7, 16, 25):
        model.seen_indices.clear()
        history = fit(
            model,
            guide,
            loss,
            train,
            validation=Validation(valid, batch_size=chunk),
            epochs=1,
            batch_size=batch_size,
            optimizer=pyro.optim.SGD({"lr": 0.0}),
            progress=False,
        )
        bounds[chunk] = history.valid_bound[0]
        # The guide's plate, replayed into the model, decides which rows the model sees:
        # the minibatches and chunks must get there (the warm-up shows the guide the
        # indices even when training is full-batch).
        seen = {len(ind) for ind in model.seen_indices}
        if batch_size == 16:
            assert {16, 8} <= seen  # the minibatches of 40 rows
        if chunk < 25:
            assert {chunk, 25 % chunk} <= seen and 25 not in seen
    direct = -loss.loss(model, guide, valid) / len(valid)
    evidence = model.log_evidence(valid).mean().item()
    assert bounds[25] == pytest.approx(direct, rel=1e-6)
    assert bounds[7] == pytest.approx(bounds[25], rel=1e-6)
    assert bounds[16] == pytest.approx(bounds[25], rel=1e-6)
    assert bounds[25] == pytest.approx(evidence, rel=1e-5)


def test_history_and_step_counts(data):
    history, *_ = run(data, 2, validation=None)
    assert history.steps == 8 and len(history.step_losses) == 8  # 16 + 16 + 16 + 12 rows
    assert history.valid_bound == [None, None] and history.best_epoch is None
    assert len(history.epoch_time) == 2 and all(t > 0 for t in history.epoch_time)
    # The epoch's loss is its steps' losses weighted by their batch sizes.
    weights = [16, 16, 16, 12]
    expected = sum(w * v for w, v in zip(weights, history.step_losses[:4], strict=True)) / 60
    assert history.train_loss[0] == pytest.approx(expected, rel=1e-12)
    assert History.from_dict(history.to_dict()) == history


def test_progress_false_prints_nothing(data, capsys):
    run(data, 2, progress=False)
    assert capsys.readouterr() == ("", "")


def test_progress_bar_shows_loss_and_bound(data, capsys):
    run(data, 2, progress=True)
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "loss=" in err and "valid=" in err


@pytest.mark.parametrize(
    "change, match",
    [
        ({"epochs": 0}, "epochs must be an int >= 1"),
        ({"epochs": 2.0}, "epochs must be an int >= 1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"train": torch.zeros(0, 12)}, "train must be a tensor with at least one row"),
        ({"train": [[0.0] * 12]}, "train must be a tensor with at least one row"),
        ({"validation": Validation(torch.zeros(5, 3))}, r"valid rows have shape \(3,\)"),
        ({"validation": torch.zeros(5, 12)}, "validation must be None or a Validation"),
        ({"loss": lambda model, guide: 0.0}, "loss must be a pyro.infer.ELBO"),
        ({"optimizer": torch.optim.Adam}, "optimizer must be a pyro.optim.PyroOptim"),
        ({"schedule": 3}, "schedule must be None or a callable"),
        ({"checkpoint": 3}, "checkpoint must be None or a path"),
        ({"seed": "0"}, "seed must be an int"),
        ({"progress": 1}, "fit: progress must be a bool, got 1"),
        ({"epochs": True}, r"fit: epochs must be an int >= 1, got True"),
    ],
)
def test_bad_arguments(data, change, match):
    train, valid = data
    model, guide, loss, optimizer = build()
    arguments = {"model": model, "guide": guide, "loss": loss, "train": train}
    options = {"epochs": 1, "batch_size": 16, "optimizer": optimizer, "progress": False}
    arguments.update(options, validation=Validation(valid))
    arguments.update(change)
    with pytest.raises(ValueError, match=match):
        fit(**arguments)


@pytest.mark.parametrize(
    "device, match",
    [
        ("gpu", "fit: device must be None, a torch.device or a device string such as 'cpu'"),
        (0, "fit: device must be None, a torch.device or a device string .*, got 0"),
        (True, "fit: device must be None, a torch.device or a device string .*, got True"),
        pytest.param(
            "cuda",
            "fit: device='cuda' but this machine has no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bad_device(data, device, match):
    train, valid = data
    model, guide, loss, optimizer = build()
    with pytest.raises(ValueError, match=match):
        fit(model, guide, loss, train, epochs=1, batch_size=16, optimizer=optimizer,
            validation=Validation(valid), device=device, progress=False)  # fmt: skip


def test_validation_data_on_another_device_than_train_is_refused(data):
    train, valid = data
    model, guide, loss, optimizer = build()
    with pytest.raises(ValueError, match="fit: the validation data is on meta but train is on cpu"):
        fit(model, guide, loss, train, epochs=1, batch_size=16, optimizer=optimizer,
            validation=Validation(valid.to("meta")), progress=False)  # fmt: skip


def test_device_cpu_trains_as_without_a_device(data, tmp_path):
    path = tmp_path / "run.pt"
    first, *_ = run(data, 2)
    new_process()
    pyro.set_rng_seed(0)  # as for the first run
    second, *_ = run(data, 1, device=torch.device("cpu"), checkpoint=path)
    assert second.step_losses == first.step_losses[: len(second.step_losses)]
    state = torch.load(path, weights_only=True)
    assert state["config"]["device"] == "cpu"
    # a checkpoint written before the device was recorded was written on the CPU
    del state["config"]["device"]
    torch.save(state, path)
    new_process()
    resumed, *_ = run(data, 2, device="cpu", checkpoint=path)
    assert resumed.step_losses == first.step_losses


@pytest.mark.parametrize(
    "change, match",
    [
        ({"valid": torch.zeros(5, 3)}, r"valid rows have shape \(3,\)"),
        ({"valid_batch_size": 0}, "valid_batch_size must be None or an int >= 1"),
        ({"patience": 0}, "patience must be None or an int >= 1"),
        ({"patience": True}, "fit: patience must be None or an int >= 1, got True"),
        ({"patience": 2, "valid": None}, "patience needs a validation set"),
        ({"valid_loss": 3}, "Validation: loss must be None .* or a pyro.infer.ELBO, got int"),
        ({"resume": 1, "checkpoint": "run.pt"}, "fit: resume must be a bool, got 1"),
    ],
)
def test_bad_deprecated_keywords(data, change, match):
    train, valid = data
    model, guide, loss, optimizer = build()
    arguments = {"model": model, "guide": guide, "loss": loss, "train": train, "valid": valid}
    options = {"epochs": 1, "batch_size": 16, "optimizer": optimizer, "progress": False}
    arguments.update(options)
    arguments.update(change)
    with pytest.warns(FutureWarning, match="is deprecated"):
        with pytest.raises(ValueError, match=match):
            fit(**arguments)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x: Validation(torch.zeros(0, 12)), "Validation: data must be a tensor with at"),
        (lambda x: Validation(torch.tensor(1.0)), r"at least one row .*, got shape \(\)"),
        (lambda x: Validation(x.tolist()), "Validation: data must be a tensor .*, got list"),
        (lambda x: Validation(x, batch_size=0), "Validation: batch_size must be None or an int"),
        (
            lambda x: Validation(x, batch_size=True),
            r"batch_size must be None or an int >= 1, got T",
        ),
        (lambda x: Validation(x, batch_size=2.0), r"batch_size must be None or an int >= 1, got 2"),
        (
            lambda x: Validation(x, loss=lambda m, g: 0),
            "Validation: loss must be None .* pyro.infer.ELBO, got function",
        ),
        (lambda x: Validation(x, patience=0), "Validation: patience must be None or an int >= 1"),
        (lambda x: Validation(x, patience=True), "Validation: patience must be .*, got True"),
        (lambda x: Checkpoint(3), "Checkpoint: path must be a str or an os.PathLike"),
        (lambda x: Checkpoint(None), "Checkpoint: path must be a str or an os.PathLike"),
        (lambda x: Checkpoint("run.pt", resume=1), "Checkpoint: resume must be a bool, got 1"),
    ],
)
def test_bad_options(data, make, match):
    with pytest.raises(ValueError, match=match):
        make(data[1])


def test_options_are_frozen_values_with_keyword_options(data, tmp_path):
    valid = data[1]
    validation = Validation(valid, batch_size=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        validation.batch_size = 6
    with pytest.raises(TypeError):
        Validation(valid, 5)  # the options after the data are keywords
    with pytest.raises(TypeError):
        Checkpoint(tmp_path / "run.pt", False)
    checkpoint = Checkpoint(str(tmp_path / "run.pt"))
    assert checkpoint == Checkpoint(tmp_path / "run.pt") and checkpoint.path == tmp_path / "run.pt"
    assert checkpoint.resume
    # a Validation holds a tensor: it equals itself only
    assert validation == validation and validation != Validation(valid, batch_size=5)
    assert repr(validation).startswith("Validation(data=<tensor of shape (20, 12)>, batch_size=5")


def test_resume_rejects_another_configuration_or_file(data, tmp_path):
    path = tmp_path / "run.pt"
    run(data, 1, checkpoint=path)
    new_process()
    with pytest.raises(
        ValueError, match="written with batch_size=16 but this call has batch_size=8"
    ):
        run(data, 2, checkpoint=path, batch_size=8)
    new_process()
    again = run(data, 1, checkpoint=Checkpoint(path, resume=False), batch_size=8)
    assert again[0].epochs == 1

    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    new_process()
    with pytest.raises(ValueError, match=r"not a fit\(\) checkpoint"):
        run(data, 2, checkpoint=other)


def test_a_guide_that_ignores_the_minibatch_indices_is_rejected(data):
    # A guide whose plate runs over all rows whatever idx says: Pyro would replay it into
    # the model at every step, and every "minibatch" would silently be the whole set.
    train, _ = data
    model, _, loss, optimizer = build()

    def guide(x, idx=None):
        pyro.sample(
            "offset", dist.Normal(pyro.param("offset_loc", torch.zeros(12)), 1.0).to_event(1)
        )
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    with pytest.raises(ValueError, match="the guide's plate 'data' still holds 60 of the 60 rows"):
        fit(model, guide, loss, train, epochs=1, batch_size=16, optimizer=optimizer, progress=False)


def test_an_autoguide_first_called_on_all_rows_still_follows_the_minibatches(data):
    train, _ = data
    model, guide, loss, optimizer = build()
    guide(train)  # the first call runs the whole plate; idx is found by probing
    history = fit(
        model, guide, loss, train, epochs=1, batch_size=16, optimizer=optimizer, progress=False
    )
    assert len(history.step_losses) == 4


def test_resample_draws_each_epoch_from_fits_generator_and_resumes_exactly(data, tmp_path):
    grey = torch.rand(60, 12, generator=torch.Generator().manual_seed(3))
    seen = []

    def binarize(x, generator):
        sample = torch.bernoulli(x, generator=generator)
        seen.append(sample)
        return sample

    def train_for(epochs, checkpoint):
        pyro.clear_param_store()
        model, guide, loss, optimizer = build()
        return fit(
            model,
            guide,
            loss,
            grey,
            epochs=epochs,
            batch_size=16,
            optimizer=optimizer,
            checkpoint=checkpoint,
            progress=False,
            resample=binarize,
        )

    pyro.set_rng_seed(0)
    whole = train_for(3, tmp_path / "a.pt")
    draws = seen[1:]  # seen[0] is the warm-up's draw, from a generator of its own
    assert len(draws) == 3 and not torch.equal(draws[0], draws[1])
    assert all(set(s.unique().tolist()) <= {0.0, 1.0} for s in seen)
    pyro.set_rng_seed(0)
    train_for(1, tmp_path / "b.pt")
    torch.manual_seed(12345)  # scramble: resume must restore everything
    resumed = train_for(3, tmp_path / "b.pt")
    assert resumed.step_losses == whole.step_losses
    assert torch.equal(seen[-1], draws[-1])
    with pytest.raises(ValueError, match="resample must be None or a callable"):
        fit(*build()[:3], grey, epochs=1, batch_size=16, optimizer=build()[3], resample=3)


def test_validation_runs_the_model_and_guide_in_eval_mode(data):
    # As torch's convention has it (dropout off; a SemiAmortizedGuide refines); the
    # training steps stay in training mode, and both are left as they were found.
    train, valid = data
    model, guide, loss, optimizer = build()
    seen = []

    class Recording(nn.Module):
        def __init__(self, guide):
            super().__init__()
            self.guide = guide
            self.local_plate = guide.local_plate

        def forward(self, *args, **kwargs):
            seen.append((self.training, model.training, torch.is_grad_enabled()))
            return self.guide(*args, **kwargs)

    recording = Recording(guide)
    options = {"validation": Validation(valid), "epochs": 1, "batch_size": 30, "progress": False}
    fit(model, recording, loss, train, optimizer=optimizer, **options)
    assert (True, True, True) in seen  # the training steps
    assert seen[-1] == (False, False, False)  # the validation, last
    assert recording.training and model.training


def test_history_add_epoch_keeps_the_best_bound():
    history = History()
    history.add_epoch(5.0, None, 0.1)
    assert history.best_epoch is None
    for loss, bound in ((4.0, -3.0), (3.0, -2.0), (2.5, -2.5), (2.0, -2.0)):
        history.add_epoch(loss, bound, 0.1)
    # the first epoch of the highest bound: a tie does not move it
    assert history.best_epoch == 2 and history.epochs == 5
    assert history.valid_bound == [None, -3.0, -2.0, -2.5, -2.0]


def _figures(history: History) -> dict:
    """A history without its epoch times, which no two runs share."""
    return {k: v for k, v in history.to_dict().items() if k != "epoch_time"}


def test_the_deprecated_validation_keywords_warn_and_train_as_their_new_spelling(data):
    train, valid = data

    def train_with(**options):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        model, guide, loss, optimizer = build()
        history = fit(
            model, guide, loss, train, epochs=4, batch_size=16, optimizer=optimizer, **options
        )
        return history, params()

    # an unannealed objective of its own, in chunks of 7 rows, early stopping after 1 epoch
    new, expected = train_with(
        validation=Validation(valid, batch_size=7, loss=Trace_IWELBO(5), patience=1),
        progress=False,
    )
    with pytest.warns(FutureWarning) as warned:
        old, actual = train_with(
            valid=valid, valid_batch_size=7, valid_loss=Trace_IWELBO(5), patience=1, progress=False
        )
    assert sorted(str(w.message) for w in warned) == [
        "fit: patience= is deprecated and will be removed in the next release; pass "
        "validation=Validation(valid, patience=...)",
        "fit: valid= is deprecated and will be removed in the next release; pass "
        "validation=Validation(valid)",
        "fit: valid_batch_size= is deprecated and will be removed in the next release; pass "
        "validation=Validation(valid, batch_size=...)",
        "fit: valid_loss= is deprecated and will be removed in the next release; pass "
        "validation=Validation(valid, loss=...)",
    ]
    assert all(w.filename == __file__ for w in warned)  # the caller's line
    assert _figures(old) == _figures(new) and None not in new.valid_bound
    assert_same_params(expected, actual)
    # a flat chunk size or objective without validation data is ignored, as it was
    with pytest.warns(FutureWarning, match="valid_batch_size= is deprecated"):
        alone, _ = train_with(valid_batch_size=7, progress=False)
    assert alone.valid_bound == [None] * 4


def test_the_deprecated_resume_keyword_warns_and_resumes_as_checkpoint_does(data, tmp_path):
    path = tmp_path / "run.pt"
    pyro.set_rng_seed(1)
    run(data, 1, checkpoint=path)
    deprecated = r"resume= is deprecated .*; pass checkpoint=Checkpoint\(path, resume=\.\.\.\)"
    with pytest.warns(FutureWarning, match=deprecated):
        fresh, *_ = run(data, 2, checkpoint=path, resume=False)  # overwritten: starts over
    assert fresh.steps == 8
    new_process()
    with pytest.warns(FutureWarning, match=deprecated):
        resumed, *_ = run(data, 3, checkpoint=path, resume=True)
    assert resumed.steps == 12 and resumed.step_losses[:8] == fresh.step_losses
    new_process()
    again, *_ = run(data, 3, checkpoint=Checkpoint(str(path), resume=True))
    assert again.step_losses == resumed.step_losses  # nothing left to train
    with pytest.warns(FutureWarning, match=deprecated):
        alone, *_ = run(data, 1, resume=False)  # no checkpoint: nothing to resume, as before
    assert alone.epochs == 1


def test_an_option_given_in_both_spellings_is_refused(data, tmp_path):
    train, valid = data
    model, guide, loss, optimizer = build()
    options = {"epochs": 1, "batch_size": 16, "optimizer": optimizer, "progress": False}
    both = "validation=Validation\\(...\\) or as the deprecated patience=, valid_loss=, not both"
    with pytest.raises(ValueError, match=both):
        fit(
            model,
            guide,
            loss,
            train,
            validation=Validation(valid),
            patience=2,
            valid_loss=loss,
            **options,
        )
    with pytest.raises(
        ValueError, match=r"resume either in checkpoint=Checkpoint\(path, .*not both"
    ):
        fit(
            model,
            guide,
            loss,
            train,
            checkpoint=Checkpoint(tmp_path / "run.pt"),
            resume=False,
            **options,
        )
    with pytest.raises(
        TypeError, match="fit\\(\\) got an unexpected keyword argument 'valid_size'"
    ):
        fit(model, guide, loss, train, valid_size=10, **options)
    assert not (tmp_path / "run.pt").exists()


def test_validation_bound_outside_fit_needs_an_objective(data):
    model, guide, loss, _ = build()
    with pytest.raises(
        ValueError, match=r"Validation.bound needs an objective: pass Validation\(data, loss="
    ):
        Validation(data[1]).bound(model, guide)
