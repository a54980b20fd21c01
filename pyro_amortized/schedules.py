r"""Annealing schedules: a weight of the objective set before every training step.

A schedule is called by :func:`~pyro_amortized.fit` as ``schedule(epoch, step, loss)``
and sets one attribute of the objective, by default
:attr:`Trace_IWELBO.entropy_weight <pyro_amortized.Trace_IWELBO>` (Cremer et al.'s entropy
annealing, :math:`\log p(x, z) - \lambda \log q(z \mid x)` with :math:`\lambda: 0 \to 1`)
or ``kl_weight`` (KL warm-up, the log-prior and entropy terms weighted together). Its value
depends on the global step only, so a resumed run sees the same values.

Example:
    >>> from pyro_amortized import LinearSchedule, Trace_IWELBO
    >>> loss = Trace_IWELBO(5)
    >>> warmup = LinearSchedule(0.0, 1.0, 5000, attribute="kl_weight")
    >>> warmup(0, 2500, loss)  # fit calls it before every step
    >>> loss.kl_weight
    0.5
    >>> history = fit(model, guide, loss, x, epochs=50, batch_size=100,
    ...               optimizer=optimizer, schedule=warmup)  # doctest: +SKIP
"""

from __future__ import annotations

from pyro.infer import ELBO

from .checks import check_count, check_finite, check_probability

__all__ = ["CyclicalSchedule", "LinearSchedule"]


class _Schedule:
    """Sets ``loss.<attribute>`` to :meth:`value` of the global step."""

    def __init__(self, attribute: str):
        if not isinstance(attribute, str) or not attribute.isidentifier():
            raise ValueError(
                f"{type(self).__name__}: attribute must name a weight of the objective, "
                f"such as 'entropy_weight' or 'kl_weight'; got {attribute!r}"
            )
        self.attribute = attribute

    def value(self, step: int) -> float:
        raise NotImplementedError

    def __call__(self, epoch: int, step: int, loss: ELBO) -> None:
        if not hasattr(loss, self.attribute):
            raise ValueError(
                f"{type(self).__name__}: the objective ({type(loss).__name__}) has no "
                f"attribute '{self.attribute}' to anneal; Trace_IWELBO has 'entropy_weight' "
                "and 'kl_weight'"
            )
        setattr(loss, self.attribute, self.value(step))


class LinearSchedule(_Schedule):
    r"""A weight going linearly from ``start`` to ``end`` over ``steps`` steps, then held.

    The value at global step :math:`t` (from 0) is
    :math:`\text{start} + (\text{end} - \text{start}) \min(t / \text{steps}, 1)`.

    Arguments:
        start: Value at step 0.
        end: Value from step ``steps`` on.
        steps: Length of the ramp, in training steps.
        attribute: The objective's attribute to set: ``"entropy_weight"`` or
            ``"kl_weight"`` for :class:`~pyro_amortized.Trace_IWELBO`.

    References:
        Generating Sentences from a Continuous Space (Bowman, Vilnis, Vinyals, Dai,
        Jozefowicz and Bengio, 2016) and Ladder Variational Autoencoders (Sønderby, Raiko,
        Maaløe, Sønderby and Winther, 2016): KL warm-up. Inference Suboptimality in
        Variational Autoencoders (Cremer, Li and Duvenaud, 2018): entropy annealing.
    """

    def __init__(
        self,
        start: float,
        end: float,
        steps: int,
        *,
        attribute: str = "entropy_weight",
    ):
        super().__init__(attribute)
        self.start = check_finite("LinearSchedule", "start", start)
        self.end = check_finite("LinearSchedule", "end", end)
        self.steps = check_count("LinearSchedule", "steps", steps)

    def value(self, step: int) -> float:
        """The weight at global step ``step``."""
        fraction = min(step / self.steps, 1.0)
        return self.start + (self.end - self.start) * fraction

    def __repr__(self) -> str:
        return (
            f"LinearSchedule({self.start}, {self.end}, steps={self.steps}, "
            f"attribute={self.attribute!r})"
        )


class CyclicalSchedule(_Schedule):
    r"""Cyclical annealing: ``cycles`` linear ramps from ``start`` to ``end``.

    The ``steps`` steps are cut into ``cycles`` equal cycles; in each the weight rises
    linearly from ``start`` to ``end`` over the first ``ratio`` of the cycle and stays at
    ``end`` for the rest. After ``steps`` it stays at ``end``.

    Arguments:
        start: Value at the start of every cycle.
        end: Value at the end of every ramp.
        steps: Length of all cycles together, in training steps.
        cycles: Number of cycles.
        ratio: Fraction of each cycle spent on the ramp, in (0, 1].
        attribute: The objective's attribute to set (``"kl_weight"`` by default, as in
            the paper).

    References:
        Cyclical Annealing Schedule: A Simple Approach to Mitigating KL Vanishing (Fu, Li,
        Liu, Gao, Celikyilmaz and Carin, 2019).
    """

    def __init__(
        self,
        start: float,
        end: float,
        steps: int,
        *,
        cycles: int = 4,
        ratio: float = 0.5,
        attribute: str = "kl_weight",
    ):
        super().__init__(attribute)
        self.start = check_finite("CyclicalSchedule", "start", start)
        self.end = check_finite("CyclicalSchedule", "end", end)
        self.steps = check_count("CyclicalSchedule", "steps", steps)
        self.cycles = check_count("CyclicalSchedule", "cycles", cycles)
        self.ratio = check_probability("CyclicalSchedule", "ratio", ratio, low=False)

    def value(self, step: int) -> float:
        """The weight at global step ``step``."""
        if step >= self.steps:
            return self.end
        period = self.steps / self.cycles
        within = (step % period) / period
        fraction = min(within / self.ratio, 1.0)
        return self.start + (self.end - self.start) * fraction

    def __repr__(self) -> str:
        return (
            f"CyclicalSchedule({self.start}, {self.end}, steps={self.steps}, "
            f"cycles={self.cycles}, ratio={self.ratio}, attribute={self.attribute!r})"
        )
