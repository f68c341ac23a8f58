"""Checkpoint files that hold data only: written atomically, loaded without running code.

A checkpoint (of :meth:`sdelip.tracking.tracker.Tracker.checkpoint` and of :func:`sdelip.workbench.train.train`)
is a ``torch.save`` file of a dict of tensors and plain containers (dict, list, tuple,
str, int, float, bool, None); options and other metadata are stored as JSON text.
:func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``, which rebuilds
tensors and plain containers only: a file that names any other Python object — a
crafted pickle whose loading would call ``os.system``, or an old checkpoint holding
library objects — is refused by name before anything in it is executed
(:class:`UnsafeCheckpointError`).

:func:`save_checkpoint` writes to ``<path>.tmp``, flushes it to disk (fsync) and renames
it over ``path``, so a crash or a full disk during the write leaves the previous
checkpoint intact; a failed write removes the temporary file and raises
:class:`CheckpointWriteError` saying what went wrong (e.g. the disk is full).

Both writers store one record, :class:`Checkpoint` (format :data:`CHECKPOINT_FORMAT`),
by one pair of functions, :func:`write_checkpoint` and :func:`read_checkpoint`: the model
and optimizer states, the step, the options that shape the run's numbers (compared on
resume by :func:`sdelip.tracking.resume.option_changes`), the tracker's own state, the RNG and
generator states when the tracker wrote it, and the writer's own entries (the caller's
``extra`` for :meth:`Tracker.checkpoint <sdelip.tracking.tracker.Tracker.checkpoint>`, the initial
K and the running loss and accuracy for :func:`sdelip.workbench.train.train`). Files of the
earlier formats (:data:`LEGACY_FORMATS`: ``sdelip-checkpoint-2`` of the tracker,
``sdelip-train-checkpoint-3`` of ``train``) are read into the same record.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import attrs
import numpy as np
import torch

from ..errors import CheckpointError, CheckpointWriteError, UnsafeCheckpointError  # noqa: F401  (defined there, re-exported)

__all__ = [
    "CHECKPOINT_FORMAT",
    "LEGACY_FORMATS",
    "Checkpoint",
    "write_checkpoint",
    "read_checkpoint",
    "rng_state",
    "set_rng_state",
    "CheckpointError",
    "UnsafeCheckpointError",
    "CheckpointWriteError",
    "save_checkpoint",
    "load_checkpoint",
    "check_plain",
    "tmp_path",
    "optimizer_class",
    "check_optimizer",
    "check_belongs",
]

_PLAIN_SCALARS = (str, int, float, bool, type(None))

#: The format of :class:`Checkpoint` files (-3: one record for the tracker and ``train``).
CHECKPOINT_FORMAT = "sdelip-checkpoint-3"
#: Earlier formats that :func:`read_checkpoint` still reads, by the writer that wrote them.
LEGACY_FORMATS = {"tracker": "sdelip-checkpoint-2", "train": "sdelip-train-checkpoint-3"}


def tmp_path(path: Union[str, os.PathLike]) -> Path:
    """The temporary file a checkpoint is written to before the rename: ``<path>.tmp``."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError when ``obj`` holds anything but tensors and plain containers.

    Args:
        obj: the object to be saved.
        where: its position, used in the message (``checkpoint['extra'][2]``).
    """
    if isinstance(obj, (torch.Tensor, *_PLAIN_SCALARS)) and type(obj).__module__ != "numpy":
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; checkpoints hold only data: "
                                "dicts with str or int keys, lists, tuples, tensors, str, int, float, bool, None")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold only data (tensors, "
        "dicts, lists, tuples, str, int, float, bool, None) so that loading one never runs code: convert it "
        "to such values (e.g. a dict) first"
    )


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Union[str, os.PathLike], state: Mapping[str, Any]) -> None:
    """Write ``state`` (tensors and plain containers) to ``path`` atomically.

    Raises:
        TypeError: ``state`` holds another kind of object (named by its position).
        CheckpointWriteError: the write failed; the message says why (a full disk is
            named with the free space left), the previous checkpoint at ``path`` is
            unchanged and no ``.tmp`` file is left behind.
    """
    check_plain(state)
    path = Path(path)
    tmp = tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if not isinstance(exc, (OSError, RuntimeError)):
            raise
        why = _why(exc, path)
        code = errno.ENOSPC if "is full" in why else (getattr(exc, "errno", None) or errno.EIO)
        raise CheckpointWriteError(
            code,
            f"writing the checkpoint {str(path)!r} failed: {why}; the previous checkpoint there (if "
            f"any) is unchanged and the temporary file {str(tmp)!r} was removed",
        ) from exc


def _why(exc: BaseException, path: Path) -> str:
    """A one-line reason for a failed write; a full disk is said as such."""
    code = getattr(exc, "errno", None)
    free = None
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        pass
    if code == errno.ENOSPC or (free is not None and free < 1 << 20):
        return f"the disk holding {str(path.parent)!r} is full ({free if free is not None else '?'} bytes free)"
    if code == errno.EFBIG:
        return "the file size limit was reached (File too large)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def load_checkpoint(path: Union[str, os.PathLike], formats: Iterable[str], what: str = "an sdelip checkpoint",
                    map_location: Any = "cpu") -> dict:
    """Read a checkpoint as data (``torch.load(weights_only=True)``) and check its format.

    Args:
        path: the file.
        formats: the accepted values of its ``"format"`` entry.
        what: how the message calls the expected file, with its article.
        map_location: as for ``torch.load``.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file holds Python objects other than tensors and plain
            containers; nothing in it was run.
        CheckpointError: a directory, a truncated or non-torch file, or another format.
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{str(p)!r} is a directory, not {what}")
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {str(p)!r}")
    _check_crc(p, what)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "global" in ln.lower()), "")
        if not detail:  # not a pickle of objects: random bytes, a damaged file
            first = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln), str(exc)[:200])
            raise CheckpointError(f"{str(p)!r} is not readable as {what} (damaged or not a torch file: {first})") \
                from None
        raise UnsafeCheckpointError(
            f"refusing to load {str(p)!r}: it is not {what}: it holds Python objects other than tensors and "
            f"plain containers{f' ({detail})' if detail else ''}, and loading those could run code. sdelip "
            "checkpoints hold data only (a checkpoint of an older sdelip with pickled objects cannot be loaded "
            "safely: start that run again)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - random bytes fail in many ways (IndexError, KeyError, …)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{str(p)!r} is not readable as {what} (truncated, damaged or not a torch file: "
                              f"{first})") from None
    formats = tuple(formats)
    if not isinstance(state, dict) or state.get("format") not in formats:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{str(p)!r} is not {what} (format {found!r}, expected {' or '.join(formats)})")
    return state


