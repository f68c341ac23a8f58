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
from typing import Callable, Optional, Union

import attrs
import torch
from torch import nn

from .._checks import (
    NonFiniteError,
    check_engine_loss_fn,
    check_losses,
    check_module,
    check_non_negative_int,
)
from ..engines import Engine, EngineNotApplicableError, coupling_modules, make_engine, resolve_engine_name
from ..rules.inventory import LeftOut, TrackedLayer, weight_inventory
from .hooks import InputMismatchError, ModuleMonitor
from .optimizer_view import NotPlainSGDWarning, OptimizerView
from ..core.formulas import blank_coefficients
from ..core.amortised import AmortisedGeometry
from .measurement import AMORTISED_ROUTES, decompose_layers, layer_terms_from_statistics, step_record, update_terms_from_statistics
from .probes import lipschitz_lower_bound
from ..record import RecordWriter, StepRecord, load_record
from ..loggers import LoggerFanout
from .metadata import build_metadata
from .schedule import Schedule, as_schedule
from .options import RecordOptions, RuntimeOptions, TrackingOptions, tracker_options
from .threads import use_threads
from .checkpointing import CHECKPOINT_FORMAT, TrackerCheckpointing
from .update import GradientEdit, PendingStep, gradient_edit, realised_increments, realised_network
from .safety import GradientAccumulationError, SmallBatchWarning, check_one_backward_per_step, explain_overflow

__all__ = ["Tracker", "TrackingOptions", "RecordOptions", "RuntimeOptions", "NotPlainSGDWarning", "InputMismatchError", "SmallBatchWarning", "GradientAccumulationError",
           "CHECKPOINT_FORMAT"]



def _precision(autocast, dtype) -> str:
    """The precision of the tracked forward passes: ``"float32"``, or ``"autocast bfloat16 (parameters float32)"``."""
    name = str(dtype).replace("torch.", "")
    return name if autocast is None else f"autocast {str(autocast).replace('torch.', '')} (parameters {name})"


