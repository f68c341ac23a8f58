"""The option objects of :class:`~sdelip.sde.ParameterSDE` and :class:`~sdelip.sde.LipschitzSDE` (small, frozen).

- :class:`DriftOptions`: the drift −(∇L + λ_wd θ): where the expected gradient comes from,
  and the diffusion's compensation for a drift estimated on batches.
- :class:`NoiseOptions`: how the noise blocks are coupled and whether the trajectories
  share one noise mini-batch.
- :class:`ComputeOptions`: chunking and memory (none of them changes the SDE's law).
- :class:`SecondMomentOptions`: where :class:`~sdelip.sde.OptimizerSDE`'s Adam or RMSprop v starts.
- :class:`LogKOptions`: :class:`~sdelip.sde.LipschitzSDE`'s log K rows: which of Thm 14's
  terms they keep, the integrated terms, the decomposition route and Assumption 11's checks.
"""

from __future__ import annotations

from typing import Optional

import attrs

from .._checks import check_choice
from ..core.spectral import DEFAULT_GAP_TOL

__all__ = ["DriftOptions", "NoiseOptions", "ComputeOptions", "LogKOptions", "SecondMomentOptions"]


@attrs.frozen
class DriftOptions:
    """The drift of Def 4: −∇L(θ), or −(∇L + λ_wd θ) with weight decay.

    Attributes:
        weight_decay: λ_wd of SGD's L2 penalty: the drift becomes −(∇L + λ_wd θ).
        source: where the expected gradient comes from: ``"full"`` (the training set),
            ``"batch"`` (an independent batch of ``batch_size`` samples per trajectory and
            evaluation, with the diffusion shrunk to keep Def 4's step covariance, see
            :mod:`sdelip.sde.parameter_sde`) or ``"auto"`` (full if the training set has at
            most ``full_max`` samples, batch otherwise).
        full_max: threshold of ``"auto"``.
        batch_size: B, size of the independent expected-gradient batch.
        compensate: shrink the diffusion by √(1 − (dt/η)(M/B)) when the drift comes from
            batches (default); False keeps the full diffusion.
        dt: the Euler step the compensation is calibrated for (default η).
    """

    weight_decay: float = attrs.field(default=0.0, converter=float)
    source: str = "auto"
    full_max: int = 10_000
    batch_size: int = 4096
    compensate: bool = True
    dt: Optional[float] = None


@attrs.frozen
class NoiseOptions:
    """How the diffusion's noise is drawn.

    Attributes:
        coupling: ``"layers"`` (default with ``sampling="iid"``): an independent
            M-dimensional Brownian motion per noise block, block-diagonal noise across
            layers (Assumption 3); ``"shared"``: one M-dimensional Brownian motion for all
            blocks, the full covariance of the mini-batch gradient across layers (SGD's own
            noise; the only coupling, and the default, with ``sampling="reshuffle"``).
            None: the default of the sampling.
        shared_batch: draw one noise mini-batch per evaluation for all trajectories
            instead of one per trajectory.
    """

    coupling: Optional[str] = None
    shared_batch: bool = False


@attrs.frozen
class ComputeOptions:
    """Chunking and memory of the coefficients' evaluation (the SDE's law does not depend on them).

    Attributes:
        traj_chunk: trajectories per batched gradient call (default: from ``chunk_bytes``).
        chunk_bytes: memory budget of one chunk of trajectories (default 512 MiB on CPU,
            a quarter of the free memory on CUDA).
        data_chunk: samples per batched call of the expected gradient.
        max_cached: largest dataset materialised in memory (see ``DataSource``).
        dense_diffusion: whether :class:`~sdelip.sde.DenseDiffusion` may build the dense
            diffusion matrix ``g`` (True, False, or None: only while state × Brownian
            size is at most 2²² per trajectory).
    """

    traj_chunk: Optional[int] = None
    chunk_bytes: Optional[int] = None
    data_chunk: int = 4096
    max_cached: int = 50_000
    dense_diffusion: Optional[bool] = None


def _choice(*choices):
    def check(instance, attribute, value):
        check_choice(value, attribute.name, choices)

    return check


