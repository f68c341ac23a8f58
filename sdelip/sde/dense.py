"""The dense diffusion matrix of an SDE system, for tests and small models.

:class:`~sdelip.sde.ParameterSDE` and :class:`~sdelip.sde.LipschitzSDE` offer torchsde
the drift ``f`` and the products ``g_prod``/``f_and_g_prod`` only: Euler needs nothing
else, and torchsde's ``sdeint`` evaluates every diffusion method a system has once (its
contract check), so a system with a dense ``g`` would build the (batch, state, brownian)
tensor at every call, O(n·P·blocks·M) numbers and per-sample gradients. ``sdeint`` on a
system learns the noise size from ``bm=`` (e.g. :class:`~sdelip.sde.GridBrownian`).

:class:`DenseDiffusion` wraps a system into one that also has the dense matrix ``g``,
G = √η s Ωᵀ/√M per noise block (Def 4, Prop 5) and the diffusion rows of the system's
extra state (the λ^(ℓ)ᵀ rows of log K^(ℓ), Thm 14), from the system's own cached
evaluation: same mini-batch as ``f`` and ``g_prod`` at the same (t, y). It refuses
systems whose matrix is too large (``dense_diffusion`` of the system).
"""

from __future__ import annotations

import torch

__all__ = ["DenseDiffusion", "DENSE_DIFFUSION_MAX"]

#: Largest dense diffusion matrix (elements per trajectory, state × Brownian) that
#: :class:`DenseDiffusion` builds by default (a system's ``dense_diffusion=None``).
DENSE_DIFFUSION_MAX = 1 << 22


def no_dense_message(sde) -> str:
    """Why ``sde`` has no dense diffusion matrix, and what to use instead."""
    return (
        f"{type(sde).__name__} offers no dense diffusion matrix g here: it would hold state_size × "
        f"brownian_size = {sde.state_size} × {sde.brownian_size} numbers per trajectory. Use g_prod / "
        "f_and_g_prod (what Euler calls), pass bm= to torchsde.sdeint so that it learns the noise size "
        "from the Brownian motion, or force it with dense_diffusion=True"
    )


class DenseDiffusion:
    """A torchsde system: ``sde`` with its dense diffusion matrix ``g`` (tests and small models).

    ``f``, ``g_prod`` and ``f_and_g_prod`` are the system's own; ``g(t, y)`` is the
    (n, state_size, brownian_size) matrix whose product with v is ``g_prod(t, y, v)``.
    With it ``torchsde.sdeint`` runs without ``bm=`` (it learns the noise size from
    ``g``).

    Example::

        dense = DenseDiffusion(sde)
        G = dense.g(0.0, y)                     # (n, state_size, brownian_size)
        ys = torchsde.sdeint(dense, y0, ts, dt=sde.lr, method="euler")

    Args:
        sde: a :class:`~sdelip.sde.ParameterSDE` or :class:`~sdelip.sde.LipschitzSDE`.

    Raises:
        ValueError: when the matrix would exceed :data:`DENSE_DIFFUSION_MAX` numbers per
            trajectory and the system was not built with ``dense_diffusion=True`` (or was
            built with ``dense_diffusion=False``).
    """

    def __init__(self, sde):
        if not sde.has_dense_diffusion:
            raise ValueError(no_dense_message(sde))
        self.sde = sde
        self.noise_type = sde.noise_type
        self.sde_type = sde.sde_type
        self.f = sde.f
        self.g_prod = sde.g_prod
        self.f_and_g_prod = sde.f_and_g_prod

    def g(self, t, y: torch.Tensor) -> torch.Tensor:
        """Dense diffusion matrix (n, state_size, brownian_size).

        Block-diagonal √η s Ωᵀ/√M on θ (Def 4, Prop 5), then the extra rows' (the λ^(ℓ)
        of log K^(ℓ), Thm 14); a factored evaluation's columns come from per-sample
        gradients of its batch (:meth:`ParameterSDE.noise_rows`).
        """
        sde = self.sde
        ev, _ = sde.evaluate(t, y)
        G = y.new_zeros(y.shape[0], y.shape[1], sde.brownian_size)
        for spec, E in zip(sde.layout.specs, sde.noise_rows(ev)):
            G[:, spec.start : spec.stop, sde.brownian_slice(spec.block)] = E.mT
        if sde.extra_rows is not None:
            P = sde.n_params
            sde.extra_rows.dense(sde, ev.extra, G[:, P : P + sde.extra_rows.width])
        return G

    def __repr__(self) -> str:
        return f"DenseDiffusion({self.sde!r})"
