"""Saved guides scored on new data in a fresh process, run as a script by ``test_guides.py``.

``python tests/saved_guide_job.py DIR`` loads every guide that :func:`save` wrote to
``DIR/<kind>/``, each of the three ways (:data:`METHODS`), scores the new data of
``DIR/data.pt`` with it (:func:`score`) and writes ``DIR/scores.pt``: a dict from
``(kind, method)`` to the scores. The test computes the same scores in its own process,
before saving and after loading, and compares.

The model and the guides live here, at module level, so that a pickled guide finds its
model's class under the same name in both processes: ``saved_guide_job.Model``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_amortized import (
    AutoAmortizedIAF,
    AutoAmortizedNormal,
    AutoAmortizedRealNVP,
    SemiAmortizedGuide,
    Trace_IWELBO,
    log_marginal_likelihood,
    per_datapoint_elbo,
)

#: Each guide of the test, by name: a global latent (``mu``, the default AutoNormal's) and
#: two local ones in plate "data" (``z`` and the positive ``s``).
KINDS = ("normal", "iaf", "realnvp", "realnvp-plain", "semi")
#: ``torch.save`` of the guide; its ``state_dict()`` into a new guide; Pyro's param store,
#: taken by the new guide's first call or by its ``setup()``.
METHODS = ("pickle", "state_dict", "param_store", "param_store_setup")
N_TRAIN, N_NEW, SEED = 24, 7, 5


class Model(nn.Module):
    """A global shift ``mu``, a 2-d local ``z`` decoded linearly, a local noise scale ``s``."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(2, 3)

    def forward(self, x):
        # Pyro's recipe for a network that should take a loaded param store's tensors (a
        # PyroModule's nn.Parameters, as PyroModule[nn.Linear]'s, do not)
        decoder = pyro.module("decoder", self.decoder, update_module_params=True)
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
            loc = decoder(z) + mu.unsqueeze(-1)
            pyro.sample("x", dist.Normal(loc, s.unsqueeze(-1)).to_event(1), obs=x)


def make(kind: str, model: Model):
    """A new, untrained guide of ``kind`` for ``model``."""
    if kind == "normal":
        return AutoAmortizedNormal(model, hidden_dims=(8,))
    if kind == "iaf":
        return AutoAmortizedIAF(model, hidden_dims=(8,), num_transforms=2)
    if kind == "realnvp":
        return AutoAmortizedRealNVP(model, hidden_dims=(8,), num_transforms=1)
    if kind == "realnvp-plain":
        return AutoAmortizedRealNVP(model, hidden_dims=(8,), num_transforms=2, auxiliary=False)
    if kind == "semi":
        return SemiAmortizedGuide(AutoAmortizedNormal(model, hidden_dims=(8,)), num_steps=3)
    raise ValueError(kind)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows and new rows, from a generator of their own."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(N_TRAIN + N_NEW, 3, generator=generator)
    return rows[:N_TRAIN], rows[N_TRAIN:]


def train(kind: str, x: torch.Tensor, steps: int = 3) -> tuple[Model, nn.Module]:
    """A model and guide after a few SVI steps, in a cleared param store."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = Model()
    guide = make(kind, model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_IWELBO(2))
    for _ in range(steps):
        svi.step(x)
    return model, guide


def save(model: Model, guide: nn.Module, directory: Path) -> None:
    """The trained pair saved each of the three ways."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(guide, directory / "guide.pt")  # the guide holds its model
    state = {"model": model.state_dict(), "guide": guide.state_dict()}
    torch.save(state, directory / "state_dict.pt")
    pyro.get_param_store().save(directory / "params.pt")


def _amortized(guide: nn.Module):
    return guide.guide if isinstance(guide, SemiAmortizedGuide) else guide


def load(method: str, kind: str, directory: Path, x: torch.Tensor) -> tuple[Model, nn.Module]:
    """The pair saved by :func:`save`, loaded in a cleared param store; ``x`` is a model
    argument for the new guide's set-up (its values do not matter)."""
    pyro.clear_param_store()
    if method == "pickle":
        # runs the file's code: only load files you trust
        guide = torch.load(directory / "guide.pt", weights_only=False)
        return guide.model, guide
    model = Model()
    guide = make(kind, model)
    if method == "state_dict":
        state = torch.load(directory / "state_dict.pt", weights_only=True)
        _amortized(guide).setup(x)  # builds the networks and the global guide's parameters
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
        return model, guide
    if method in ("param_store", "param_store_setup"):
        pyro.get_param_store().load(directory / "params.pt")
        if method == "param_store":
            guide(x)  # the first call takes the store's tensors of the guide's names
        else:
            _amortized(guide).setup(x)  # as does the set-up, the global guide's included
        return model, guide
    raise ValueError(method)


def score(model: Model, guide: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every score of new rows ``x``: the encoder's posterior, the global median, the
    guide's parameters, and (under a fixed seed) the ELBO and log p(x) estimates or, for
    a semi-amortized guide, the importance weights of its refined posterior."""
    amortized = _amortized(guide)
    with torch.no_grad():
        output = amortized.encoder_output(x)
        result = {
            "loc": output.loc,
            "scale": output.scale,
            "mu": amortized.median(x)["mu"],
            **{f"param:{k}": v.clone() for k, v in guide.state_dict().items()},
            **{f"model:{k}": v.clone() for k, v in model.state_dict().items()},
        }
    pyro.set_rng_seed(SEED)
    if isinstance(guide, SemiAmortizedGuide):
        guide.eval()  # refines every call
        weights = Trace_IWELBO(8).log_weights(model, guide, x)
        result["log_w"] = weights.log_w.detach()
        pyro.set_rng_seed(SEED)
        result["refined"] = guide(x)["z"].detach()
        guide.train()
    else:
        result["elbo"] = per_datapoint_elbo(model, guide, x, num_samples=20)
        result["log_px"] = log_marginal_likelihood(model, guide, x, num_samples=20, progress=False)
    return result


def still_after_training(model: Model, guide: nn.Module, x: torch.Tensor) -> list[str]:
    """The guide's parameters that two SVI steps leave where they were (none, when SVI
    sees and trains every network of the loaded guide)."""
    before = {k: v.detach().clone() for k, v in guide.named_parameters()}
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_IWELBO(2))
    for _ in range(2):
        svi.step(x)
    after = dict(guide.named_parameters())
    return sorted(k for k, v in before.items() if torch.equal(v, after[k]))


def run(directory: Path) -> dict[tuple[str, str], dict]:
    """Every kind and method of ``directory`` loaded and scored on its new rows."""
    x, new = torch.load(directory / "data.pt", weights_only=True)
    results = {}
    for kind in KINDS:
        for method in METHODS:
            model, guide = load(method, kind, directory / kind, new)
            scores = score(model, guide, new)
            scores["still"] = still_after_training(model, guide, x)
            results[kind, method] = scores
    return results


def main(argv: list[str] | None = None) -> None:
    directory = Path((sys.argv[1:] if argv is None else argv)[0])
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.save(run(directory), directory / "scores.pt")


if __name__ == "__main__":
    # as a module of its own name, so that the pickled guides find saved_guide_job.Model
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import saved_guide_job

    saved_guide_job.main()
