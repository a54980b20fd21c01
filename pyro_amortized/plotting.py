r"""Figures for amortized inference: training curves, image grids, 2-D posterior contours."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pyro import poutine
from torch import Tensor

from .objectives import LocalParticlePlate

__all__ = [
    "log_joint_on_grid",
    "plot_image_grid",
    "plot_inference_gaps",
    "plot_posterior_contours",
    "plot_refinement",
    "plot_training_curves",
]


def _save(figure: Figure, path: str | Path) -> Path:
    """Renders with the Agg canvas directly: no pyplot, so no global backend is touched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path


def plot_training_curves(history: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    r"""Plots per-epoch curves (e.g. ``train_bound`` and ``valid_bound``) against the epoch.

    Arguments:
        history: Curve name to one value per epoch; empty curves are skipped.
        path: Where to write the PNG.

    Returns:
        The path written.
    """
    figure = Figure(figsize=(5, 3.5))
    axes = figure.add_subplot()
    for name, values in history.items():
        if len(values):
            axes.plot(range(1, len(values) + 1), list(values), marker=".", label=name)
    axes.set_xlabel("epoch")
    axes.set_ylabel("nats per datapoint")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    return _save(figure, path)


def plot_image_grid(
    images: Tensor,
    path: str | Path,
    *,
    image_shape: tuple[int, int],
    num_columns: int = 10,
    title: str | None = None,
) -> Path:
    r"""Tiles flat images ``[N, H*W]`` with values in [0, 1] into one grey-level picture.

    Arguments:
        images: ``[N, H * W]`` (or ``[N, H, W]``) pixel intensities in [0, 1].
        path: Where to write the PNG.
        image_shape: ``(H, W)``.
        num_columns: Images per row.
        title: Optional title.

    Returns:
        The path written.
    """
    height, width = image_shape
    images = images.detach().float().reshape(-1, height, width).cpu()
    if not len(images):
        raise ValueError("plot_image_grid needs at least one image")
    columns = min(num_columns, len(images))
    rows = math.ceil(len(images) / columns)
    canvas = torch.ones(rows * (height + 1) + 1, columns * (width + 1) + 1)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = 1 + r * (height + 1), 1 + c * (width + 1)
        canvas[top : top + height, left : left + width] = image
    figure = Figure(figsize=(columns * 0.5 + 0.5, rows * 0.5 + 0.5))
    axes = figure.add_subplot()
    axes.imshow(canvas.numpy(), cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_axis_off()
    if title:
        axes.set_title(title)
    return _save(figure, path)


def log_joint_on_grid(
    model: Callable,
    site: str,
    grid: Tensor,
    *args,
    local_plate: str = "data",
    **kwargs,
) -> Tensor:
    r"""``log p(x_i, z)`` for every datapoint ``i`` and every grid point ``z`` of one local site.

    The model runs once, vectorized: the grid takes the place of the particle dimension
    (as in :class:`~pyro_amortized.objectives.Trace_IWELBO`), and every other latent site
    of the model is drawn from its prior, so the result is exact when ``site`` is the
    only local latent.

    Arguments:
        model: A Pyro model with a vectorized plate ``local_plate``.
        site: The local latent site, with a 1-D event (e.g. 2-D latents).
        grid: ``[G, D]`` values of the site.
        *args: The model's arguments (the datapoints).
        local_plate: Name of the plate over datapoints.
        **kwargs: The model's keyword arguments.

    Returns:
        ``[G, B]`` log-joint densities, unscaled by any subsample scale.
    """
    with poutine.block():
        nesting = poutine.trace(model).get_trace(*args, **kwargs)
    dims = [
        f.dim
        for s in nesting.nodes.values()
        if s["type"] == "sample"
        for f in s["cond_indep_stack"]
        if f.vectorized
    ]
    particle_dim = min(dims, default=0) - 1
    data_dim = next(
        f.dim
        for s in nesting.nodes.values()
        if s["type"] == "sample"
        for f in s["cond_indep_stack"]
        if f.name == local_plate
    )
    # The grid goes where Trace_IWELBO puts particles: [G, 1..., *batch, D].
    batch = nesting.nodes[site]["value"].shape[:-1]
    pad = (1,) * (-particle_dim - 1 - len(batch))
    value = grid.reshape((len(grid),) + pad + (1,) * len(batch) + grid.shape[-1:])
    value = value.expand((len(grid),) + pad + batch + grid.shape[-1:])
    conditioned = poutine.condition(model, data={site: value})
    plated = LocalParticlePlate(local_plate, len(grid), particle_dim)(conditioned)
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(plated).get_trace(*args, **kwargs)
    total = 0.0
    for node in trace.nodes.values():
        if node["type"] != "sample" or node["name"] == local_plate:
            continue
        if not any(f.name == local_plate for f in node["cond_indep_stack"]):
            continue
        log_p = node["fn"].log_prob(node["value"])
        if node["mask"] is not None and node["mask"] is not True:  # masked cells add 0
            mask = torch.as_tensor(node["mask"], device=log_p.device)
            log_p = torch.where(mask, log_p, log_p.new_zeros(()))
        log_p = log_p.reshape((1,) * (-particle_dim - log_p.dim()) + log_p.shape)
        other = [d for d in range(-log_p.dim(), 0) if d not in (particle_dim, data_dim)]
        total = total + (log_p.sum(other) if other else log_p)  # [G, B]
    return total


def plot_posterior_contours(
    model: Callable,
    posteriors: Mapping[str, torch.distributions.Distribution] | Callable,
    x: Tensor,
    path: str | Path,
    *,
    site: str = "z",
    num_points: int = 4,
    grid_size: int = 60,
    limits: tuple[float, float] | None = None,
    local_plate: str = "data",
) -> Path:
    r"""Contours of the true posterior against the guide's, for 2-D local latents.

    The true posterior :math:`p(z \mid x_i) \propto p(x_i, z)` is evaluated on a grid; the
    approximate one is the guide's :math:`q(z \mid x_i)` (Cremer, Li and Duvenaud, 2018,
    Figure 2). One panel per datapoint.

    Arguments:
        model: The model, called as ``model(x)``.
        posteriors: ``guide.encode`` (or its result for ``x``): per-site distributions
            with batch shape ``[B]``.
        x: The datapoints to show (their first ``num_points``).
        path: Where to write the PNG.
        site: The 2-D local latent site.
        num_points: Number of panels.
        grid_size: Grid points per axis.
        limits: Range of both axes; by default each panel spans q's mean +- 5 q standard
            deviations (its largest one), where both posteriors live.
        local_plate: Name of the plate over datapoints.

    Returns:
        The path written.

    References:
        Inference Suboptimality in Variational Autoencoders (Cremer, Li and Duvenaud, 2018).
    """
    x = x[:num_points]
    if callable(posteriors):
        posteriors = posteriors(x)
    q = posteriors[site]
    if q.event_shape != (2,):
        raise ValueError(
            f"plot_posterior_contours: site '{site}' has event shape {tuple(q.event_shape)}; "
            "contours need a 2-D latent"
        )
    figure = Figure(figsize=(3 * len(x), 3))
    try:
        mean, std = q.mean.detach(), q.variance.detach().sqrt()
    except NotImplementedError:  # a flow: its moments from draws (they only set the axes)
        draws = q.sample((2000,))
        mean, std = draws.mean(0), draws.std(0)
    for i in range(len(x)):
        if limits is None:
            half = 5 * std[i].max()
            axes_limits = [(mean[i, d] - half, mean[i, d] + half) for d in range(2)]
        else:
            axes_limits = [limits, limits]
        grid_x, grid_y = (
            torch.linspace(lo, hi, grid_size, dtype=x.dtype, device=x.device)
            for lo, hi in axes_limits
        )
        zz = torch.cartesian_prod(grid_x, grid_y)  # [G*G, 2], first coordinate major
        with torch.no_grad():
            log_joint = log_joint_on_grid(model, site, zz, x, local_plate=local_plate)[:, i]
            # expanded, not broadcast: a flow's conditioning network needs full shapes
            log_q = q.log_prob(zz[:, None, :].expand(-1, len(x), -1))[:, i]
        axes = figure.add_subplot(1, len(x), i + 1)
        for density, color in ((log_joint, "tab:blue"), (log_q, "tab:red")):
            # levels at fixed fractions of each density's peak: comparable shapes
            density = (density - density.max()).exp().reshape(grid_size, grid_size).T
            axes.contour(
                grid_x.cpu().numpy(),
                grid_y.cpu().numpy(),
                density.cpu().numpy(),
                levels=[0.05, 0.2, 0.4, 0.6, 0.8],
                colors=color,
            )
        axes.set_title(f"datapoint {i}")
        axes.set_xlabel(f"{site}[0]")
        axes.set_ylabel(f"{site}[1]")
        axes.set_aspect("equal")
    figure.legend(
        handles=[
            _line("tab:blue", "true posterior"),
            _line("tab:red", "q(z | x)"),
        ],
        loc="lower center",
        bbox_to_anchor=(0.5, -0.12),
        ncol=2,
    )
    return _save(figure, path)


def plot_inference_gaps(reports: Mapping[str, object], path: str | Path) -> Path:
    """Stacked bars of the mean approximation and amortization gaps, one bar per report.

    Arguments:
        reports: Label to an :class:`~pyro_amortized.diagnostics.InferenceGaps`.
        path: Where to write the PNG.

    Returns:
        ``path``.
    """
    labels = list(reports)
    approximation = [reports[k].approximation_gap.mean().item() for k in labels]
    amortization = [reports[k].amortization_gap.mean().item() for k in labels]
    figure = Figure(figsize=(1.6 + 1.4 * len(labels), 3.6))
    ax = figure.subplots()
    x = list(range(len(labels)))
    ax.bar(x, approximation, color="tab:blue", label="approximation gap")
    ax.bar(x, amortization, bottom=approximation, color="tab:orange", label="amortization gap")
    ax.set_xticks(x, labels)
    ax.set_ylabel("nats per datapoint")
    ax.set_title("inference gap")
    top = max((a + b for a, b in zip(approximation, amortization, strict=True)), default=0.0)
    if top > 0:
        ax.set_ylim(0, 1.4 * top)  # room for the legend above the bars
    ax.legend(frameon=False, loc="upper left", fontsize="small")
    return _save(figure, path)


def plot_refinement(reports: Mapping[str, object], path: str | Path) -> Path:
    """The mean bound against refinement steps, one curve per report, with its L[q*].

    Arguments:
        reports: Label to an :class:`~pyro_amortized.diagnostics.InferenceGaps` computed
            with ``refine_steps`` (step 0 is the report's L[q]).
        path: Where to write the PNG.

    Returns:
        ``path``.
    """
    figure = Figure(figsize=(5.6, 3.8))
    ax = figure.subplots()
    for i, (label, report) in enumerate(reports.items()):
        color = f"C{i}"
        steps = [0, *sorted(report.refined)]
        bounds = [report.elbo.mean().item()]
        bounds += [report.refined[k].mean().item() for k in steps[1:]]
        ax.plot(steps, bounds, "o-", color=color, label=f"{label}: refined L[q]")
        optimum = report.optimal_elbo[report.family].mean().item()
        ax.axhline(optimum, color=color, linestyle="--", label=f"{label}: L[q*]")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("refinement steps")
    ax.set_ylabel("ELBO, nats per datapoint")
    ax.legend(frameon=False, fontsize="small")
    return _save(figure, path)


def _line(color: str, label: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, label=label)
