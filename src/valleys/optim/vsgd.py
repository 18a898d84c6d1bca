r"""VSGD: Variational Stochastic Gradient Descent (Chen, Kuzina, Esmaeili, Tomczak).

X. Chen, A. Kuzina, B. Esmaeili, J. M. Tomczak, "Variational Stochastic Gradient Descent for
Deep Neural Networks", arXiv:2404.06549, TMLR 2025. The class docstring gives the model and
the update rule. The step itself has three implementations: ``_reference_update`` (per
tensor, from the equations) and ``_foreach_update`` (bit-identical over tensor lists) in
``_vsgd_kernels``, and ``_CompiledPath`` (``torch.compile``, one pass over memory) in
``_vsgd_compiled``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from valleys import _validate as check
from valleys.optim._vsgd_compiled import _CompiledPath
from valleys.optim._vsgd_kernels import _Constants, _foreach_update, _rates, _reference_update

__all__ = ["IMPLEMENTATIONS", "VSGD"]

IMPLEMENTATIONS = ("auto", "reference", "foreach", "compiled")


def _checked(hp: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters among ``hp`` validated (``ValueError`` naming the first bad one)."""
    rules: dict[str, Callable[[str, Any], Any]] = {
        "lr": check.nonneg,
        "ghattg": check.positive,
        "ps": check.positive,
        "tau1": lambda n, v: check.interval(n, v, 0.0, 1.0, low_open=True),
        "tau2": lambda n, v: check.interval(n, v, 0.0, 1.0, low_open=True),
        "weight_decay": check.nonneg,
        "eps": check.nonneg,
        "implementation": lambda n, v: check.choice(n, v, IMPLEMENTATIONS),
    }
    return {k: rules[k](k, v) for k, v in hp.items() if k in rules}


def _check_supported(p: Tensor) -> None:
    if p.grad is not None and p.grad.is_sparse:
        raise RuntimeError(
            "VSGD does not support sparse gradients; use dense ones "
            "(e.g. nn.Embedding(..., sparse=False))"
        )
    if p.is_complex():
        raise RuntimeError(
            "VSGD does not support complex parameters; optimize torch.view_as_real(p) instead"
        )


