"""Checkpoint and resume of a :class:`~sdelip.tracker.Tracker`: everything a run needs to continue exactly.

A checkpoint holds the model, the optimizer, the tracker's own state (step, SDE time,
the options that shape the record, probe warm starts), the RNG states and the caller's
generators, as data only (:mod:`sdelip.checkpoint`: loading one never runs code). A
resumed run checks its options against the checkpoint's (:mod:`sdelip.resume`), truncates
the record to the checkpoint's step and continues it; the record is then the one an
uninterrupted run would have written.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .record import StepRecord
from .resume import option_changes

__all__ = ["TrackerCheckpointing", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "sdelip-checkpoint-2"  # -2: data only (weights_only loading)


class TrackerCheckpointing:
    """The checkpoint and resume methods of :class:`~sdelip.tracker.Tracker` (a mixin)."""

    def state_dict(self) -> dict:
        """The tracker's own state: step, SDE time, record path and position, probe warm starts."""
        return {
            "step": self.step,
            "t": self.t,
            "t_anchor": self._t_anchor,
            "extra_noise_var": self.extra_noise_var,
            "record": None if self.record_path is None else str(self.record_path),
            "engine": self.engine.name,
            "layers": [l.name for l in self.layers],
            "options": self._options(),
            "probe_vectors": {k: v.clone() for k, v in self._probe_vectors.items()},
            "history": [_step_record_data(r) for r in self.history] if self.record_path is None else None,
        }

    def _options(self) -> dict:
        """The tracker options that shape a record; a resumed run must keep them."""
        return {"engine": self.engine.name, "schedule": self.schedule.describe(), "split": self.split,
                "decomposition": self.decomposition, "gap_tol": self.gap_tol, "on_degenerate": self.on_degenerate,
                "probe_every": self.probe_every, "uses": {l.name: l.uses for l in self.layers}}

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """The checkpointed tracker state belongs to a run with this tracker's layers and options."""
        if list(state["layers"]) != [l.name for l in self.layers]:
            raise ValueError(f"checkpoint tracks layers {state['layers']}, this tracker {[l.name for l in self.layers]}")
        changed = [f"{c.option}={c.requested!r} here, {c.option}={c.checkpoint!r} in the checkpoint"
                   for c in option_changes(state.get("options", {}), self._options())]
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
                that loading one never runs code (:mod:`sdelip.checkpoint`).

        Raises:
            TypeError: ``extra`` holds another kind of object.
            sdelip.checkpoint.CheckpointWriteError: the write failed (e.g. the disk is
                full); the previous checkpoint is intact and no ``.tmp`` file is left.
        """
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "tracker": self.state_dict(),
            "rng": rng_state(),
            "generators": [g.get_state() for g in generators],
            "extra": extra,
        }
        save_checkpoint(path, state)

    def restore(self, path: Union[str, os.PathLike, Mapping], generators: Sequence[torch.Generator] = ()) -> Any:
        """Load a :meth:`checkpoint` into this tracker, its model, optimizer and the RNGs.

        The record is truncated to the checkpoint's step, so steps written after the
        checkpoint by an interrupted run are replaced by the resumed run's.

        Returns:
            The checkpoint's ``extra`` object.
        """
        state = _load_checkpoint(path)
        self._check_state(state["tracker"])
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        saved = state["generators"]
        if len(saved) != len(generators):
            raise ValueError(f"the checkpoint holds {len(saved)} generator state(s), {len(generators)} generator(s) given")
        for g, s in zip(generators, saved):
            g.set_state(s)
        self.load_state_dict(state["tracker"])
        self._note_resumed(self.step)
        return state.get("extra")

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
        record defaults to the checkpoint's), appends to the existing record after
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
        state = _load_checkpoint(checkpoint)
        kwargs.setdefault("record", state["tracker"]["record"])
        kwargs.pop("overwrite", None)
        tracker = cls(model, optimizer, _record_mode="append", **kwargs)
        try:
            tracker.restore(state, generators)
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


def _load_checkpoint(path) -> dict:
    if isinstance(path, Mapping):
        return dict(path)
    return load_checkpoint(path, (CHECKPOINT_FORMAT,), what="an sdelip tracker checkpoint")