class Tracker(TrackerCheckpointing):
    """Measure the Lipschitz dynamics (Thm 14–15) of a model during ordinary SGD training.

    The simple case is ``Tracker(model, optimizer, record="run.db")``; the common options
    are keywords, the others grouped in small frozen option objects
    (:mod:`sdelip.tracking.options`): :class:`~sdelip.tracking.options.TrackingOptions`
    (what is measured and how: the options that shape the record, which a resumed run
    keeps), :class:`~sdelip.tracking.options.RecordOptions` (where and how the record is
    written) and :class:`~sdelip.tracking.options.RuntimeOptions` (how the tracker runs).

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
        record: path of the SQLite record (:mod:`sdelip.record`), None to keep the rows in
            memory (:attr:`history`), or a :class:`~sdelip.tracking.options.RecordOptions`
            (path, mode ``"new"``/``"overwrite"``/``"append"``, durability, run metadata,
            seed, an already held record lock).
        engine: ``"auto"``, ``"factored"``, ``"materialised"`` or ``"coupled"``; sets
            ``options.engine`` (None: the options' value, ``"auto"`` by default).
        schedule: which steps to track: 1 (every step), an int N (every N steps),
            ``"log"``, a :class:`~sdelip.tracking.schedule.Schedule`, a callable or an
            iterable of steps; sets ``options.schedule`` (None: the options' value, every
            step by default).
        options: a :class:`~sdelip.tracking.options.TrackingOptions`: engine, schedule,
            the Prop 6 split, the decomposition route, the gap tolerance and the policy
            for a degenerate σ1, the probe interval.
        example_input: an input batch used once to order the layers by a forward pass and
            to count how many times each tracked module is called in it (tied weights and
            modules called several times, :func:`sdelip.rules.inventory.tracked_layers`): a tensor
            (``model(x)``), a tuple of positional arguments or a dict of keyword arguments
            (``model(**kw)``, e.g. T5's ``input_ids``/``decoder_input_ids``). The uses are counted,
            not the modules: a module holding a tied weight that the pass never calls counts 0.
            Without it every module is taken to be called once per forward pass.
        loss_fn: ``loss_fn(outputs, targets)`` → per-sample losses; the materialised engine
            needs it (and ``batch=`` in :meth:`backward`).
        lr: the learning rate when ``optimizer`` is None.
        start_step: the index of the first step (for a run continued by the caller's own
            checkpointing): the step counter starts there, t = start_step·η (constant η
            assumed), and an existing record is continued after dropping its rows from
            ``start_step`` on. :meth:`checkpoint` / :meth:`resume` restore the exact state
            instead (SDE time, RNGs, optimizer).
        probe_input: (N, …) probe inputs for the Lipschitz lower bound measured every
            ``options.probe_every`` steps.
        runtime: a :class:`~sdelip.tracking.options.RuntimeOptions`: chunk memory budget,
            threads, input checks, weights without a layer rule.

    The flat keywords of earlier releases (``split``, ``decomposition``, ``gap_tol``,
    ``on_degenerate``, ``probe_every``, ``overwrite``, ``durability``, ``metadata``,
    ``seed``, ``chunk_bytes``, ``threads``, ``check_inputs``, ``unsupported``,
    ``extra_noise_var``) still work for this release with a DeprecationWarning naming
    their replacement.

    Attributes:
        step: the number of :meth:`backward` calls so far (the next step's index k).
        t: the SDE time of the next step, Σ_{j<k} η_j.
        layers: the tracked layers.
        left_out: every parameter that is not tracked, with the reason
            (:class:`~sdelip.rules.inventory.LeftOut`; also in the record's metadata).
        engine: the :class:`~sdelip.engines.Engine` in use (``engine.name``).
        options: the :class:`~sdelip.tracking.options.TrackingOptions` in use (``engine`` and
            ``schedule`` as given; the resume check compares them).
        record_options, runtime: the :class:`~sdelip.tracking.options.RecordOptions` and
            :class:`~sdelip.tracking.options.RuntimeOptions` in use.
        extra_noise_var: s² of an isotropic perturbation N(0, s² I) added to the batch
            gradient after the backward (noisy-gradient runs, Sec 8.4); 0 unless set.
        history: the tracked steps' :class:`~sdelip.record.StepRecord` when ``record`` is None.
        last: the most recent :class:`~sdelip.record.StepRecord`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        record: Union[None, str, os.PathLike, RecordOptions] = None,
        *,
        engine: Union[None, str, type] = None,
        schedule=None,
        options: Optional[TrackingOptions] = None,
        example_input=None,
        loss_fn: Optional[Callable] = None,
        lr: Optional[float] = None,
        start_step: int = 0,
        probe_input: Optional[torch.Tensor] = None,
        runtime: Optional[RuntimeOptions] = None,
        **deprecated,
    ):
        check_module(model)
        options, rec, runtime, extra_noise_var = tracker_options(engine, schedule, options, record, runtime, deprecated)
        self.options, self.record_options, self.runtime = options, rec, runtime
        self.probe_every = options.probe_every
        self.threads = runtime.threads
        start_step = check_non_negative_int(start_step, "start_step")
        self.model = model
        self.optimizer = optimizer
        self.unsupported = runtime.unsupported
        self.layers: list[TrackedLayer]
        self.left_out: list[LeftOut]
        self.layers, self.left_out = weight_inventory(model, runtime.unsupported, example_input)
        self.schedule: Schedule = as_schedule(options.schedule)
        self.split = options.split
        self.extra_noise_var = extra_noise_var
        self.decomposition = options.decomposition
        self.on_degenerate = options.on_degenerate
        self.gap_tol = options.gap_tol
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
        self._loggers = LoggerFanout(runtime.loggers)  # live export of the rows (sdelip.loggers)

        # -- optimizer ------------------------------------------------------------------------
        self.optim = OptimizerView(optimizer, self.layers, lr)
        self.optim.warn(stacklevel=3)

        # -- engine ---------------------------------------------------------------------------
        engine = options.engine
        self.engine_requested = engine if isinstance(engine, str) else getattr(engine, "name", str(engine))
        name = resolve_engine_name(model, engine)
        check_engine_loss_fn(name, loss_fn)
        self.engine: Engine = make_engine(name, model, self.layers, split=self.split, chunk_bytes=runtime.chunk_bytes,
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
        self.monitor = ModuleMonitor(model, self.layers, runtime.check_inputs, example_input is not None, lambda: self.step)
        self.monitor.attach()
        self._ref_dtype, self._ref_device = self.monitor.ref_dtype, self.monitor.ref_device
        self._pending: Optional[PendingStep] = None  # a tracked step waiting for optimizer.step()
        self._hooks.extend(self.optim.attach(self._before_step, self._after_step))

        # -- record ---------------------------------------------------------------------------
        self.record_path = rec.path
        self.writer: Optional[RecordWriter] = None
        self._metadata = build_metadata(self, rec.metadata, rec.seed)
        if self.record_path is not None:
            mode = rec.mode
            if start_step and mode == "new":
                mode = "append"
            try:
                self.writer = RecordWriter(
                    self.record_path,
                    [(l.name, l.kind, l.shape, l.uses) for l in self.layers],
                    self._metadata,
                    mode=mode,
                    durability=rec.durability,
                    lock=rec.lock,
                )
            except BaseException:
                self._remove_hooks()
                raise
            if mode == "append":  # the record's metadata is the run's: keep it (batch size, earlier resumes)
                self._metadata = {**self._metadata, **self.writer.metadata()}
            if start_step and rec.mode != "append":
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
        self._flush_pending(skipped=True)
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
        rec = pending = None
        if tracked:
            rec, pending = self._tracked_backward(losses, batch, step, M, lr, wds)
        else:
            self.engine.plain_backward(losses)
        probes = None
        if self.probe_every and step % self.probe_every == 0:
            self.engine.arm(False)  # the probes' forward passes are not part of the step
            probes = self._probe(step)
        if rec is not None:
            if probes:
                rec = attrs.evolve(rec, probes=probes)
            if step == 0 or self._metadata.get("batch_size") is None:
                self._metadata["batch_size"] = M
                if self.writer is not None:
                    self.writer.update_metadata({"batch_size": M})
            precision = _precision(self.monitor.autocast, self._ref_dtype)
            if self._metadata.get("precision") != precision:  # noted when first seen and whenever it changes
                self._metadata["precision"] = precision
                if self.writer is not None:
                    self.writer.update_metadata({"precision": precision})
            if pending is not None:  # finished and written at optimizer.step() (its hooks)
                pending.record = rec
                self._pending = pending
            else:
                self._write(rec)
        elif probes and self.writer is not None:
            self.writer.write_probes(step, probes)
        self._advance_time(step, lr)
        self.step = step + 1
        self.optim.backwards_since_step += 1
        self.engine.arm(self.schedule(self.step))
        return rec

    def _write(self, rec: StepRecord) -> None:
        if self.writer is not None:
            self.writer.write(rec)
        else:
            self.history.append(rec)
        self.last = rec
        if self._loggers:
            self._loggers.write(rec, self._metadata)

    # ------------------------------------------------------------------------------------------
    # the optimizer's step: what it did with the tracked gradient (sdelip.tracking.update)
    def _before_step(self) -> None:
        """Step pre-hook: the gradient the optimizer steps with, and the weights before the update."""
        pend = self._pending
        if pend is None or pend.before is not None:
            return
        used = {l.name: (None if l.weight.grad is None else l.weight.grad.detach()) for l in self.layers}
        pend.edit = gradient_edit(pend.grads, used) if pend.grads is not None else GradientEdit(1.0)
        if not pend.edit.unchanged and pend.recompute is not None:
            with self._thread_limit():
                rec, note = pend.recompute(pend.edit, used)
            if rec is not None:
                pend.record = attrs.evolve(rec, probes=pend.record.probes)
            pend.modelled, pend.note = note is None, note
        pend.before = {l.name: l.matrix().detach().clone() for l in self.layers}

    def _after_step(self) -> None:
        """Step post-hook: the realised increment of the update applied; the row is written."""
        pend = self._pending
        if pend is None or pend.before is None:
            return
        with self._thread_limit():
            realised = realised_increments(self.layers, pend.decomps, pend.before, pend.lr)
        self._pending = None
        self._write(self._finished(pend, realised, stepped=True))

    def _flush_pending(self, skipped: bool) -> None:
        """Write a tracked step whose ``optimizer.step()`` did not come.

        ``skipped``: the next backward came first (e.g. a ``GradScaler`` skipped the update on
        an overflow): no update was applied, so the model coefficients do not describe one and
        the step is flagged. At :meth:`close` the update was merely not observed.
        """
        pend, self._pending = self._pending, None
        if pend is None:
            return
        if skipped:
            pend.modelled, pend.note = False, "optimizer.step() was not called after this step's backward (no update)"
        self._write(self._finished(pend, None, stepped=False))

    def _finished(self, pend: PendingStep, realised, stepped: bool) -> StepRecord:
        """The step's row with the realised increments and what the optimizer did."""
        rec = pend.record
        edit = pend.edit or GradientEdit(1.0)
        layers, net = {}, dict(rec.network)
        for name, q in rec.layers.items():
            r = (None, None) if realised is None else realised[name]
            layers[name] = {**q, "realised_drift": r[0], "realised_curvature": r[1]}
        if realised is not None:
            net.update(realised_network(self.layers, realised, pend.lr))
        update = {"grad_scale": edit.scale if stepped else None, "update_modelled": bool(pend.modelled),
                  "update_note": pend.note if pend.note is not None else edit.note}
        return attrs.evolve(rec, layers=layers, network=net, update=update)

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
        autocast = self.monitor.autocast
        if autocast is not None and not self.engine.handles_autocast:
            from ..errors import MixedPrecisionError

            raise MixedPrecisionError(
                f"step {step}: the forward pass ran under torch.autocast({self._ref_device.type!r}, dtype={autocast}), "
                f"and the {self.engine.name} engine cannot form the per-sample gradients of that graph (its layer "
                "statistics, or its recomputation of the forward, would not have the step's casts and rounding); "
                "create the Tracker with engine='coupled', which differentiates the step's own autocast graph"
            )
        if self.engine.needs_batch and batch is None:
            raise ValueError(
                f"step {step}: the {self.engine.name} engine needs the mini-batch: tracker.backward(losses, batch=(x, y))"
            )
        with self._thread_limit():
            decomps = self._decompose_all(step)
        directions = {name: (d.u1, d.v1) for name, d in decomps.items()}
        optim = self.optim
        kwargs = {"scale": optim.noise_scale_fn()} if optim.elementwise else {}
        try:
            stats = self.engine.backward(losses, directions, batch=batch, step=step, **kwargs)
        except NonFiniteError as exc:
            raise explain_overflow(exc, losses, self._ref_dtype) from None
        grads = None
        if optim.observed:
            grads = {l.name: (torch.zeros_like(l.weight) if l.weight.grad is None else l.weight.grad.detach().clone())
                     for l in self.layers}

        t_k = float(self.t)  # the step's SDE time: a recompute at optimizer.step() comes after the time advanced

        def terms_for(edit: GradientEdit, used) -> tuple:
            """The row for the gradient the step uses (None, note) where it cannot be modelled."""
            note = None
            if not optim.modelled:
                note = (f"the optimizer {type(self.optimizer).__name__} has no update rule (sdelip.optim): no model "
                        "coefficients")
            elif not edit.unchanged and not edit.uniform:
                note = edit.note
            elif not edit.unchanged and optim.elementwise:
                note = (f"{edit.note}; the noise terms of {type(self.optimizer).__name__} depend on the gradient "
                        "elementwise and are computed before the edit")
            with self._thread_limit():
                if note is not None:
                    terms = self._all_terms(decomps, stats, lr, wds, step)
                    terms = {k: blank_coefficients(v) for k, v in terms.items()}
                elif all(optim.is_plain(l) for l in self.layers) and edit.scale == 1.0:
                    terms = self._all_terms(decomps, stats, lr, wds, step)
                else:
                    models = {}
                    for l in self.layers:
                        g = used[l.name] if used is not None else grads[l.name]
                        nv = stats[l.name].noise_var() if optim.elementwise else None  # only adaptive rules read it
                        nv = None if nv is None else nv.reshape(l.weight.shape).to(l.weight.dtype) * edit.scale ** 2
                        models[l.name] = optim.layer_update(l, g.to(l.weight.dtype), nv, grad_scale=edit.scale)
                    terms = update_terms_from_statistics(self.layers, decomps, stats, models, lr, self.split,
                                                         self.extra_noise_var, step)
            return self._step_record(terms, losses, step, M, lr, t_k), note

        rec, note = terms_for(GradientEdit(1.0), None)
        pending = None
        if optim.observed:
            pending = PendingStep(step, lr, rec, decomps, grads, recompute=terms_for, modelled=note is None, note=note)
        return rec, pending

    def _thread_limit(self):
        """``threads`` torch threads for the tracker's own computations (a no-op for None or the current number)."""
        if self.threads is None or self.threads == torch.get_num_threads():
            return contextlib.nullcontext()
        return use_threads(self.threads)

    def _decompose_all(self, step: int) -> dict:
        state = self.__dict__.get("geometry")  # the amortised route's state (sdelip.core.amortised), made once
        if state is None and self.decomposition in AMORTISED_ROUTES:
            state = self.geometry = AmortisedGeometry()
        decomps = decompose_layers(self.layers, self.decomposition, self.gap_tol, self.on_degenerate, step, state)
        if state is not None:
            self._metadata["geometry"] = state.summary()
        return decomps

    def _all_terms(self, decomps, stats, lr, wds, step) -> dict:
        return layer_terms_from_statistics(self.layers, decomps, stats, lr, wds, self.split, self.extra_noise_var,
                                           step)

    def _step_record(self, terms, losses, step, M, lr, t=None) -> StepRecord:
        t = float(self.t) if t is None else float(t)
        return step_record(self.layers, terms, losses, step, t, M, lr, self.extra_noise_var)

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
        self._flush_pending(skipped=False)
        self._remove_hooks()
        if self.writer is not None:
            if "geometry" in self._metadata:  # which route ran, the fall-backs and the worst bound
                self.writer.update_metadata({"geometry": self._metadata["geometry"]})
            self.writer.close()
        self._loggers.close()
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