@attrs.frozen
class LogKOptions:
    """The log K rows of :class:`~sdelip.sde.LipschitzSDE` (Def 10, Thm 14).

    Attributes:
        include_drift: keep μ in the log K drift.
        include_noise_curvature: keep κ (Thm 14's noise-curvature entropy production).
        include_ito_correction: keep −½‖λ‖² (the Itô correction of log, Thm 15).
        include_diffusion: keep the diffusion row λᵀ dB.
        include_step_curvature: add (η/2σ1) ∇Lᵀ H ∇L to the log K drift: the O(η) drift of
            a discrete SGD step that the SDE drops (the tracker's ``step_curvature``); off by
            default: Def 10 has no such term.
        integrate: names of terms (among ``"drift"``, ``"noise_curvature"``,
            ``"diffusion_sq"``, ``"step_curvature"``) whose time integral per layer is
            carried as extra state columns (read with :meth:`LipschitzSDE.integrated
            <sdelip.sde.LipschitzSDE.integrated>`).
        decomposition: ``"auto"`` (the tracker's Gram route for CPU layers of at least
            ``FAST_MIN_DIM`` rows and columns, a batched SVD otherwise and on CUDA),
            ``"fast"`` or ``"svd"``.
        gap_tol: relative-gap tolerance of Assumption 11.
        on_degenerate: ``"warn"``, ``"raise"`` or ``"ignore"`` for a degenerate σ1.
    """

    include_drift: bool = True
    include_noise_curvature: bool = True
    include_ito_correction: bool = True
    include_diffusion: bool = True
    include_step_curvature: bool = False
    integrate: tuple = attrs.field(default=(), converter=lambda v: (v,) if isinstance(v, str) else tuple(v))
    decomposition: str = "auto"
    gap_tol: float = attrs.field(default=DEFAULT_GAP_TOL, converter=float)
    on_degenerate: str = "warn"


@attrs.frozen
class SecondMomentOptions:
    """The second moment v of :class:`~sdelip.sde.OptimizerSDE`'s Adam/AdamW and RMSprop systems at the first step.

    A real step's v moves by (1 − β2)((ĝ + ξ)² − v) = (1 − β2)(ĝ² + diag Σ̂ − v)
    + 2(1 − β2)ĝ∘ξ + (1 − β2)(ξ∘ξ − diag Σ̂); the first-order SDE of Malladi et al. (2022) keeps
    only the expected part, v carries no noise (docs/theory.md §16, where the measurements of
    what that costs are).

    Attributes:
        first_step: Adam's v_1 in :meth:`~sdelip.sde.OptimizerSDE.initial_state`:
            ``"expected"`` (default) (1 − β2)(ĝ_0² + diag Σ̂), v as the SDE has it throughout, or
            ``"drawn"`` (1 − β2)(ĝ_0 + ξ_0)² from the same noise draw ξ_0 as m_1 — the real first
            step's v exactly in law, the noise of v at step 1 only (measured worse than
            ``"expected"`` for Adam on the paper's MLP, docs/results.md issue 26). RMSprop:
            ``"expected"`` starts at torch's v_0 = 0 and lets the SDE make the first step (its
            v⁺ = (1 − α)(ĝ² + diag Σ̂) then normalises a Gaussian gradient, not a sign);
            ``"drawn"`` returns the state after a first step on one drawn batch, the sign-like
            step PyTorch makes from v_0 = 0, at t = η (measured: docs/results.md issue 26).
    """

    first_step: str = attrs.field(default="expected", validator=_choice("expected", "drawn"))


#: ParameterSDE keywords of earlier releases that moved onto an option object: keyword → (argument, field).
DEPRECATED_PARAMETER_SDE_KEYWORDS = {
    "weight_decay": ("drift", "weight_decay"), "grad_source": ("drift", "source"), "full_max": ("drift", "full_max"),
    "grad_batch_size": ("drift", "batch_size"), "compensate_drift_noise": ("drift", "compensate"),
    "dt": ("drift", "dt"), "noise_coupling": ("noise", "coupling"), "shared_noise_batch": ("noise", "shared_batch"),
    "traj_chunk": ("compute", "traj_chunk"), "chunk_bytes": ("compute", "chunk_bytes"),
    "data_chunk": ("compute", "data_chunk"), "max_cached": ("compute", "max_cached"),
    "dense_diffusion": ("compute", "dense_diffusion"), "example_input": ("layers", "example_input"),
    "gap_tol": ("log_k", "gap_tol"), "on_degenerate": ("log_k", "on_degenerate"),
}
#: LipschitzSDE keywords of earlier releases that moved onto :class:`LogKOptions`.
DEPRECATED_LIPSCHITZ_SDE_KEYWORDS = {
    **DEPRECATED_PARAMETER_SDE_KEYWORDS,
    **{k: ("log_k", k) for k in ("include_drift", "include_noise_curvature", "include_ito_correction",
                                 "include_diffusion", "include_step_curvature", "integrate", "decomposition")},
}
SPELLED = {"drift": "drift=DriftOptions", "noise": "noise=NoiseOptions", "compute": "compute=ComputeOptions",
           "layers": "layers=sdelip.tracked_layers(model, example_input)", "log_k": "log_k=LogKOptions"}


def evolve(obj, cls, fields: dict):
    """``obj`` (None: ``cls()``) with ``fields`` replaced."""
    obj = cls() if obj is None else obj
    return attrs.evolve(obj, **fields) if fields else obj
