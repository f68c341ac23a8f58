"""One evaluation of Def 4's coefficients, and how extra state rows compose with it.

:class:`~sdelip.sde.ParameterSDE` evaluates, at a batch of states (t, y), Def 4's drift
of the parameters θ and the noise that drives them: a mini-batch (factored engine) or
the columns of the factor G = Ωᵀ/√M themselves (materialised engine). That evaluation
is an :class:`Evaluation`, cached so that torchsde's separate calls for the drift and
the diffusion share one mini-batch.

A system may carry more state than θ: :class:`ExtraRows` is the interface of such rows,
with their own drift and diffusion rows on the same Brownian motion, computed from the
same evaluation. The state is then [θ, extra]; the parameter system stays as it is and
asks the rows, once per evaluation, for a :class:`NoiseObserver` of its noise pass (the
per-layer inputs and output gradients of the factored pass, or the per-sample rows of
the materialised one) and then for their coefficients. The log K^(ℓ) rows of Def 10
(:class:`sdelip.sde.LipschitzSDE`, Thm 14) are the one such component.

:class:`ChunkPlan` sizes the batched calls of an evaluation to a memory budget.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import attrs
import torch

from .noise.materialised import activation_numel

__all__ = ["Evaluation", "NoiseObserver", "ExtraRows", "ChunkPlan", "CHUNK_BYTES", "CPU_ROWS_PER_CALL"]

#: Default memory budget of one chunk of trajectories (bytes) on CPU; on CUDA a quarter
#: of the free device memory.
CHUNK_BYTES = 512 << 20
#: On CPU, at most this many samples (trajectories × samples) per batched call: beyond it
#: stacking trajectories only costs cache (docs/performance.md, "Timings behind the
#: code's defaults").
CPU_ROWS_PER_CALL = 4096


@attrs.define(eq=False)
class Evaluation:
    """Def 4's coefficients at the states (t, y) of n trajectories.

    Attributes:
        t: the time.
        y: the states (n, state_size) evaluated (θ = ``y[:, :P]``); ``version`` their
            ``_version`` then (an in-place change is a new state).
        drift: Def 4's drift −∇L(θ) − λ_wd θ of the θ part, (n, P).
        params: the trajectories' parameters {name: (n, *shape)}.
        grad: the expected gradient {name: (n or 1, *shape)}.
        batch: the noise mini-batch (X, Y) of the factored engine, or None.
        noise: per parameter (layout order), the columns of G as rows (n, M, numel):
            √η s (g_i − ḡ)/√(M(M−1)) (materialised engine, or once the dense diffusion
            asked for them), else None.
        extra: what the system's :class:`ExtraRows` computed at this evaluation, or None.
        state_drift: the drift of the whole state [θ, extra] (formed once), or None.
    """

    t: float
    y: torch.Tensor
    drift: torch.Tensor
    params: Dict[str, torch.Tensor]
    grad: Dict[str, torch.Tensor]
    batch: Optional[tuple] = None
    noise: Optional[list] = None
    extra: Any = None
    state_drift: Optional[torch.Tensor] = None
    version: int = attrs.field(init=False)

    def __attrs_post_init__(self):
        self.version = self.y._version

    def holds(self, t: float, y: torch.Tensor) -> bool:
        """Whether this is the evaluation at (t, y): the same tensor, unchanged, at the same time."""
        return self.y is y and self.version == y._version and self.t == t


class NoiseObserver:
    """Sees the noise pass of one evaluation (:meth:`ParameterSDE.noise_pass`); both methods default to nothing.

    ``rows`` receives the materialised engine's noise rows (:attr:`Evaluation.noise`);
    ``chunk`` receives, per chunk of trajectories of the factored pass, the slice of
    trajectories and per tracked layer name its inputs x (c, M, …) and per-sample output
    gradients δ (c, M, …) on the noise mini-batch: what a layer rule's
    ``trajectory_projections`` turns into g_i v1 and g_iᵀ u1 (docs/theory.md §8).
    """

    def rows(self, rows: list) -> None:
        """The noise rows, per parameter (n, M, numel) in layout order."""

    def chunk(self, sl: slice, inputs: Dict[str, torch.Tensor], deltas: Dict[str, torch.Tensor]) -> None:
        """The layer inputs and output gradients of the trajectories ``sl``."""


class ExtraRows:
    """Extra state rows [θ, extra] with their own drift and diffusion rows (the interface).

    The rows are driven by the parameters' Brownian motion and computed from the
    parameter system's evaluation; the methods receive the system (a
    :class:`~sdelip.sde.ParameterSDE`) instead of holding it.

    Attributes:
        width: the number of extra state columns.
    """

    width: int = 0

    def initial_state(self, sde, theta: torch.Tensor) -> torch.Tensor:
        """The extra rows (1, width) of the initial state whose θ part is ``theta`` (1, P)."""
        raise NotImplementedError

    def observer(self, sde, ev: Evaluation) -> Optional[NoiseObserver]:
        """Called once per fresh evaluation, before its noise pass; an observer of that pass, or None."""
        return None

    def evaluate(self, sde, ev: Evaluation, observer: Optional[NoiseObserver]):
        """The rows' coefficients at ``ev`` after the noise pass: an object with ``drift`` (n, width)."""
        raise NotImplementedError

    def g_prod(self, sde, coefficients, v: torch.Tensor, out: torch.Tensor) -> None:
        """Write the rows' part of the diffusion times v into ``out`` (n, width)."""
        raise NotImplementedError

    def dense(self, sde, coefficients, G: torch.Tensor) -> None:
        """Write the rows' dense diffusion into ``G`` (n, width, brownian_size) (tests and small models)."""
        raise NotImplementedError