def _check_crc(p: Path, what: str) -> None:
    """Refuse a checkpoint whose bytes changed since it was written: every entry of ``torch.save``'s zip has a CRC.

    ``torch.load`` does not check them, so a flipped byte in a tensor would load as a
    changed weight. (Files of the legacy non-zip format carry no checksum and are read as before.)
    """
    import zipfile

    if not zipfile.is_zipfile(p):
        return
    try:
        with zipfile.ZipFile(p) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        bad, why = None, f"its container is unreadable ({exc})"
    else:
        why = None if bad is None else f"its entry {bad!r} fails its CRC check"
    if why:
        raise CheckpointError(f"{str(p)!r} is damaged and is not used as {what}: {why} (bytes changed on disk or in a "
                              "copy); resume from an intact copy, or start the run again")


def optimizer_class(optimizer) -> Optional[str]:
    """``module.QualName`` of an optimizer's class (None for None): stored in checkpoints."""
    return None if optimizer is None else f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def check_optimizer(where: str, saved_state: Optional[Mapping], saved_class: Optional[str], optimizer) -> None:
    """Refuse to load the optimizer state of a checkpoint into an optimizer of another class.

    ``optimizer.load_state_dict`` accepts any state and the first step then fails (an SGD
    state in Adam: ``KeyError: 'betas'``) or, worse, runs with mixed hyper-parameters.
    Checkpoints name the class (:func:`optimizer_class`); for older ones the
    hyper-parameters of the saved param groups must all exist in the optimizer's.

    Raises:
        CheckpointError: the classes differ (both named, with the checkpoint ``where``).
    """
    if optimizer is None or saved_state is None:
        return
    now = optimizer_class(optimizer)
    if saved_class is None:
        groups = saved_state.get("param_groups") or [{}]
        extra = sorted(set(groups[0]) - set(optimizer.param_groups[0]) - {"params"})
        if not extra:
            return
        saved_class = f"another optimizer class (its hyper-parameters {extra} are not {now}'s)"
    elif saved_class == now:
        return
    raise CheckpointError(
        f"{where} holds the state of a {saved_class} optimizer, and this run's optimizer is a {now}: a checkpoint "
        "resumes into the optimizer class that wrote it (their states and hyper-parameters differ); resume with "
        "that optimizer, or start a new run"
    )


def check_belongs(where: str, saved_record: Optional[str], saved_id: Optional[str], record, record_id) -> None:
    """Refuse a checkpoint written for another record (the record ids differ, when both are known).

    Raises:
        CheckpointError: naming the checkpoint, the record it belongs to, and this one.
    """
    if saved_id is None or record_id is None or saved_id == record_id:
        return
    raise CheckpointError(
        f"{where} belongs to the record {saved_record!r} (record id {saved_id}), not to {str(record)!r} (record id "
        f"{record_id}): a checkpoint continues the run of its own record, and two runs cannot share one checkpoint "
        "file; give this run its own checkpoint file"
    )


def dumps(obj: Any) -> str:
    """JSON text of checkpoint metadata (non-finite floats allowed)."""
    return json.dumps(obj, allow_nan=True, sort_keys=True)


def loads(text: str) -> Any:
    """The metadata stored by :func:`dumps`."""
    return json.loads(text)


