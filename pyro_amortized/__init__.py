r"""Amortized variational inference for Pyro.

Encoder guides that find a model's per-datapoint latents by themselves, and an
importance-weighted bound with the IWAE, STL and DReG gradient estimators.
"""

from .diagnostics import (
    active_units,
    elbo_surgery,
    inference_gaps,
    log_marginal_likelihood,
    per_datapoint_elbo,
)
from .encoders import EncoderOutput, MLPEncoder
from .flows import AutoAmortizedFlow, AutoAmortizedIAF, AutoAmortizedRealNVP
from .guides import AutoAmortizedGuide, AutoAmortizedNormal, GuideCall
from .objectives import (
    ESTIMATORS,
    LogWeights,
    ParticleVectorizationError,
    Trace_IWELBO,
    log_weights,
)
from .optim import JointOptim
from .perdatapoint import LocalOptions, optimize_local
from .refinement import RefineOptions, SemiAmortizedGuide, refine
from .schedules import CyclicalSchedule, LinearSchedule
from .training import Checkpoint, History, Validation, fit

__all__ = [
    "ESTIMATORS",
    "AutoAmortizedFlow",
    "AutoAmortizedGuide",
    "AutoAmortizedIAF",
    "AutoAmortizedNormal",
    "AutoAmortizedRealNVP",
    "Checkpoint",
    "CyclicalSchedule",
    "EncoderOutput",
    "GuideCall",
    "History",
    "JointOptim",
    "LinearSchedule",
    "LocalOptions",
    "LogWeights",
    "MLPEncoder",
    "ParticleVectorizationError",
    "RefineOptions",
    "SemiAmortizedGuide",
    "Trace_IWELBO",
    "Validation",
    "active_units",
    "elbo_surgery",
    "fit",
    "inference_gaps",
    "log_marginal_likelihood",
    "log_weights",
    "optimize_local",
    "per_datapoint_elbo",
    "refine",
]

__version__ = "0.1.0"
