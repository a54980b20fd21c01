import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_amortized.optim
from pyro_amortized import (
    AutoAmortizedNormal,
    CyclicalSchedule,
    LinearSchedule,
    Trace_IWELBO,
    fit,
)


def test_linear_schedule_ramps_then_holds():
    schedule = LinearSchedule(0.0, 1.0, 4)
    assert [schedule.value(t) for t in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    down = LinearSchedule(2.0, 1.0, 2, attribute="kl_weight")
    assert [down.value(t) for t in range(3)] == [2.0, 1.5, 1.0]


def test_cyclical_schedule_repeats_its_ramp():
    schedule = CyclicalSchedule(0.0, 1.0, 16, cycles=2, ratio=0.5)
    values = [schedule.value(t) for t in range(18)]
    assert values[:8] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert values[8:16] == values[:8]  # the second cycle
    assert values[16:] == [1.0, 1.0]  # after the last cycle: held at the end
    assert schedule.attribute == "kl_weight"


@pytest.mark.parametrize("attribute", ["entropy_weight", "kl_weight"])
def test_fit_sets_the_weight_before_every_step(attribute):
    def model(x, idx=None):
        with pyro.plate("data", x.shape[0], subsample=idx) as ind:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[ind])

    x = torch.randn(20, 2)
    guide = AutoAmortizedNormal(model, hidden_dims=(4,))
    loss = Trace_IWELBO(2)
    schedule = LinearSchedule(0.0, 1.0, 10, attribute=attribute)
    seen = []

    def spy(epoch, step, objective):
        schedule(epoch, step, objective)
        seen.append(getattr(objective, attribute))

    fit(
        model,
        guide,
        loss,
        x,
        epochs=3,
        batch_size=5,
        optimizer=pyro_amortized.optim.Adam({"lr": 1e-3}),
        schedule=spy,
        progress=False,
    )
    assert seen == [min(t / 10, 1.0) for t in range(12)]
    assert getattr(loss, attribute) == 1.0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LinearSchedule(0.0, 1.0, 0), "steps must be an int >= 1"),
        (lambda: LinearSchedule(0.0, float("nan"), 5), "end must be a finite number"),
        (lambda: LinearSchedule(0.0, 1.0, 5, attribute="kl weight"), "attribute must name"),
        (lambda: CyclicalSchedule(0.0, 1.0, 10, cycles=0), "cycles must be an int >= 1"),
        (lambda: CyclicalSchedule(0.0, 1.0, 10, ratio=0.0), r"ratio must be in \(0, 1\]"),
        (lambda: LinearSchedule(0.0, 1.0, True), "LinearSchedule: steps must be an int >= 1"),
        (lambda: LinearSchedule(True, 1.0, 5), "LinearSchedule: start must be a finite number"),
        (lambda: CyclicalSchedule(0.0, 1.0, 10, cycles=2.0), "cycles must be an int >= 1"),
        (lambda: CyclicalSchedule(0.0, 1.0, 10, ratio=float("nan")), r"ratio must be in \(0, 1\]"),
        (lambda: CyclicalSchedule(0.0, 1.0, 10, ratio=1.5), r"ratio must be in \(0, 1\], got 1.5"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_an_objective_without_the_attribute_is_named():
    schedule = LinearSchedule(0.0, 1.0, 5, attribute="beta")
    with pytest.raises(ValueError, match="Trace_IWELBO.*no attribute 'beta'"):
        schedule(0, 0, Trace_IWELBO(1))
