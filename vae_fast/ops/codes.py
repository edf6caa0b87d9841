"""Integer codes shared by the Python layer, the C++ kernels (``csrc/kernels.h``) and the Triton
kernels (constexpr arguments). Defined once here; ``tests/test_contracts.py`` checks them
against the enums in ``csrc/kernels.h``."""
from __future__ import annotations

import enum


class ScaleParam(enum.IntEnum):
    """How the encoder's second output is read: sigma = exp(s / 2), exp(s) or softplus(s)."""

    LOGVAR = 0
    LOGSTD = 1
    SOFTPLUS = 2


class Likelihood(enum.IntEnum):
    """The elementwise likelihoods served by one parameterised kernel."""

    BERNOULLI = 0
    CONTINUOUS_BERNOULLI = 1
    GAUSSIAN = 2
    MEAN_SQUARED_ERROR = 3  # -1/D sum (x - mean)^2 over the event: minus the per-example MSE
    LAPLACE = 4


class TargetDtype(enum.IntEnum):
    """The dtype of the class indices the categorical kernels read as they are (8-bit pixels stay uint8)."""

    INT64 = 0
    UINT8 = 1


SCALE_PARAMS = {p.name.lower(): p for p in ScaleParam}
ELEMENTWISE_LIKELIHOODS = {lk.name.lower(): lk for lk in Likelihood}


# Heads (ops/head.py) beyond the elementwise likelihoods: codes of their own, outside Likelihood's range
HEAD_CATEGORICAL = 100
HEAD_DMOL = 101
