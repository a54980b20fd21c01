import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian, exact_encoder

from pyro_amortized import AutoAmortizedNormal
from pyro_amortized.diagnostics import InferenceGaps
from pyro_amortized.plotting import (
    log_joint_on_grid,
    plot_image_grid,
    plot_inference_gaps,
    plot_posterior_contours,
    plot_refinement,
    plot_training_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and len(data) > 1000


def test_training_curves(tmp_path):
    path = plot_training_curves(
        {"train_bound": [-90.0, -85.0, -83.0], "valid_bound": [-91.0, -87.0, -86.0], "x": []},
        tmp_path / "curves.png",
    )
    assert _is_png(path)


def _report(elbo, optimal, refined):
    t = torch.tensor
    return InferenceGaps(
        family="normal",
        log_px=t([optimal + 1.0]),
        elbo=t([elbo]),
        optimal_elbo={"normal": t([optimal])},
        iwae={},
        steps={},
        num_samples=1,
        elbo_samples=1,
        seconds=0.0,
        refined={k: t([v]) for k, v in refined.items()},
    )


def test_gap_bars_and_refinement_curves(tmp_path):
    reports = {
        "trained": _report(-95.0, -92.0, {5: -94.0, 50: -92.5}),
        "weak": _report(-99.0, -92.5, {5: -97.0, 50: -93.0}),
    }
    assert _is_png(plot_inference_gaps(reports, tmp_path / "gaps.png"))
    assert _is_png(plot_refinement(reports, tmp_path / "refinement.png"))


def test_image_grid(tmp_path):
    images = torch.rand(23, 64)
    path = plot_image_grid(images, tmp_path / "sub" / "grid.png", image_shape=(8, 8), title="data")
    assert _is_png(path)
    with pytest.raises(ValueError, match="at least one image"):
        plot_image_grid(torch.zeros(0, 64), tmp_path / "empty.png", image_shape=(8, 8))


def test_log_joint_on_grid_is_the_analytic_log_joint():
    torch.set_default_dtype(torch.float64)
    model = LinearGaussian()
    x = model.sample(3)
    grid = torch.randn(7, 2)
    ours = log_joint_on_grid(model, "z", grid, x)
    assert ours.shape == (7, 3)
    prior = dist.Normal(0.0, 1.0).log_prob(grid).sum(-1)[:, None]
    mean = grid[:, None, :] @ model.A.T + model.b.detach()
    likelihood = dist.Normal(mean, model.sigma).log_prob(x).sum(-1)
    assert torch.allclose(ours, prior + likelihood, atol=1e-12)


def test_posterior_contours(tmp_path):
    torch.set_default_dtype(torch.float64)
    model = LinearGaussian()
    x = model.sample(5)
    guide = AutoAmortizedNormal(model, encoder=exact_encoder(model))
    guide(x)
    path = plot_posterior_contours(
        model, guide.site_posteriors, x, tmp_path / "contours.png", num_points=3
    )
    assert _is_png(path)


def test_posterior_contours_need_a_2d_latent(tmp_path):
    posteriors = {"z": dist.Normal(torch.zeros(4, 3), 1.0).to_event(1)}
    with pytest.raises(ValueError, match="event shape \\(3,\\); contours need a 2-D latent"):
        plot_posterior_contours(None, posteriors, torch.zeros(4, 5), tmp_path / "c.png")


def test_plotting_leaves_matplotlib_global_state_alone(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    plot_training_curves({"a": [1.0, 2.0]}, tmp_path / "a.png")
    assert matplotlib.get_backend() == backend
