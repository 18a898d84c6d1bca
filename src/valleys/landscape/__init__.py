"""Loss-landscape diagnostics for any PyTorch model: Keskar sharpness, 1-D/2-D loss surfaces
and interpolations, the Hessian's extreme eigenpairs, trace, spectral density and (for small
models) full spectrum.

Every function takes ``(model, loss_fn, batches)``: a model, a mean-reduced loss
``loss_fn(output, target)`` and the dataset as ``(inputs, targets)`` batches on the model's
device (see :mod:`valleys.landscape.common`). They run the model in eval mode, evaluate it at
other weights without writing into it (parameters, BatchNorm statistics and training flag are
the same afterwards) and return values instead of printing them::

    from valleys import landscape

    batches = [(x[i : i + 512], y[i : i + 512]) for i in range(0, len(x), 512)]
    r = landscape.keskar_sharpness(model, F.cross_entropy, batches, epsilon=1e-4, steps=1000)
    r.sharpness, r.f0, r.fmax

    d = landscape.random_direction(model, seed=0)               # filter-normalised
    curve = landscape.loss_curve(model, F.cross_entropy, batches, d, np.linspace(-1, 1, 21))

    top = landscape.top_eigen(model, F.cross_entropy, batches, k=5)      # Lanczos
    tr = landscape.hutchinson_trace(model, F.cross_entropy, batches, samples=100)
    rho = landscape.spectral_density(model, F.cross_entropy, batches)     # SLQ
    spectrum = landscape.dense_spectrum(model, F.cross_entropy, batches)  # small models
"""

from valleys.landscape.common import (
    LossValue,
    call_with,
    dataset_mean,
    eval_mode,
    full_loss,
    full_loss_and_grad,
    trainable_parameters,
)
from valleys.landscape.hessian import (
    EigenResult,
    HessianOperator,
    TraceResult,
    hutchinson_trace,
    top_eigen,
)
from valleys.landscape.hessian_dense import SpectrumResult, dense_hessian, dense_spectrum
from valleys.landscape.hessian_density import DensityResult, spectral_density
from valleys.landscape.sharpness import (
    SharpnessResult,
    keskar_sharpness,
    keskar_sharpness_lbfgsb,
)
from valleys.landscape.surface import (
    Curve,
    Surface,
    interpolation,
    loss_curve,
    loss_surface,
    random_direction,
)

__all__ = [
    "Curve",
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "LossValue",
    "SharpnessResult",
    "SpectrumResult",
    "Surface",
    "TraceResult",
    "call_with",
    "dataset_mean",
    "dense_hessian",
    "dense_spectrum",
    "eval_mode",
    "full_loss",
    "full_loss_and_grad",
    "hutchinson_trace",
    "interpolation",
    "keskar_sharpness",
    "keskar_sharpness_lbfgsb",
    "loss_curve",
    "loss_surface",
    "random_direction",
    "spectral_density",
    "top_eigen",
    "trainable_parameters",
]
