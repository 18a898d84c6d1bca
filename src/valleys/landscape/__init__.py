"""Loss-landscape diagnostics for any PyTorch model: Keskar sharpness, 1-D/2-D loss surfaces
and interpolations.

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
    "LossValue",
    "SharpnessResult",
    "Surface",
    "call_with",
    "dataset_mean",
    "eval_mode",
    "full_loss",
    "full_loss_and_grad",
    "interpolation",
    "keskar_sharpness",
    "keskar_sharpness_lbfgsb",
    "loss_curve",
    "loss_surface",
    "random_direction",
    "trainable_parameters",
]
