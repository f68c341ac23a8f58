"""The paper's training loop: plain SGD with live tracking of the Lipschitz dynamics.

:func:`train` builds a model and data from a :class:`TrainConfig`, runs plain SGD
without momentum (the theory of Def 4), and drives a :class:`sdelip.tracking.tracker.Tracker`
that records every term of Thm 14–15 per step. Randomness is split as in Sec 8.7:

- ``init_seed`` fixes the parameter initialisation;
- ``sampling_seed`` fixes the mini-batch sequence and every per-step draw (dropout
  masks, mixup, FGSM, noisy gradients, AutoAugment).

Every per-step draw is derived from (``sampling_seed``, step) alone: the mini-batch of
step k is slice k of the epoch's seeded permutation, and the global torch RNG is
reseeded from (``sampling_seed``, k) before the step. A run resumed from a checkpoint
at step k is therefore bitwise identical to the uninterrupted run, on CPU.

A resumed run continues the same configuration: the checkpoint (the one record of
:mod:`sdelip.tracking.checkpoint`, shared with the tracker) stores the options that determine
the run's numbers (:data:`RESUME_FREE_OPTIONS` lists the others), and a rerun
that asks for different ones is refused with a :class:`ResumeError` naming each option
and its two values; ``overwrite=True`` starts a new run instead. The checkpoint also
carries the running loss and accuracy, so the result describes the whole run.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

import attrs
import torch

from ..tracking.checkpoint import (Checkpoint, CheckpointError, check_belongs, check_optimizer, optimizer_class,
                                   read_checkpoint, tmp_path, write_checkpoint)
from ..tracking.signals import sigterm_as_interrupt
from .data import DatasetInfo, load_dataset
from .models import build_model
from ..tracking.resume import OptionChange, ResumeError, option_changes, python_option  # noqa: F401  (re-exported)
from ..tracking.threads import use_threads
from .config import _DTYPES, TrainConfig, TrainResult
from .regularizers import (
    NoisyGradient,
    autoaugment_transform,
    make_optimizer,
    per_sample_loss,
    with_label_corruption,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "ResumeError",
    "OptionChange",
    "RESUME_FREE_OPTIONS",
    "train",
    "batch_indices",
    "prepare_data",
]

#: TrainConfig fields that may change when a run is resumed: they do not change its numbers.
RESUME_FREE_OPTIONS = ("data_root", "download", "steps", "record", "checkpoint", "checkpoint_every", "eval_test",
                       "overwrite", "threads")
#: With ``checkpoint_every=None`` checkpoints are written as often as keeps their measured
#: cost under this share of the run's time (and at most every CHECKPOINT_MIN_INTERVAL_S).
CHECKPOINT_BUDGET = 0.025
CHECKPOINT_MIN_INTERVAL_S = 2.0

def prepare_data(config: TrainConfig, train: bool = True) -> DatasetInfo:
    """Load the configured dataset with its transform, label corruption and size limit."""
    reg = config.regularizer
    transform = autoaugment_transform(config.dataset) if (reg.autoaugment and train) else None
    info = load_dataset(config.dataset, root=config.data_root, train=train, download=config.download,
                        transform=transform)
    if train and reg.label_corruption > 0:
        info = with_label_corruption(info, reg.label_corruption, seed=config.sampling_seed)
    if train and config.max_train_samples is not None and config.max_train_samples < len(info):
        keep = torch.randperm(len(info), generator=torch.Generator().manual_seed(0))[: int(config.max_train_samples)]
        subset = torch.utils.data.Subset(info.dataset, keep.sort().values.tolist())
        info = attrs.evolve(info, dataset=subset,
                            source=f"{info.source}; a fixed random subset of {config.max_train_samples} samples")
    return info


def batch_indices(step: int, n: int, batch_size: int, seed: int, sampling: str = "reshuffle") -> torch.Tensor:
    """Indices of the mini-batch of ``step`` among ``n`` samples (see :attr:`TrainConfig.sampling`).

    ``"reshuffle"``: slice of a per-epoch permutation seeded by (seed, epoch); epochs have
    ⌊n / M⌋ full batches (the remainder is dropped). ``"iid"``: the first M entries of the
    step-th random permutation drawn from one generator seeded by :func:`iid_stream_seed`
    (so M distinct samples per step, independent across steps; a resumed run or a call
    for a late step replays the stream's earlier draws, one ``randperm(n)`` each).
    """
    return torch.tensor(_Batches(range(n), batch_size, seed, sampling).indices(step))


def _mix(*values: int) -> int:
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def iid_stream_seed(seed: int) -> int:
    """The seed of the one generator behind ``sampling="iid"``'s mini-batches.

    Step k's batch is the first M entries of the k-th ``randperm(n)`` drawn from it; the
    ensemble experiment's committed iid runs used this stream before it moved here.
    """
    return 1_000_003 * int(seed) + 7


class _Batches:
    """Mini-batches by step index, with the epoch permutation (reshuffle) or the generator (iid) cached."""

    def __init__(self, dataset, batch_size: int, seed: int, sampling: str = "reshuffle"):
        self.dataset, self.batch_size, self.seed, self.sampling = dataset, batch_size, seed, sampling
        self.n = len(dataset)
        if self.n < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the number of training samples {self.n}")
        self._epoch, self._perm = None, None
        self._gen, self._next, self._last = None, 0, (None, None)

    def _iid(self, step: int) -> list:
        """The iid stream: one generator, one permutation per step, replayed from 0 to reach an earlier step."""
        if self._last[0] == step:  # the example batch of step 0, then step 0 itself
            return self._last[1]
        if self._gen is None or step < self._next:
            self._gen, self._next = torch.Generator().manual_seed(iid_stream_seed(self.seed)), 0
        while self._next < step:  # a resumed run: skip the draws of the steps already taken
            torch.randperm(self.n, generator=self._gen)
            self._next += 1
        idx = torch.randperm(self.n, generator=self._gen)[: self.batch_size].tolist()
        self._next, self._last = step + 1, (step, idx)
        return idx

    def indices(self, step: int) -> list:
        if self.sampling == "iid":
            return self._iid(step)
        per_epoch = self.n // self.batch_size
        epoch, k = divmod(step, per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, epoch, 0x5EED)))
        return self._perm[k * self.batch_size:(k + 1) * self.batch_size].tolist()

    def __call__(self, step: int):
        idx = self.indices(step)
        items = self.dataset.__getitems__(idx) if hasattr(self.dataset, "__getitems__") else [self.dataset[i] for i in idx]
        if isinstance(items, (tuple, list)) and len(items) == 2 and isinstance(items[0], torch.Tensor) and items[0].ndim > 1 \
                and items[0].shape[0] == len(idx):
            x, y = items
        else:
            x = torch.stack([it[0] for it in items])
            y = torch.as_tensor([int(it[1]) for it in items])
        return x, torch.as_tensor(y, dtype=torch.long)


def _evaluate(model, info: DatasetInfo, device, dtype, batch_size: int = 1000) -> float:
    loader = torch.utils.data.DataLoader(info.dataset, batch_size=batch_size, shuffle=False)
    correct = total = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            out = model(x.to(device=device, dtype=dtype))
            correct += int((out.argmax(1).cpu() == y).sum())
            total += int(y.shape[0])
    model.train(was_training)
    return correct / max(total, 1)


def _product_norm(model) -> float:
    """K = Π σ1^c over the tracked layers, c the uses of each weight (Prop 8–9), in the weights' dtype."""
    from ..rules.inventory import product_norm

    return product_norm(model)


def _run_options(config: TrainConfig) -> dict:
    """The options that determine a run's numbers (all but :data:`RESUME_FREE_OPTIONS`), in the flat spelling
    (:meth:`TrainConfig.to_flat`: the tracker's options under their flat names, as the checkpoints store them)."""
    return {k: v for k, v in config.to_flat().items() if k not in RESUME_FREE_OPTIONS}


def _as_metadata(value):
    """A config value as the record metadata stores it (JSON scalars, else ``str``)."""
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _changes(saved: dict, config: TrainConfig, convert=lambda v: v) -> list[OptionChange]:
    """The run options of ``config`` that differ from ``saved`` (:func:`sdelip.tracking.resume.option_changes`)."""
    return option_changes(saved, _run_options(config), convert)


def _remove_run(config: TrainConfig) -> None:
    """Delete the record and the checkpoint of ``config`` (``overwrite=True``)."""
    from ..record import check_record_file, remove_record

    if config.record:
        check_record_file(config.record, for_writing=True)  # only records are replaced
        remove_record(config.record)
    if config.checkpoint:
        _check_own_checkpoint(config)
        for p in (Path(config.checkpoint), tmp_path(config.checkpoint)):
            if p.exists():
                p.unlink()


def _check_own_checkpoint(config: TrainConfig) -> None:
    """Refuse to replace a checkpoint that belongs to another run's existing record (``overwrite=True``)."""
    ckpt = Path(config.checkpoint)
    if not ckpt.exists() or not config.record:
        return
    try:
        other = read_checkpoint(ckpt, "train", what="an sdelip training checkpoint").run.get("record")
    except (CheckpointError, OSError):
        return  # damaged or foreign: replaced as before
    if other and Path(other).resolve() != Path(config.record).resolve() and Path(other).exists():
        raise ResumeError(f"the checkpoint {str(ckpt)!r} belongs to another run, whose record is {other!r}; "
                          f"{{overwrite}} replaces this run's record and checkpoint only: give this run its own "
                          "{checkpoint}")


def _rows(record: Path) -> int:
    from ..record import record_steps

    return record_steps(record)["rows"]


def _resume_state(config: TrainConfig, device) -> Optional[Checkpoint]:
    """The checkpoint to continue from, after checking that it and the record belong to this run.

    Raises:
        ResumeError: changed options, a record without a checkpoint (or the reverse), an
            old checkpoint without options, or fewer steps than the checkpoint has done.
    """
    from ..record import load_metadata

    ckpt = Path(config.checkpoint) if config.checkpoint else None
    record = Path(config.record) if config.record and config.track else None
    if ckpt is None or not ckpt.exists():
        if record is not None and record.exists() and _rows(record) == 0:
            return None  # killed before its first step: nothing to continue, the run starts over
        if record is not None and record.exists():
            problem = f"the record {str(record)!r} already exists"
            problem += (f" and there is no checkpoint {str(ckpt)!r} to resume it from (if the run that wrote it kept "
                        "its checkpoint elsewhere, give that with {checkpoint})" if ckpt is not None else
                        " (to resume the run that wrote it, give that run's checkpoint with {checkpoint})")
            raise ResumeError(problem + ": pass {overwrite} to replace it with a new run")
        return None
    try:
        state = read_checkpoint(ckpt, "train", what="an sdelip training checkpoint", map_location=device)
    except CheckpointError as exc:
        raise ResumeError(f"cannot resume from the checkpoint: {exc}. Pass {{overwrite}} to start a new run, which "
                          "replaces the record and the checkpoint") from None
    where = f"the checkpoint {str(ckpt)!r} (step {state.step})"
    if state.step == 0 and record is not None and not record.exists():
        return None  # killed between the first checkpoint and the record's creation: nothing was done yet
    changes = _changes(state.options, config, convert=_as_metadata)
    if changes:
        raise ResumeError(f"cannot resume from {where}: this run's options differ from those of the run that wrote it:",
                          changes)
    if state.step > config.steps:
        raise ResumeError(f"cannot resume from {where}: the run asks for {config.steps} steps, fewer than the "
                          "checkpoint has done; ask for at least as many, or pass {overwrite} to start a new run")
    saved_record = state.run.get("record")
    if record is not None:
        saved = load_metadata(record).get("config") if record.exists() else None
        if isinstance(saved, dict):
            changes = _changes(saved, config, convert=_as_metadata)
            if changes:
                raise ResumeError(f"cannot resume into the record {str(record)!r}: it was written by a run with "
                                  "other options (it does not belong to the checkpoint's run):", changes, "record")
        if saved_record and Path(saved_record).resolve() != record.resolve():
            this = f"this run's record {str(record)!r}" + ("" if record.exists() else " does not exist")
            raise ResumeError(f"{where} belongs to another run, whose record is {saved_record!r}, not {this}: two "
                              "runs cannot share one checkpoint file; give this run its own {checkpoint} (by default "
                              "RECORD.ckpt beside its record)")
        if not record.exists():
            raise ResumeError(f"{where} continues a run whose record {str(record)!r} does not exist: give the record "
                              "that run wrote, or pass {overwrite} to start a new run")
    if record is not None and record.exists() and state.run.get("record_id"):
        from ..record import load_record_id

        try:
            check_belongs(where, saved_record, state.run.get("record_id"), record, load_record_id(record))
        except CheckpointError as exc:
            raise ResumeError(f"{exc} (give this run its own {{checkpoint}})") from None
    return state


def train(config: TrainConfig, progress: bool = True, callback=None) -> TrainResult:
    """Train with plain SGD and (optionally) live tracking; see the module docstring.

    Args:
        config: the run.
        progress: show a progress bar with loss, accuracy and current K.
        callback: optional ``callback(step, loss, tracker)`` after every step.

    Returns:
        :class:`TrainResult`; the record (if any) is at ``result.record``.

    Raises:
        sdelip.record.RecordLockedError: another run is writing the record.
        ResumeError: the checkpoint or the record cannot be continued as asked.
        sdelip.tracking.checkpoint.CheckpointWriteError: a checkpoint could not be written (e.g. a
            full disk); the previous one is intact.
    """
    t_start = time.perf_counter()
    dtype = _DTYPES[config.dtype]
    device = torch.device(config.device)
    from ..record.lock import RecordLock

    locks = []
    try:
        if config.record and config.track:
            locks.append(RecordLock(config.record))  # one writer per record, held until the tracker closes it
        if config.checkpoint:  # and one run per checkpoint file
            locks.append(RecordLock(config.checkpoint, what="checkpoint"))
        with use_threads(config.threads), sigterm_as_interrupt(_terminated_message(config)):
            return _train(config, progress, callback, locks[0] if config.record and config.track else None, t_start,
                          dtype, device)
    finally:
        for lock in locks:
            lock.release()


def _terminated_message(config: TrainConfig) -> str:
    """What a run stopped by SIGTERM says: what is kept and how to continue."""
    kept = f"the record {config.record!r} is closed with every step committed so far" if config.record and \
        config.track else "the run stopped"
    how = (f"; rerun the same command to continue from the checkpoint {config.checkpoint!r}" if config.checkpoint
           else "; no checkpoint was kept, so the run cannot be continued")
    return f"terminated by SIGTERM: {kept}{how}"


def _train(config: TrainConfig, progress, callback, lock, t_start, dtype, device) -> TrainResult:
    from ..tracking.options import RecordOptions
    from ..tracking.tracker import Tracker

    if config.overwrite:
        _remove_run(config)
    resume_state = _resume_state(config, device)
    reg = config.regularizer
    info = prepare_data(config, train=True)
    model = build_model(config.model, num_classes=info.num_classes, input_shape=info.input_shape,
                        dropout=reg.dropout, batchnorm=reg.batchnorm, init=config.init,
                        init_std=config.init_std, seed=config.init_seed).to(device=device, dtype=dtype)
    optimizer = make_optimizer(model.parameters(), config.lr, reg)
    reg_gen = torch.Generator()
    noisy = NoisyGradient.from_config(reg, generator=reg_gen)
    batches = _Batches(info.dataset, config.batch_size, config.sampling_seed, config.sampling)

    start_step = 0
    ckpt = Path(config.checkpoint) if config.checkpoint else None
    summary = {"loss": float("nan"), "correct": 0, "seen": 0}  # running over the whole run
    if resume_state is not None:
        check_optimizer(f"the checkpoint {str(config.checkpoint)!r}", resume_state.optimizer,
                        resume_state.run.get("optimizer_class"), optimizer)
        model.load_state_dict(resume_state.model)
        optimizer.load_state_dict(resume_state.optimizer)
        start_step = resume_state.step
        summary.update(resume_state.run["summary"])
    K_initial = resume_state.run["K_initial"] if resume_state is not None else _product_norm(model)

    tracker = None
    if config.track:
        example, _ = batches(0)
        metadata = {
            "config": {k: _as_metadata(v) for k, v in config.to_flat().items()},
            "regularizers": reg.active(),
            "data": info.name,
            "data_source": info.source,
            "is_standin": info.is_standin,
            "init_seed": config.init_seed,
            "sampling_seed": config.sampling_seed,
        }
        mode = "overwrite" if resume_state is not None and start_step == 0 else "new"  # resumed at 0: start over
        tracker = Tracker(model, optimizer, record=RecordOptions(config.record, mode=mode, metadata=metadata, lock=lock),
                          options=config.tracking, example_input=example[:2].to(device=device, dtype=dtype),
                          start_step=start_step)
        if noisy is not None:
            tracker.extra_noise_var = noisy.noise_variance
    owner = {"record": config.record if tracker is not None else None,
             "record_id": tracker.writer.record_id if tracker is not None and tracker.writer is not None else None,
             "optimizer_class": optimizer_class(optimizer)}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start_step, desc=f"{config.model} on {info.name}", unit="step",
                   dynamic_ncols=True)
    loss_value, correct, seen = summary["loss"], summary["correct"], summary["seen"]
    n_ckpt, ckpt_seconds, last_cost = 0, 0.0, 0.0
    min_interval = float(os.environ.get("SDELIP_CHECKPOINT_MIN_INTERVAL_S", CHECKPOINT_MIN_INTERVAL_S))
    if ckpt is not None and resume_state is None:  # a killed run can always be continued from here
        last_cost = _save_checkpoint(ckpt, config, model, optimizer, start_step, K_initial, loss_value, correct, seen,
                                     owner)
        n_ckpt, ckpt_seconds = 1, last_cost
    last_saved = time.perf_counter()
    try:
        for step in range(start_step, config.steps):
            torch.manual_seed(_mix(config.sampling_seed, step, 0xD409))
            reg_gen.manual_seed(_mix(config.sampling_seed, step, 0x4E6))
            x, y = batches(step)
            x, y = x.to(device=device, dtype=dtype), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            losses, logits = per_sample_loss(model, x, y, reg, generator=reg_gen, normalization=info.normalization)
            if noisy is not None:
                losses = noisy.scale_losses(losses)
            if tracker is not None:
                tracker.backward(losses)
            else:
                losses.mean().backward()
            if noisy is not None:
                noisy.inject(model.parameters())
            optimizer.step()
            loss_value = float(losses.detach().mean())
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += int(y.shape[0])
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss is {loss_value} at step {step}")
            if ckpt is not None and step + 1 < config.steps:
                if config.checkpoint_every:
                    due = (step + 1) % config.checkpoint_every == 0
                else:  # automatic: keep the measured cost under CHECKPOINT_BUDGET of the run's time
                    due = time.perf_counter() - last_saved >= max(min_interval, last_cost / CHECKPOINT_BUDGET)
                if due:
                    last_cost = _save_checkpoint(ckpt, config, model, optimizer, step + 1, K_initial, loss_value,
                                                 correct, seen, owner)
                    last_saved = time.perf_counter()
                    n_ckpt, ckpt_seconds = n_ckpt + 1, ckpt_seconds + last_cost
            if bar is not None:
                post = {"loss": f"{loss_value:.3f}", "acc": f"{correct / max(seen, 1):.3f}"}
                if tracker is not None and tracker.last is not None:
                    post["K"] = f"{tracker.last.get('K', float('nan')):.4g}"
                bar.set_postfix(post)
                bar.update(1)
            if callback is not None:
                callback(step, loss_value, tracker)
    finally:
        if bar is not None:
            bar.close()
        if tracker is not None:
            tracker.close()
    if ckpt is not None:
        cost = _save_checkpoint(ckpt, config, model, optimizer, config.steps, K_initial, loss_value, correct, seen,
                                owner)
        n_ckpt, ckpt_seconds = n_ckpt + 1, ckpt_seconds + cost
    test_acc = None
    if config.eval_test:
        test_acc = _evaluate(model, prepare_data(config, train=False), device, dtype)
    return TrainResult(
        config=config, data=info.name, data_source=info.source, steps=config.steps, final_loss=loss_value,
        train_accuracy=correct / max(seen, 1), test_accuracy=test_acc, K_initial=K_initial,
        K_final=_product_norm(model), record=config.record, seconds=time.perf_counter() - t_start, model=model,
        resumed_at=start_step if resume_state is not None else None, checkpoints=n_ckpt,
        checkpoint_seconds=ckpt_seconds,
    )


def _save_checkpoint(path: Path, config: TrainConfig, model, optimizer, step: int, K_initial: float,
                     loss: float, correct: int, seen: int, owner: Optional[dict] = None) -> float:
    """The model, optimizer and step, the run's options (JSON) and its running loss and accuracy.

    One :class:`~sdelip.tracking.checkpoint.Checkpoint` (the tracker's format too), written
    atomically and as data only (:func:`sdelip.tracking.checkpoint.write_checkpoint`); the initial
    K and the running summary are its ``run`` entries, with ``owner``: the record it belongs
    to (path and record id) and the optimizer's class, checked on resume.

    Returns:
        The seconds the write took.
    """
    start = time.perf_counter()
    options = {k: _as_metadata(v) for k, v in _run_options(config).items()}
    write_checkpoint(path, Checkpoint("train", int(step), model.state_dict(), optimizer.state_dict(), options,
                                      run={"K_initial": float(K_initial),
                                           "summary": {"loss": float(loss), "correct": int(correct),
                                                       "seen": int(seen)}, **(owner or {})}))
    return time.perf_counter() - start
