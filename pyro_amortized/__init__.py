r"""Amortized variational inference for Pyro.

Encoder guides that find a model's per-datapoint latents by themselves, and an
importance-weighted bound with the IWAE, STL and DReG gradient estimators.
"""

from .encoders import MLPEncoder
from .flows import AutoAmortizedFlow, AutoAmortizedIAF
from .guides import AutoAmortizedGuide, AutoAmortizedNormal
from .objectives import (
    ESTIMATORS,
    LogWeights,
    ParticleVectorizationError,
    Trace_IWELBO,
    log_weights,
)
from .optim import JointOptim
from .refinement import SemiAmortizedGuide
from .schedules import CyclicalSchedule, LinearSchedule
from .training import Checkpoint, History, Validation, fit

__all__ = [
    "ESTIMATORS",
    "AutoAmortizedFlow",
    "AutoAmortizedGuide",
    "AutoAmortizedIAF",
    "AutoAmortizedNormal",
    "Checkpoint",
    "CyclicalSchedule",
    "History",
    "JointOptim",
    "LinearSchedule",
    "LogWeights",
    "MLPEncoder",
    "ParticleVectorizationError",
    "SemiAmortizedGuide",
    "Trace_IWELBO",
    "Validation",
    "fit",
    "log_weights",
]

__version__ = "0.1.0"
