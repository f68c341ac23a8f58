"""Durable records of the Lipschitz dynamics along a training run.

A record is one SQLite database (standard library, no server). Row k holds the Thm 14
layer terms and the Thm 15 network terms measured at the parameters before SGD update
k, on step k's mini-batch, with the SDE time t_k = Σ_{j<k} η_j (= kη for a constant
learning rate, docs/theory.md §1).

Durability: every step is written in one transaction and committed before the next step
starts. The database runs in write-ahead-log mode, so a process killed at any moment
(``kill -9`` included) leaves a consistent record of every committed step; SQLite
replays the log when the file is next opened. With ``durability="process"`` (the
default, ``synchronous=NORMAL``) a committed step survives the death of the process;
``durability="power"`` (``synchronous=FULL``) also survives an operating-system crash or
power loss, at the price of one fsync per step (which can cost more than a plain MLP
step; docs/performance.md).

A record has one writer (:mod:`sdelip.record.lock`: a second one is refused, naming the
holder). Closing the writer folds the log into the file and switches the journal mode to
``DELETE``, so a closed record is the single file. Readers open it read-only
(``mode=ro``), also on read-only mounts; :func:`copy_record` copies a record that is still
being written. Files that are not records (directories, random bytes, damaged or foreign
SQLite databases) are refused by name (:class:`NotARecordError`), and never written.

Closing folds the log even while a reader holds it (retried, the wait reported) or says
loudly that it could not (:class:`RecordNotClosedError`, naming ``sdelip copy``). Every
row carries a checksum and damaged or cut-short records are refused by name
(:class:`DamagedRecordError`, ``load_record(path, intact_only=True)`` reads what is
intact); steps where K or the loss diverged are flagged (:mod:`sdelip.record.integrity`).
A write that fails names the record and the cause (:class:`RecordWriteError`: a full
disk, a lock held by another program, the file deleted under the writer).

Tables::

    meta(key, value)                 run metadata, JSON values
    layers(idx, name, kind, m, n, uses)  the tracked layers in forward order (uses: c, the
                                     number of times a tied weight is applied; 1 otherwise)
    steps(step, t, lr, loss, batch_size, Z, K, drift_Z, …, degenerate)
    layer_steps(step, layer, K, drift, noise_curvature, …, gap, degenerate)
    probes(step, name, value)        optional probes (conv operator norms, Lipschitz lower bound)

:func:`load_record` returns the wide pandas DataFrame documented there;
:func:`load_metadata` the metadata dict; :func:`load_probes` every probe row.
"""

from .format import LAYER_QUANTITIES, NETWORK_QUANTITIES, NotARecordError, RecordExistsError, StepRecord
from .lock import RecordLock, RecordLockedError
from .read import (
    check_record_file,
    copy_record,
    load_layer_uses,
    load_layers,
    load_metadata,
    load_probes,
    load_record_id,
    load_record,
    record_steps,
    records_equal,
)
from .format import remove_record
from .integrity import DamagedRecordError, diverged_steps
from .writer import RecordNotClosedError, RecordWriteError, RecordWriter

__all__ = [
    "RecordWriter", "StepRecord", "load_record", "load_metadata", "load_layers", "load_layer_uses", "load_probes",
    "record_steps", "records_equal", "load_record_id", "diverged_steps", "DamagedRecordError", "RecordWriteError",
    "RecordNotClosedError", "copy_record", "check_record_file", "remove_record",
    "NotARecordError", "RecordExistsError", "RecordLock", "RecordLockedError", "LAYER_QUANTITIES", "NETWORK_QUANTITIES",
]
