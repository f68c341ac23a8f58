"""Live tracking of the Lipschitz dynamics during ordinary SGD training (Thm 14–17).

Attach a :class:`Tracker` to a normal PyTorch loop and call :meth:`Tracker.backward` with
the per-sample losses instead of ``loss.backward()``::

    tracker = Tracker(model, optimizer, record="runs/mlp.db")
    for x, y in loader:
        optimizer.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        tracker.backward(losses)        # = losses.mean().backward(), plus the measurement
        optimizer.step()
    tracker.close()

On a tracked step (see :mod:`sdelip.tracking.schedule`) the tracker decomposes every tracked
weight matrix θ^(ℓ) (Prop 9), obtains the per-sample statistics of the step's mini-batch
from an engine (:mod:`sdelip.engines`), and computes per layer the Thm 14 terms — drift μ,
noise curvature κ with its Prop 6 variance/covariance split, diffusion ‖λ‖² — the
operator norm σ1 = K^(ℓ) and the relative spectral gap, and per network the Thm 15
sums and Z = Σ log σ1, K = e^Z. Row k of the record is measured at the parameters before
update k on step k's mini-batch, at SDE time t_k = Σ_{j<k} η_j (docs/theory.md §1).

The theory is plain SGD (Def 4): η is the optimizer's learning rate; SGD weight decay is
reflected exactly in the drift (μ −= λ_wd, docs/theory.md §6); momentum or another optimizer
gives a :class:`NotPlainSGDWarning` and the terms are computed as for plain SGD. The
expected gradient ∇L of μ is estimated by the step's mini-batch mean, whose realisation is
the update actually applied (docs/theory.md §2).

K is the product bound of Prop 8 over the tracked weight matrices (:mod:`sdelip.rules.inventory`,
:mod:`sdelip.rules`): it treats every activation as 1-Lipschitz and ignores skip
connections. A weight applied c > 1 times (tied weights, a module called several times)
is one layer with one σ1 and one set of Thm 14 terms, and contributes σ1^c to K; the
network terms are those of that factor (:func:`sdelip.core.formulas.repeated_use_terms`).

The tracker orchestrates one tracked step (schedule, SDE time, one call per step into the
measurement pipeline, the record row); its collaborators are the sibling modules listed in
:mod:`sdelip.tracking`. The module's length is mostly the documentation of its arguments.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from .._checks import (
    NonFiniteError,
    check_choice,
    check_engine_loss_fn,
    check_losses,
    check_module,
    check_non_negative_int,
    check_optional_positive_int,
)
from ..engines import Engine, EngineNotApplicableError, coupling_modules, make_engine, resolve_engine_name
from ..rules.inventory import LeftOut, TrackedLayer, weight_inventory
from .hooks import InputMismatchError, ModuleMonitor
from .optimizer_view import NotPlainSGDWarning, OptimizerView
from .measurement import decompose_layers, layer_terms_from_statistics, step_record
from .probes import lipschitz_lower_bound
from ..record import RecordWriter, StepRecord, load_record
from .metadata import build_metadata
from .schedule import Schedule, as_schedule
from ..core.spectral import DEFAULT_GAP_TOL
from .threads import use_threads
from .checkpointing import CHECKPOINT_FORMAT, TrackerCheckpointing
from .safety import GradientAccumulationError, SmallBatchWarning, check_one_backward_per_step, explain_overflow

__all__ = ["Tracker", "NotPlainSGDWarning", "InputMismatchError", "SmallBatchWarning", "GradientAccumulationError",
           "CHECKPOINT_FORMAT"]



class Tracker(TrackerCheckpointing):
    """Measure the Lipschitz dynamics (Thm 14–15) of a model during ordinary SGD training.

    Args:
        model: the network. Its weight matrices, found through the layer rules
            (:mod:`sdelip.rules`: Linear, Conv1d/2d/3d, Embedding, MultiheadAttention's
            projections; the per-module fallback for any other trainable parameter of two
            or more dimensions), in forward order, are the tracked layers θ^(ℓ)
            (:func:`sdelip.rules.inventory.weight_inventory`; names: a ``.weight`` by its module
            path, other weights by their parameter name). Biases and normalisation
            parameters are trained but not tracked; :attr:`left_out` lists them.
        optimizer: the optimizer stepping the model; η and the weight decay are read from
            the param group of each tracked weight at every step. None needs ``lr``.
        record: path of the SQLite record (:mod:`sdelip.record`), or None to keep the
            rows in memory (:attr:`history`).
        engine: ``"auto"`` (coupled when a BatchNorm normalises with batch statistics,
            factored otherwise), ``"factored"``, ``"materialised"`` or ``"coupled"``.
        schedule: which steps to track: None or 1 (every step), an int N (every N
            steps), ``"log"``, a :class:`~sdelip.tracking.schedule.Schedule` or a callable.
        split: also compute the Prop 6 variance/covariance split of κ.
        extra_noise_var: s² of an isotropic perturbation N(0, s² I) added to the batch
            gradient after the backward (noisy-gradient runs, Sec 8.4); settable attribute.
        metadata: extra run metadata merged into the record's.
        example_input: an input batch used once to order the layers by a forward pass and
            to count how many times each tracked module is called in it (tied weights and
            modules called several times, :func:`sdelip.rules.inventory.tracked_layers`). Without it
            every module is taken to be called once per forward pass.
        loss_fn: ``loss_fn(outputs, targets)`` → per-sample losses; the materialised engine
            needs it (and ``batch=`` in :meth:`backward`).
        decomposition: how the operator-norm derivatives (Lemma 12–13) are evaluated:
            ``"fast"`` (default; the top two eigenpairs and the resolvent of the smaller
            Gram matrix, :mod:`sdelip.core.decompositions` — same numbers as the SVD route,
            several times cheaper on CPU; falls back to ``"svd"`` for a degenerate
            spectrum), ``"svd"`` (full thin SVD, :func:`sdelip.core.spectral.decompose`) or
            ``"gram"`` (full eigendecomposition of the smaller Gram matrix). The Gram
            routes square the condition number: in float32 expect relative errors of
            about 1e-7 / gap.
        on_degenerate: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when σ1 is (nearly)
            repeated (Assumption 11); a degenerate layer is flagged in the record.
        gap_tol: relative gap (σ1 − σ2)/σ1 below which σ1 counts as degenerate.
        probe_every: every this many steps, measure the exact operator norm of each Conv2d
            on its actual input shape and, with ``probe_input``, an empirical lower bound of
            the network's Lipschitz constant (:mod:`sdelip.tracking.probes`).
        probe_input: (N, …) probe inputs for the Lipschitz lower bound.
        lr: the learning rate when ``optimizer`` is None.
        overwrite: replace an existing record file that already holds steps.
        durability: ``"process"`` or ``"power"`` (see :class:`~sdelip.record.RecordWriter`).
        chunk_bytes: memory budget of one chunk of per-sample intermediates (default: 8 MiB
            for the factored engine, 32 MiB for the vectorised ones).
        check_inputs: check on every forward that inputs match the model's device and dtype.
        seed: the run's seed, stored in the metadata (default: ``torch.initial_seed()``).
        start_step: the index of the first step (for a run continued by the caller's own
            checkpointing): the step counter starts there, t = start_step·η (constant η
            assumed), and an existing record is continued after dropping its rows from
            ``start_step`` on. :meth:`checkpoint` / :meth:`resume` restore the exact state
            instead (SDE time, RNGs, optimizer).
        threads: torch threads for the tracker's own computations (decompositions and
            terms; the per-sample statistics run inside the backward with the training's
            threads). None keeps the current setting; 1 avoids the busy-waiting slowdowns
            of multi-threaded small linear algebra on a machine shared with other jobs.
        unsupported: a trainable weight matrix without a layer rule is tracked exactly by
            the per-module fallback (``"fallback"``, per-sample gradients of that module
            alone by ``torch.func``) or refused at construction with its name
            (``"error"``, :class:`~sdelip.rules.inventory.UnsupportedLayerError`).

    Attributes:
        step: the number of :meth:`backward` calls so far (the next step's index k).
        t: the SDE time of the next step, Σ_{j<k} η_j.
        layers: the tracked layers.
        left_out: every parameter that is not tracked, with the reason
            (:class:`~sdelip.rules.inventory.LeftOut`; also in the record's metadata).
        engine: the :class:`~sdelip.engines.Engine` in use (``engine.name``).
        history: the tracked steps' :class:`~sdelip.record.StepRecord` when ``record`` is None.
        last: the most recent :class:`~sdelip.record.StepRecord`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        record: Union[None, str, os.PathLike] = None,
        engine: Union[str, type] = "auto",
        schedule=None,
        split: bool = True,
        extra_noise_var: float = 0.0,
        metadata: Optional[Mapping[str, Any]] = None,
        example_input: Optional[torch.Tensor] = None,
        loss_fn: Optional[Callable] = None,
        decomposition: str = "fast",
        on_degenerate: str = "warn",
        gap_tol: float = DEFAULT_GAP_TOL,
        probe_every: Optional[int] = None,
        probe_input: Optional[torch.Tensor] = None,
        lr: Optional[float] = None,
        overwrite: bool = False,
        durability: str = "process",
        chunk_bytes: Optional[int] = None,
        check_inputs: bool = True,
        seed: Optional[int] = None,
        start_step: int = 0,
        threads: Optional[int] = None,
        unsupported: str = "fallback",
        _record_mode: Optional[str] = None,
        _record_lock=None,
    ):
        check_module(model)
        check_choice(decomposition, "decomposition", ("fast", "svd", "gram"))
        check_choice(on_degenerate, "on_degenerate", ("warn", "raise", "ignore"))
        self.probe_every = check_optional_positive_int(probe_every, "probe_every")
        self.threads = check_optional_positive_int(threads, "threads")
        start_step = check_non_negative_int(start_step, "start_step")
        self.model = model
        self.optimizer = optimizer
        self.unsupported = unsupported
        self.layers: list[TrackedLayer]
        self.left_out: list[LeftOut]
        self.layers, self.left_out = weight_inventory(model, unsupported, example_input)
        self.schedule: Schedule = as_schedule(schedule)
        self.split = bool(split)
        self.extra_noise_var = float(extra_noise_var)
        self.decomposition = decomposition
        self.on_degenerate = on_degenerate
        self.gap_tol = float(gap_tol)
        self.probe_input = probe_input
        self.loss_fn = loss_fn
        self.step = 0
        self.t = 0.0
        self._t_anchor = (0, 0.0, None)
        self.history: list[StepRecord] = []
        self.last: Optional[StepRecord] = None
        self._closed = False
        self._probe_vectors: dict[str, torch.Tensor] = {}
        self._hooks: list = []

        # -- optimizer ------------------------------------------------------------------------
        self.optim = OptimizerView(optimizer, self.layers, lr)
        self.optim.warn(stacklevel=3)

        # -- engine ---------------------------------------------------------------------------
        self.engine_requested = engine if isinstance(engine, str) else getattr(engine, "name", str(engine))
        name = resolve_engine_name(model, engine)
        check_engine_loss_fn(name, loss_fn)
        self.engine: Engine = make_engine(name, model, self.layers, split=self.split, chunk_bytes=chunk_bytes,
                                          loss_fn=loss_fn)
        self.engine.check_applicable()
        self.engine.attach()
        if start_step:
            lr0 = self._hyperparameters(start_step)[0]
            self.step = start_step
            self.t = start_step * lr0
            self._t_anchor = (0, 0.0, lr0)
        self.engine.arm(self.schedule(self.step))

        # -- hooks: input checks, probe shapes, the uses of every weight; one backward per step ---
        self.monitor = ModuleMonitor(model, self.layers, check_inputs, example_input is not None, lambda: self.step)
        self.monitor.attach()
        self._ref_dtype, self._ref_device = self.monitor.ref_dtype, self.monitor.ref_device
        self._hooks.extend(self.optim.attach())

        # -- record ---------------------------------------------------------------------------
        self.record_path = None if record is None else Path(record)
        self.writer: Optional[RecordWriter] = None
        self._metadata = build_metadata(self, metadata, seed)
        if self.record_path is not None:
            mode = _record_mode or ("overwrite" if overwrite else "new")
            if start_step and mode == "new":
                mode = "append"
            try:
                self.writer = RecordWriter(
                    self.record_path,
                    [(l.name, l.kind, l.shape, l.uses) for l in self.layers],
                    self._metadata,
                    mode=mode,
                    durability=durability,
                    lock=_record_lock,
                )
            except BaseException:
                self._remove_hooks()
                raise
            if mode == "append":  # the record's metadata is the run's: keep it (batch size, earlier resumes)
                self._metadata = {**self._metadata, **self.writer.metadata()}
            if start_step and _record_mode is None:
                self._continue_record(start_step)

    # ------------------------------------------------------------------------------------------
    # setup helpers
    def _hyperparameters(self, step: int) -> tuple[float, dict[str, float]]:
        """η and the per-layer weight decay in effect for update ``step`` (:class:`~sdelip.tracking.optimizer_view.OptimizerView`)."""
        return self.optim.hyperparameters(step)

    @property
    def metadata(self) -> dict:
        """The run metadata (as written to the record)."""
        return dict(self._metadata)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.monitor.detach()
        self.engine.detach()

    # ------------------------------------------------------------------------------------------
    # the step
    def is_tracked(self, step: Optional[int] = None) -> bool:
        """Whether step ``step`` (default: the next one) is measured."""
        return bool(self.schedule(self.step if step is None else int(step)))

    def backward(self, losses: torch.Tensor, batch=None) -> Optional[StepRecord]:
        """Backward of the mean per-sample loss, and on tracked steps the measurement.

        Leaves ``p.grad`` = ∇ mean(losses) exactly as ``losses.mean().backward()`` would, so
        that ``optimizer.step()`` afterwards is the ordinary SGD update.

        Args:
            losses: (M,) per-sample losses ℓ_i of the loss being optimised
                (``reduction="none"``); a tracked step needs M ≥ 2 (else it is skipped).
            batch: ``(inputs, targets)``, needed only by the materialised engine.

        Returns:
            The step's :class:`~sdelip.record.StepRecord` (written to the record) on a
            tracked step, else None.

        Raises:
            ValueError: a scalar or mis-shaped loss.
            GradientAccumulationError: a second call without ``optimizer.step()`` in between.
            NonFiniteError: NaN/Inf in a loss, a per-sample gradient or a term (the message
                names the step and layer; nothing is written for this step).

        A tracked step with M = 1 (e.g. the last batch of an epoch) is not tracked: it
        gives a :class:`SmallBatchWarning` and the plain backward.
        """
        if self._closed:
            raise RuntimeError("the tracker is closed")
        step = self.step
        check_losses(losses, step)
        M = int(losses.shape[0])
        tracked = bool(self.schedule(step))
        check_one_backward_per_step(self, step)
        if tracked and M < 2:
            warnings.warn(
                f"step {step} has a mini-batch of M = {M} sample (e.g. the last batch of an epoch with "
                "drop_last=False): it is not tracked, since the gradient-noise estimator (Prop 5) divides by M − 1; "
                "the backward is the plain one and the run goes on. DataLoader(..., drop_last=True) avoids such "
                "batches", SmallBatchWarning, stacklevel=2,
            )
            tracked = False
        lr, wds = self._hyperparameters(step)
        rec = None
        if tracked:
            rec = self._tracked_backward(losses, batch, step, M, lr, wds)
        else:
            self.engine.plain_backward(losses)
        probes = None
        if self.probe_every and step % self.probe_every == 0:
            self.engine.arm(False)  # the probes' forward passes are not part of the step
            probes = self._probe(step)
        if rec is not None:
            if probes:
                rec = StepRecord(rec.step, rec.t, rec.lr, rec.loss, rec.batch_size, rec.layers, rec.network,
                                 rec.degenerate, probes)
            if self.writer is not None:
                if step == 0 or self._metadata.get("batch_size") is None:
                    self._metadata["batch_size"] = M
                    self.writer.update_metadata({"batch_size": M})
                self.writer.write(rec)
            else:
                self.history.append(rec)
            self.last = rec
        elif probes and self.writer is not None:
            self.writer.write_probes(step, probes)
        self._advance_time(step, lr)
        self.step = step + 1
        self.optim.backwards_since_step += 1
        self.engine.arm(self.schedule(self.step))
        return rec

    def _advance_time(self, step: int, lr: float) -> None:
        # t_{k+1} = t_k + η_k, computed as t_anchor + (k + 1 − k_anchor)·η while η is constant, so
        # that a constant learning rate gives t_k = k·η without accumulated rounding.
        a_step, a_t, a_lr = self._t_anchor
        if lr != a_lr:
            self._t_anchor = (step, self.t, lr)
            a_step, a_t, a_lr = self._t_anchor
        self.t = a_t + (step + 1 - a_step) * a_lr

    def _tracked_backward(self, losses, batch, step, M, lr, wds) -> StepRecord:
        if M < 2:
            raise ValueError(
                f"step {step} is tracked but its mini-batch has M = 1 sample: the gradient-noise estimator "
                "(Prop 5) divides by M − 1 and needs at least 2 samples; use batches of 2 or more "
                "(e.g. DataLoader(..., drop_last=True))"
            )
        if not self.engine.handles_coupling:
            mods = coupling_modules(self.model)
            if mods:
                raise EngineNotApplicableError(
                    f"step {step}: {', '.join(map(repr, mods))} normalise with batch statistics (BatchNorm in "
                    f"training mode), which couples the samples, but the {self.engine.name} engine assumes "
                    "independent samples; create the Tracker with engine='coupled' (engine='auto' picks it when "
                    "the model is in training mode at construction)"
                )
        if self.engine.needs_batch and batch is None:
            raise ValueError(
                f"step {step}: the {self.engine.name} engine needs the mini-batch: tracker.backward(losses, batch=(x, y))"
            )
        with self._thread_limit():
            decomps = self._decompose_all(step)
        directions = {name: (d.u1, d.v1) for name, d in decomps.items()}
        try:
            stats = self.engine.backward(losses, directions, batch=batch, step=step)
        except NonFiniteError as exc:
            raise explain_overflow(exc, losses, self._ref_dtype) from None
        with self._thread_limit():
            terms = self._all_terms(decomps, stats, lr, wds, step)
        return self._step_record(terms, losses, step, M, lr)

    def _thread_limit(self):
        """``threads`` torch threads for the tracker's own computations (a no-op for None or the current number)."""
        if self.threads is None or self.threads == torch.get_num_threads():
            return contextlib.nullcontext()
        return use_threads(self.threads)

    def _decompose_all(self, step: int) -> dict:
        return decompose_layers(self.layers, self.decomposition, self.gap_tol, self.on_degenerate, step)

    def _all_terms(self, decomps, stats, lr, wds, step) -> dict:
        return layer_terms_from_statistics(self.layers, decomps, stats, lr, wds, self.split, self.extra_noise_var,
                                           step)

    def _step_record(self, terms, losses, step, M, lr) -> StepRecord:
        return step_record(self.layers, terms, losses, step, float(self.t), M, lr, self.extra_noise_var)

    # ------------------------------------------------------------------------------------------
    # probes
    def _probe(self, step: int) -> dict[str, float]:
        out = {}
        gen = torch.Generator().manual_seed(1234567 + step)
        for layer in self.layers:
            if layer.name in self.monitor.input_shapes:
                res = layer.rule.operator_norm_probe(layer.module, self.monitor.input_shapes[layer.name],
                                                     init=self._probe_vectors.get(layer.name), generator=gen)
                if res is None:
                    continue
                self._probe_vectors[layer.name] = res.vector.detach().cpu()
                out[f"conv_opnorm/{layer.name}"] = float(res.norm)
        if self.probe_input is not None:
            out["lipschitz_lower"] = float(lipschitz_lower_bound(self.model, self.probe_input, generator=gen))
        return out

    # ------------------------------------------------------------------------------------------
    # records and lifecycle
    def to_dataframe(self):
        """The record so far as :func:`sdelip.record.load_record`'s DataFrame (also without a file)."""
        if self.record_path is not None:
            return load_record(self.record_path)
        import pandas as pd

        return pd.DataFrame([r.as_row() for r in self.history])

    def close(self) -> None:
        """Remove the hooks and close the record (idempotent)."""
        if self._closed:
            return
        self._remove_hooks()
        if self.writer is not None:
            self.writer.close()
        self._closed = True

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __deepcopy__(self, memo) -> "Tracker":
        """The tracker itself: it is the one writer of its record, not copied with the model.

        ``copy.deepcopy(model)`` (EMA weights, best-model snapshots) copies the model's hooks,
        which refer to the tracker; the copy's hooks refer to this same tracker. Forward
        passes of the copy without gradients (the usual use) are not seen by the tracker.
        """
        memo[id(self)] = self
        return self

    def __del__(self):  # pragma: no cover - best effort
        try:
            if not self._closed and self.writer is not None:
                self.writer.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"Tracker(engine={self.engine.name!r}, layers={[l.name for l in self.layers]}, step={self.step}, "
                f"schedule={self.schedule.describe()!r}, record={str(self.record_path) if self.record_path else None!r})")