class ChunkPlan:
    """Trajectories and samples per batched call of an evaluation, from a memory budget.

    Args:
        traj_chunk: trajectories per batched call (fixed), or None to size them.
        chunk_bytes: memory budget of one chunk of trajectories (default
            :data:`CHUNK_BYTES` on CPU, a quarter of the free memory on CUDA).
    """

    def __init__(self, traj_chunk: Optional[int] = None, chunk_bytes: Optional[int] = None):
        self.traj_chunk = None if traj_chunk is None else int(traj_chunk)
        self.chunk_bytes = None if chunk_bytes is None else int(chunk_bytes)
        self._sizes: Dict[tuple, tuple] = {}

    def sizes(self, sde, ref: torch.Tensor) -> tuple:
        """(trajectories per noise pass, per expected-gradient call, samples per expected-gradient call).

        ``traj_chunk`` fixes the trajectories; otherwise the budget is divided by an
        estimate of one trajectory's working memory: its parameters and gradients, and
        the activations of M noise samples (of one data chunk for the expected gradient,
        whose samples per call are also cut to fit the budget).
        """
        x1, _ = sde.data.example(device=ref.device, dtype=ref.dtype)
        key = (tuple(x1.shape[1:]), ref.dtype, str(ref.device))
        sizes = self._sizes.get(key)
        if sizes is None:
            budget = self.chunk_bytes
            if budget is None:
                budget = CHUNK_BYTES
                if ref.device.type == "cuda":
                    budget = torch.cuda.mem_get_info(ref.device)[0] // 4
            src = sde.gradient_fn
            theta = sde.layout.flatten_model(sde.model).to(device=ref.device, dtype=ref.dtype)
            act = activation_numel(sde.model, sde.layout.unflatten(theta), src.consts(ref), x1)
            item = ref.element_size()
            P, M = sde.n_params, sde.M
            N = src.grad_batch_size if src.grad_source == "batch" else len(sde.data)
            rows = max(1, min(N, src.data_chunk, budget // (3 * act * item)))
            per_noise = item * (3 * M * act + 4 * P + (3 * M * P if sde.engine == "materialised" else 0))
            per_drift = item * (3 * rows * act + 3 * P)
            chunks = [int(max(1, budget // per)) for per in (per_noise, per_drift)]
            if ref.device.type == "cpu":  # batching trajectories gains nothing once the matrices are this tall
                chunks = [max(1, min(c, CPU_ROWS_PER_CALL // r)) for c, r in zip(chunks, (M, rows))]
            sizes = (*chunks, int(rows))
            self._sizes[key] = sizes
        if self.traj_chunk is not None:
            return self.traj_chunk, self.traj_chunk, sizes[2]
        return sizes
