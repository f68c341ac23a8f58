"""Checkpoint and resume of a :class:`~sdelip.tracking.tracker.Tracker`: everything a run needs to continue exactly.

A checkpoint holds the model, the optimizer, the tracker's own state (step, SDE time,
probe warm starts), the options that shape the record, the RNG states and the caller's
generators: the one checkpoint record of :mod:`sdelip.tracking.checkpoint` (:class:`Checkpoint
<sdelip.tracking.checkpoint.Checkpoint>`, also written by :func:`sdelip.workbench.train.train`), data only,
so that loading one never runs code. A resumed run checks its options against the
checkpoint's (:func:`sdelip.tracking.resume.option_changes`, as ``train`` does), truncates the record to the checkpoint's step and
continues it; the record is then the one an uninterrupted run would have written.
``Tracker(start_step=k)`` continues a record without a checkpoint (:meth:`_continue_record`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import attrs
import numpy as np
import torch
from torch import nn

from .options import RecordOptions
from .checkpoint import (CHECKPOINT_FORMAT, Checkpoint, check_belongs, check_optimizer, optimizer_class,
                         read_checkpoint, rng_state, set_rng_state, write_checkpoint)
from ..record import StepRecord
from .resume import here_and_there, option_changes
from .safety import check_continuation

__all__ = ["TrackerCheckpointing", "CHECKPOINT_FORMAT"]


class TrackerCheckpointing:
    """The checkpoint and resume methods of :class:`~sdelip.tracking.tracker.Tracker` (a mixin)."""

    def state_dict(self) -> dict:
        """The tracker's own state: step, SDE time, record path and position, probe warm starts."""
        return {
            "step": self.step,
            "t": self.t,
            "t_anchor": self._t_anchor,
            "extra_noise_var": self.extra_noise_var,
            "record": None if self.record_path is None else str(self.record_path),
            "record_id": None if self.writer is None else self.writer.record_id,
            "optimizer_class": optimizer_class(self.optimizer),
            "engine": self.engine.name,
            "layers": [l.name for l in self.layers],
            "options": self._options(),
            "probe_vectors": {k: v.clone() for k, v in self._probe_vectors.items()},
            "history": [_step_record_data(r) for r in self.history] if self.record_path is None else None,
        }

    def _options(self) -> dict:
        """The tracker options that shape a record, a resumed run must keep them: the fields of its
        :class:`~sdelip.tracking.options.TrackingOptions` (the engine and schedule as resolved) and the uses of
        every weight."""
        return {**self.options.compared(self.engine.name, self.schedule.describe()),
                "uses": {l.name: l.uses for l in self.layers}}

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """The checkpointed tracker state belongs to a run with this tracker's layers and options."""
        check_belongs("the checkpoint", state.get("record"), state.get("record_id"), self.record_path,
                      None if self.writer is None else self.writer.record_id)
        if list(state["layers"]) != [l.name for l in self.layers]:
            raise ValueError(f"checkpoint tracks layers {state['layers']}, this tracker {[l.name for l in self.layers]}")
        changed = here_and_there(option_changes(state.get("options", {}), self._options()), "checkpoint")
        if changed:
            raise ValueError(
                "the checkpoint was written by a tracker with other options: " + "; ".join(changed) + ". A resumed "
                "run continues the same configuration: create the tracker with the checkpoint's options"
            )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the record is truncated to the restored step.

        Raises:
            ValueError: the checkpoint tracks other layers, or was written by a tracker
                with other options (each named with both values).
        """
        self._check_state(state)
        self.step = int(state["step"])
        self.t = float(state["t"])
        self._t_anchor = tuple(state.get("t_anchor", (self.step, self.t, None)))
        self.extra_noise_var = float(state.get("extra_noise_var", 0.0))
        self._probe_vectors = {k: v.clone() for k, v in state.get("probe_vectors", {}).items()}
        if self.writer is not None:
            self.writer.truncate(self.step)
        hist = state.get("history")
        if hist is not None and self.record_path is None:
            hist = [StepRecord(**r) if isinstance(r, Mapping) else r for r in hist]
            self.history = [r for r in hist if r.step < self.step]
            self.last = self.history[-1] if self.history else None
        self.engine.arm(self.schedule(self.step))
        self.optim.backwards_since_step = 0

    def checkpoint(self, path: Union[str, os.PathLike], generators: Sequence[torch.Generator] = (),
                   extra: Any = None) -> None:
        """Save everything a run needs to continue exactly: model, optimizer, RNGs, record position.

        The file is written to a temporary name and renamed, so a crash while saving leaves
        the previous checkpoint intact.

        Args:
            path: checkpoint file.
            generators: torch.Generators the loop draws from (e.g. a DataLoader's or a
                sampler's generator); restored in the same order by :meth:`restore`.
            extra: data saved alongside (e.g. the epoch and batch index): tensors, dicts,
                lists, tuples, str, int, float, bool, None. Checkpoints hold data only, so
                that loading one never runs code (:mod:`sdelip.tracking.checkpoint`).

        Raises:
            TypeError: ``extra`` holds another kind of object.
            sdelip.tracking.checkpoint.CheckpointWriteError: the write failed (e.g. the disk is
                full); the previous checkpoint is intact and no ``.tmp`` file is left.
        """
        state = self.state_dict()
        options = state.pop("options")
        write_checkpoint(path, Checkpoint("tracker", self.step, self.model.state_dict(),
                                          None if self.optimizer is None else self.optimizer.state_dict(), options,
                                          state, rng_state(), [g.get_state() for g in generators],
                                          {"extra": extra}))

    def restore(self, path: Union[str, os.PathLike, Checkpoint, Mapping],
                generators: Sequence[torch.Generator] = ()) -> Any:
        """Load a :meth:`checkpoint` into this tracker, its model, optimizer and the RNGs.

        The record is truncated to the checkpoint's step, so steps written after the
        checkpoint by an interrupted run are replaced by the resumed run's.

        Args:
            path: the checkpoint file (also of the earlier format ``sdelip-checkpoint-2``),
                or its :class:`~sdelip.tracking.checkpoint.Checkpoint` or file contents.
            generators: the generators given to :meth:`checkpoint`, in the same order.

        Returns:
            The checkpoint's ``extra`` object.
        """
        return self._restore(_read(path), generators, _where(path))

    def _restore(self, ckpt: Checkpoint, generators: Sequence[torch.Generator], where: str) -> Any:
        state = {**ckpt.tracker, "options": ckpt.options}
        check_belongs(where, state.get("record"), state.get("record_id"), self.record_path,
                      None if self.writer is None else self.writer.record_id)
        self._check_state(state)
        check_optimizer(where, ckpt.optimizer, state.get("optimizer_class"), self.optimizer)
        self.model.load_state_dict(ckpt.model)
        if self.optimizer is not None and ckpt.optimizer is not None:
            self.optimizer.load_state_dict(ckpt.optimizer)
        set_rng_state(ckpt.rng)
        if len(ckpt.generators) != len(generators):
            raise ValueError(f"the checkpoint holds {len(ckpt.generators)} generator state(s), {len(generators)} "
                             "generator(s) given")
        for g, s in zip(generators, ckpt.generators):
            g.set_state(s)
        self.load_state_dict(state)
        self._note_resumed(self.step)
        return ckpt.run.get("extra")

    def _continue_record(self, start_step: int) -> None:
        """``Tracker(start_step=k)`` on a record: check it is this run's, drop its rows from k on, log the resume.

        Raises:
            ValueError: the record was written with other options or another η, or
                would be left with a gap (:func:`sdelip.tracking.safety.check_continuation`);
                the tracker is closed.
        """
        try:
            check_continuation(self, start_step)
        except BaseException:
            self.close()
            raise
        dropped = self.writer.truncate(start_step)
        if dropped:
            warnings.warn(f"the record {str(self.record_path)!r} held {dropped} row(s) from step {start_step} "
                          "on; they are replaced by the continued run", stacklevel=3)
        self._note_resumed(start_step)

    def _note_resumed(self, step: int) -> None:
        """Append ``step`` to the record's ``resumed_at`` metadata (the steps where the run was continued)."""
        if self.writer is None:
            return
        resumed = list(self.writer.metadata().get("resumed_at", []))
        resumed.append(int(step))
        self._metadata["resumed_at"] = resumed
        self.writer.update_metadata({"resumed_at": resumed})

    @classmethod
    def resume(cls, checkpoint: Union[str, os.PathLike], model: nn.Module,
               optimizer: Optional[torch.optim.Optimizer] = None, generators: Sequence[torch.Generator] = (),
               **kwargs) -> "TrackerCheckpointing":
        """Continue a run from a :meth:`checkpoint` in a new process.

        Builds the tracker with the same options (pass them again in ``kwargs``; the
        record defaults to the checkpoint's, and is opened with ``mode="append"``
        whether given as a path or a :class:`~sdelip.tracking.options.RecordOptions`),
        appends to the existing record after
        truncating it to the checkpoint's step, and restores model, optimizer, RNGs and
        ``generators``. The loop then continues at step ``tracker.step``, and the record
        is the one an uninterrupted run would have written; its ``resumed_at`` metadata
        lists the steps where the run was continued.

        Raises:
            ValueError: the options that shape the record (engine, schedule, split,
                decomposition, gap_tol, on_degenerate, probe_every, the uses of the
                weights) differ from the checkpoint's; each is named with both values.
                The optimizer's hyper-parameters are restored from the checkpoint, as
                ``optimizer.load_state_dict`` does.
        """
        state = _read(checkpoint)
        record = RecordOptions.of(kwargs.pop("record", state.tracker["record"]))
        kwargs.pop("overwrite", None)
        tracker = cls(model, optimizer, record=attrs.evolve(record, mode="append"), **kwargs)
        try:
            tracker._restore(state, generators, _where(checkpoint))
        except BaseException:
            tracker.close()
            raise
        return tracker


def _step_record_data(rec: StepRecord) -> dict:
    """A :class:`StepRecord` as plain containers (for a data-only checkpoint)."""
    def plain(v):
        return v.item() if isinstance(v, np.generic) else v

    return {"step": int(rec.step), "t": float(rec.t), "lr": float(rec.lr), "loss": plain(rec.loss),
            "batch_size": int(rec.batch_size),
            "layers": {k: {kk: plain(vv) for kk, vv in v.items()} for k, v in rec.layers.items()},
            "network": {k: plain(v) for k, v in rec.network.items()}, "degenerate": bool(rec.degenerate),
            "probes": None if rec.probes is None else {k: plain(v) for k, v in rec.probes.items()}}


def _where(path) -> str:
    """How messages name a checkpoint: by its path when it is one."""
    return "the checkpoint" if isinstance(path, (Checkpoint, Mapping)) else f"the checkpoint {str(path)!r}"


def _read(path) -> Checkpoint:
    """The tracker's :class:`~sdelip.tracking.checkpoint.Checkpoint` from a file, a record, or a file's contents."""
    if isinstance(path, Checkpoint):
        return path
    if isinstance(path, Mapping):
        return Checkpoint.from_data(path)
    return read_checkpoint(path, "tracker", what="an sdelip tracker checkpoint")