def rng_state() -> dict:
    """The global RNG states as tensors and plain containers (no pickled objects)."""
    key, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"key": str(key), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": list(mt), "gauss": gauss},
    }


def set_rng_state(rng: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = rng["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


_WRITERS = {"tracker": "Tracker.checkpoint", "train": "sdelip.workbench.train.train (sdelip track)"}
_FIELDS = ("format", "writer", "step", "model", "optimizer", "options", "tracker", "rng", "generators")


@attrs.define
class Checkpoint:
    """Everything a run needs to continue: the one checkpoint record of the tracker and of ``train``.

    Attributes:
        writer: who wrote it, ``"tracker"`` (:meth:`Tracker.checkpoint
            <sdelip.tracking.tracker.Tracker.checkpoint>`) or ``"train"`` (:func:`sdelip.workbench.train.train`).
        step: the index of the next step; the run continues there.
        model: the model's ``state_dict()``.
        optimizer: the optimizer's ``state_dict()``, or None (a tracker without one).
        options: the options that shape the run's numbers (the tracker's, or the
            :class:`~sdelip.workbench.train.TrainConfig` fields but :data:`~sdelip.workbench.train.RESUME_FREE_OPTIONS`),
            stored as JSON text; a resumed run is compared with them
            (:func:`sdelip.tracking.resume.option_changes`).
        tracker: the tracker's own state (:meth:`Tracker.state_dict
            <sdelip.tracking.tracker.Tracker.state_dict>` without its options), or None.
        rng: the global RNG states (:func:`rng_state`), or None.
        generators: the states of the caller's ``torch.Generator`` objects.
        run: the writer's own entries, stored beside the fields above in the file:
            ``{"extra": …}`` (the caller's ``extra=``) for the tracker; the initial K and the
            running loss and accuracy (``{"K_initial": …, "summary": …}``) for ``train``.
    """

    writer: str
    step: int
    model: dict
    optimizer: Optional[dict]
    options: dict = attrs.field(factory=dict)
    tracker: Optional[dict] = None
    rng: Optional[dict] = None
    generators: list = attrs.field(factory=list)
    run: dict = attrs.field(factory=dict)

    def to_data(self) -> dict:
        """The file's contents: tensors and plain containers, the options as JSON text."""
        clash = sorted(set(self.run) & set(_FIELDS))
        if clash:
            raise ValueError(f"the checkpoint's run entries {clash} would replace fields of the record")
        return {"format": CHECKPOINT_FORMAT, "writer": self.writer, "step": int(self.step), "model": self.model,
                "optimizer": self.optimizer, "options": dumps(self.options), "tracker": self.tracker,
                "rng": self.rng, "generators": list(self.generators), **self.run}

    @classmethod
    def from_data(cls, state: Mapping[str, Any]) -> "Checkpoint":
        """The record of a file's contents, of this format or of one of :data:`LEGACY_FORMATS`."""
        run = {k: v for k, v in state.items() if k not in _FIELDS}
        fmt = state.get("format")
        if fmt == LEGACY_FORMATS["tracker"]:  # the step and the options were part of the tracker's state
            tracker = {k: v for k, v in state["tracker"].items() if k != "options"}
            return cls("tracker", int(tracker["step"]), state["model"], state["optimizer"],
                       dict(state["tracker"].get("options", {})), tracker, state["rng"], list(state["generators"]),
                       run)
        writer = "train" if fmt == LEGACY_FORMATS["train"] else state["writer"]
        return cls(writer, int(state["step"]), state["model"], state["optimizer"], loads(state["options"]),
                   state.get("tracker"), state.get("rng"), list(state.get("generators", [])), run)


def write_checkpoint(path: Union[str, os.PathLike], checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically, as data only (:func:`save_checkpoint`).

    Raises:
        TypeError: it holds another kind of object than tensors and plain containers
            (named by its position, e.g. ``checkpoint['extra']``).
        CheckpointWriteError: the write failed; the previous checkpoint is intact.
    """
    save_checkpoint(path, checkpoint.to_data())


def read_checkpoint(path: Union[str, os.PathLike], writer: str, what: str,
                    map_location: Any = "cpu") -> Checkpoint:
    """Read the :class:`Checkpoint` that ``writer`` wrote to ``path`` (also one of its :data:`LEGACY_FORMATS`).

    Args:
        path: the file.
        writer: ``"tracker"`` or ``"train"``: whose checkpoint is expected.
        what: how messages call the expected file, with its article.
        map_location: as for ``torch.load``.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file holds Python objects; nothing in it was run.
        CheckpointError: a directory, a damaged file, another format, or the other
            writer's checkpoint.
    """
    ckpt = Checkpoint.from_data(load_checkpoint(path, (CHECKPOINT_FORMAT, LEGACY_FORMATS[writer]), what,
                                                map_location))
    if ckpt.writer != writer:
        raise CheckpointError(f"{str(Path(path))!r} is not {what}: it was written by "
                              f"{_WRITERS.get(ckpt.writer, repr(ckpt.writer))}")
    return ckpt
