"""LeNet-style networks of Entropy-SGD: ``mnistconv`` (registry ``lenet``) and the small LeNet
whose full Hessian the paper's Fig. 1 shows (registry ``lenet_small``).

Both compute the size of the flattened features from the input shape, so they take any
``(C, H, W)`` image large enough for their valid convolutions and poolings.
"""

from __future__ import annotations

from torch import nn

from valleys import _validate as check
from valleys.models._common import conv_out, image_input, maybe_dropout, pool_out, rate

LENET_VARIANTS = ("lua", "python")


def _lenet_side(n: int) -> int:
    # conv 5×5 valid → max-pool 3/3 → conv 5×5 valid → max-pool 2/2
    return pool_out(conv_out(pool_out(conv_out(n, 5), 3), 5), 2)


def build_lenet(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    variant: str = "lua",
    dropout: float = 0.5,
) -> nn.Sequential:
    """Registry entry ``lenet``: Entropy-SGD's ``mnistconv``, conv 20@5×5 → max-pool 3/3 →
    conv 50@5×5 → max-pool 2/2 → FC 500 → FC ``num_outputs``, with BatchNorm and dropout.

    The two original codes order the layers differently (ALGORITHMS.md §1.6 item 10);
    ``variant`` picks one:

    - ``"lua"`` (default; the code behind the paper's numbers): each conv block is
      ``Conv → ReLU → MaxPool → BN → Dropout``; the hidden FC layer is ``Linear → ReLU →
      Dropout`` (no BatchNorm).
    - ``"python"`` (the PyTorch port): each conv block is ``Conv → BN → ReLU → MaxPool →
      Dropout``; the hidden FC layer is ``Linear → BN → ReLU → Dropout``.

    On 1×28×28 the features are 50×2×2 and the model has 131,220 parameters (Lua) or
    132,220 (python: +1,000 for the FC BatchNorm). Images need H, W >= 22.
    """
    check.choice("variant", variant, LENET_VARIANTS)
    p = rate("dropout", dropout)
    c, h, w = image_input("lenet", input_shape, _lenet_side)
    flat = 50 * _lenet_side(h) * _lenet_side(w)

    def conv_block(cin: int, cout: int, pool: int) -> list[nn.Module]:
        conv, bn, pool_layer = nn.Conv2d(cin, cout, 5), nn.BatchNorm2d(cout), nn.MaxPool2d(pool)
        if variant == "lua":
            return [conv, nn.ReLU(), pool_layer, bn, *maybe_dropout(p)]
        return [conv, bn, nn.ReLU(), pool_layer, *maybe_dropout(p)]

    hidden: list[nn.Module] = (
        [nn.Linear(flat, 500), nn.ReLU()]
        if variant == "lua"
        else [nn.Linear(flat, 500), nn.BatchNorm1d(500), nn.ReLU()]
    )
    return nn.Sequential(
        *conv_block(c, 20, 3),
        *conv_block(20, 50, 2),
        nn.Flatten(),
        *hidden,
        *maybe_dropout(p),
        nn.Linear(500, num_outputs),
    )


def _lenet_small_side(n: int) -> int:
    # (conv 5×5 valid → max-pool 2) twice
    return pool_out(conv_out(pool_out(conv_out(n, 5), 2), 5), 2)


def build_lenet_small(
    input_shape: tuple[int, ...], num_outputs: int, *, init_std: float | None = None
) -> nn.Sequential:
    """Registry entry ``lenet_small``: the Hessian LeNet of Entropy-SGD's ``hessian.py``.

    conv 10@5×5 valid → ReLU → max-pool 2 → conv 20@5×5 valid → ReLU → max-pool 2 → FC 128 →
    ReLU → FC ``num_outputs``; no BatchNorm, no dropout. On 1×28×28 the features are 20×4×4 =
    320 and the model has exactly 47,658 parameters (260 + 5,020 + 41,088 + 1,290).

    The original ends in log-softmax; this returns logits (use cross-entropy). ``init_std``
    None keeps PyTorch's default initialisation; ``init_std=0.1`` reproduces the original's
    N(0, 0.1²) for every weight and bias. Images need H, W >= 16.
    """
    c, h, w = image_input("lenet_small", input_shape, _lenet_small_side)
    flat = 20 * _lenet_small_side(h) * _lenet_small_side(w)
    model = nn.Sequential(
        nn.Conv2d(c, 10, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(10, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(),
        nn.Linear(128, num_outputs),
    )
    if init_std is not None:
        std = check.positive("init_std", init_std)
        for param in model.parameters():
            nn.init.normal_(param, 0.0, std)
    return model