class VSGD(torch.optim.Optimizer):
    r"""Variational Stochastic Gradient Descent (VSGD).

    X. Chen, A. Kuzina, B. Esmaeili, J. M. Tomczak, "Variational Stochastic Gradient Descent
    for Deep Neural Networks", arXiv:2404.06549, TMLR 2025.

    **Model.** Per coordinate and independently, the true gradient :math:`g_t` is a latent
    random walk and the mini-batch gradient :math:`\hat g_t` a noisy observation of it:

    .. math::

        g_t \mid g_{t-1} \sim \mathcal N(g_{t-1}, 1/w_g), \qquad
        \hat g_t \mid g_t \sim \mathcal N(g_t, 1/w_{\hat g}), \qquad
        w_g \sim \Gamma(\gamma, \gamma), \quad w_{\hat g} \sim \Gamma(\gamma, K_g\gamma).

    Stochastic variational inference with :math:`q(g_t) = \mathcal N(\mu_t, \sigma_t^2)` and
    Gamma posteriors of fixed shape :math:`a` (:math:`2a = 2\gamma + 1 + 10^{-4}`) and rates
    :math:`b_g, b_{\hat g}` gives the closed-form step below. The state keeps
    ``bg`` :math:`= 2b_g` and ``bhg`` :math:`= 2b_{\hat g}` (doubled, as the original does).

    **Update** at step :math:`t = 1, 2, \dots` of each parameter :math:`\theta` with gradient
    :math:`\hat g_t` (elementwise):

    .. math::

        s_g, s_{\hat g} &= \tfrac{bg}{2a}, \tfrac{bhg}{2a} \quad (t > 1), \qquad
            \tfrac{2\gamma}{2a - 1}, \tfrac{2K_g\gamma}{2a - 1} \quad (t = 1) \\
        \mu_t &= \frac{\hat g_t\, s_g + \mu_{t-1}\, s_{\hat g}}{s_g + s_{\hat g}}, \qquad
        \sigma_t^2 = \frac{s_g\, s_{\hat g}}{s_g + s_{\hat g}}, \qquad
        E[g_t^2] = \mu_t^2 + \sigma_t^2 \\
        bg &\leftarrow (1 - \rho_1)\, bg + \rho_1 \big(2\gamma + \sigma_t^2
            + (\mu_t - \mu_{t-1})^2\big), \qquad \rho_1 = t^{-\kappa_1} \\
        bhg &\leftarrow (1 - \rho_2)\, bhg + \rho_2 \big(2K_g\gamma + \sigma_t^2
            + (\mu_t - \hat g_t)^2\big), \qquad \rho_2 = t^{-\kappa_2} \\
        \theta &\leftarrow \theta\,(1 - \eta\lambda)
            - \eta\, \frac{\mu_t}{\sqrt{E[g_t^2]} + \epsilon}

    with :math:`\mu_0 = 0`, ``bg`` = ``bhg`` = 0 before the first step (at t = 1, ρ = 1, so
    they are replaced outright).

    **Relation to Adam.** The mean update is an EMA with a per-coordinate, data-dependent
    momentum, :math:`\mu_t = \beta_{1,t}\mu_{t-1} + (1 - \beta_{1,t})\hat g_t` with
    :math:`\beta_{1,t} = s_{\hat g}/(s_g + s_{\hat g}) = bhg/(bg + bhg)`
    (see :meth:`beta1_summary`), and the denominator :math:`\sqrt{E[g^2]}` is the posterior
    second moment of the *true* gradient where Adam uses an EMA of :math:`\hat g^2`. With a
    fixed ratio :math:`b_{\hat g}/b_g` and :math:`\sigma^2` replaced by an EMA of
    :math:`\hat g^2` the step reduces to Adam(W). Memory: three tensors per parameter
    (``mug``, ``bg``, ``bhg``; Adam keeps two) and the step count ``step`` (a Python int).

    Args:
        params: parameters or param groups (each group may set any hyperparameter below).
        lr: η, step size. Default 0.1, the original configs' value (its demo notebook uses
            0.01). Must be ≥ 0.
        ghattg: K_g, prior ratio of the observation-noise variance to the random-walk
            variance, Var(ĝ_t − g_t)/Var(g_t − g_{t−1}). The default 30 assumes noisy
            mini-batches: it starts the implied momentum at β1 = 30/31 ≈ 0.97. Must be > 0.
        ps: γ, prior strength: both Gamma priors have shape γ, their rates are γ and K_g·γ.
            The default 1e-8 makes the prior nearly uninformative (the notebook uses 1e-7).
            Must be > 0.
        tau1: κ1, forgetting exponent of the Robbins–Monro rate ρ1 = t^(−κ1) for ``bg``;
            0.81 by default. Must lie in (0, 1] (ρ1 must fall from 1 towards 0).
        tau2: κ2, the same for ``bhg``; 0.9 by default. Must lie in (0, 1].
        weight_decay: λ, decoupled (AdamW-style) weight decay; 0 by default. Must be ≥ 0.
        eps: ε, added to the denominator; 1e-8 by default. Must be ≥ 0.
        implementation: how the step is computed, each the same math:
            ``"reference"``, one tensor at a time written from the equations (the
            specification the others are tested against); ``"foreach"``,
            ``torch._foreach_*`` over each group's tensors, bit-identical to
            ``"reference"``; ``"compiled"``, a ``torch.compile``'d one-pass kernel
            (``"reference"`` up to rounding, ~1e-6 relative in float32) that compiles on its
            second step (≈ 13 s cold on a 2-core CPU, ≈ 3 s from inductor's disk cache;
            needs a C++ compiler on CPU or Triton on GPU) and falls back to ``"foreach"``
            with a ``RuntimeWarning`` if compiling fails; ``"auto"`` (default) is
            ``"foreach"``. Measured on the ResNet-18 shapes on one CPU thread
            (``benchmarks/RESULTS.md``), a ``"compiled"`` step takes ~1/10 of a
            ``"foreach"`` one and ~1.4–1.5× a fused Adam step; pass it for long CPU runs of
            large models. It is not the default because of the compile stall, the compiler
            it needs and results that are not bit-identical to the reference; it has not
            been run on a GPU.

    Gotchas:
        * Not scale-invariant early on. At t = 1 the variances are prior constants,
          s_g ≈ 2e-4 and s_ĝ ≈ 6e-3 for γ = 1e-8, whatever the size of the gradient: μ1 = ĝ/31
          and σ1² ≈ 1.94e-4, so the first step lr·μ/sqrt(μ² + 1.94e-4) is ≈ 2.3·lr·ĝ
          (SGD-like, not Adam's ≈ lr·sign(ĝ)) for |ĝ| ≲ 0.1, and reaches half of lr only at
          |ĝ| ≈ 0.25. That σ² is carried into ``bg`` and decays only as Π(1 − t^(−κ1)).
        * Weight decay multiplies θ by (1 − lr·λ) before the update, with the group's
          current lr, so a learning-rate schedule scales the decay too.
        * The Gamma shape is fixed; the +1e-4 in 2a keeps 2a − 1 > 0 at t = 1.
        * Sparse gradients and complex parameters are rejected; the math runs in the
          parameter's dtype.

    Differences from the original code: nothing in the math. The ``bg``/``bhg`` targets are
    computed as 2γ + σ² + (μ − μ_old)² and 2K_gγ + σ² + (μ − ĝ)², equal to the original's
    2γ + E[g²] − 2μμ_old + μ_old² (and likewise with ĝ) but free of its cancellation, which
    in float32 loses every digit (the sum comes out as 0) once σ² + (μ − μ_old)² falls below
    ~1e-7·μ². The constants 2a, 2γ, 2K_gγ are derived from the group's hyperparameters at
    each step (in float64) instead of being kept as CPU scalar tensors in the state, so
    changing ``ps`` or ``ghattg`` in a group takes effect; ``step`` is a Python int and ρ a
    Python float, so the step reads nothing back from an accelerator. Hyperparameters are
    validated; the closure runs under ``torch.enable_grad``; the foreach and compiled paths
    are new (the original loops over tensors, like ``"reference"``).

    State per parameter: ``step`` (int t), ``mug`` (μ), ``bg`` (2b_g), ``bhg`` (2b_ĝ).
    Diagnostics: :meth:`beta1_summary` and :meth:`stats`, computed on demand from the state.

    Example::

        opt = VSGD(model.parameters(), lr=0.01, weight_decay=0.01)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        opt.stats()  # {'beta1_mean': ..., 'beta1_median': ..., 'step': ...}
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        ghattg: float = 30.0,
        ps: float = 1e-8,
        tau1: float = 0.81,
        tau2: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        *,
        implementation: str = "auto",
    ) -> None:
        defaults = _checked(
            {
                "lr": lr,
                "ghattg": ghattg,
                "ps": ps,
                "tau1": tau1,
                "tau2": tau2,
                "weight_decay": weight_decay,
                "eps": eps,
                "implementation": implementation,
            }
        )
        super().__init__(params, defaults)
        self._compiled_path = _CompiledPath()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._compiled_path = _CompiledPath()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; the hyperparameters it sets itself are validated like the defaults
        (before anything is added)."""
        super().add_param_group({**param_group, **_checked(param_group)})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update every parameter that has a gradient.

        ``closure``, if given, is called once, with gradients enabled, before the update; its
        return value (the loss) is returned.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # every parameter checked before any state changes
            for p in group["params"]:
                if p.grad is not None:
                    _check_supported(p)
        for index, group in enumerate(self.param_groups):
            self._step_group(index, group)
        return loss

    def _step_group(self, index: int, group: dict[str, Any]) -> None:
        impl = group["implementation"]
        if impl == "auto":
            impl = "foreach"
        # a bucket shares device and dtype (what one foreach call needs) and the step t
        # (which sets ρ and the t = 1 branch)
        buckets: dict[tuple, tuple[list[Tensor], ...]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["mug"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["bg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["bhg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            key = (p.device, p.dtype, state["step"])
            lists = buckets.get(key)
            if lists is None:
                lists = buckets[key] = ([], [], [], [], [])
            lists[0].append(p)
            lists[1].append(p.grad)
            lists[2].append(state["mug"])
            lists[3].append(state["bg"])
            lists[4].append(state["bhg"])
        if not buckets:
            return
        consts = _Constants.of(group)
        for (device, dtype, t), lists in buckets.items():
            rho = _rates(t, group)
            if impl == "reference":
                for tensors in zip(*lists, strict=True):
                    _reference_update(*tensors, t, consts, rho)
            elif impl == "foreach":
                _foreach_update(*lists, t, consts, rho)
            else:
                self._compiled_path.update(*lists, t, consts, rho, (index, device, dtype))

    def beta1_summary(self) -> dict[str, float]:
        """Mean and median over all coordinates of the implied momentum β1 = bhg / (bg + bhg).

        Computed from the current state in float64 (the median is the lower one of an even
        count, as ``torch.median``); empty before the first step and when every parameter is
        empty. This is the weight on μ_old in the next step (the original's
        ``get_current_beta1_estimate``).
        """
        betas = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                bg = state["bg"].to(torch.float64)
                bhg = state["bhg"].to(torch.float64)
                betas.append((bhg / (bg + bhg)).reshape(-1))
        if not betas:
            return {}
        if len({b.device for b in betas}) > 1:
            betas = [b.cpu() for b in betas]
        flat = torch.cat(betas)
        if flat.numel() == 0:  # only empty parameters: nothing to summarise (not NaN)
            return {}
        return {"mean": flat.mean().item(), "median": flat.median().item()}

    def stats(self) -> dict[str, float]:
        """Statistics of the state left by the last step, computed on demand (never inside
        :meth:`step`): ``beta1_mean`` and ``beta1_median`` (see :meth:`beta1_summary`) and
        ``step``, the largest t over the parameters. Empty before the first step."""
        summary = self.beta1_summary()
        if not summary:
            return {}
        steps = [s["step"] for s in self.state.values() if "step" in s]
        return {
            "beta1_mean": summary["mean"],
            "beta1_median": summary["median"],
            "step": float(max(steps)),
        }
