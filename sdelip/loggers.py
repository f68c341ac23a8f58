"""Live export of the tracked terms to TensorBoard, CSV, Weights & Biases and MLflow.

A logger is a small object with three methods; the tracker calls :meth:`Logger.log_row`
once for every row it writes (with the run's metadata logged once, before the first row)
and :meth:`Logger.close` at :meth:`~sdelip.tracking.Tracker.close`::

    from sdelip.loggers import TensorBoardLogger, CSVLogger
    from sdelip.tracking import RuntimeOptions, Tracker

    tracker = Tracker(model, opt, "run.db",
                      runtime=RuntimeOptions(loggers=[TensorBoardLogger("tb/run"), CSVLogger("run.csv")]))

:func:`export_record` (``sdelip export RECORD --to tensorboard|csv|wandb|mlflow``) sends an
existing record through the same loggers.

Values are logged as what they are. Numbers (σ1, the coefficients, t, η, the loss) are
scalars/metrics at their step. Booleans (``degenerate``, ``update_modelled``, ``degenerate/<layer>``)
and strings (``update_note``) are not numbers: TensorBoard gets them as text, at the first row
and whenever they change (the value holds until the next text); W&B gets them as bools and
strings; MLflow, whose metrics are numbers only, as tags (the last value, and for a boolean
the steps where it was true, ``<name>.true_steps``); the CSV file as True/False and text.
Metadata (model, layers, optimizer, versions) is text in TensorBoard (JSON), the run config
in W&B, params plus a ``metadata.json`` artifact in MLflow, and a JSON file beside the CSV.
A missing value (None, or NaN for a coefficient a step does not define) is not logged.

TensorBoard needs the ``tensorboard`` package, W&B ``wandb`` and MLflow ``mlflow`` (or
``mlflow-skinny``): ``pip install "sdelip[loggers]"``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

__all__ = ["Logger", "TensorBoardLogger", "CSVLogger", "WandbLogger", "MLflowLogger", "split_row", "log_rows",
           "close_loggers", "export_record", "EXPORT_TARGETS", "LoggerFanout"]


def _plain(v):
    """numpy scalars as Python ones."""
    item = getattr(v, "item", None)
    if item is not None and getattr(v, "shape", None) == ():
        return item()
    return v


def split_row(row: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """(numbers, booleans, texts) of a row; missing values (None, NaN) are left out, ``step`` too."""
    numbers, flags, texts = {}, {}, {}
    for key, value in row.items():
        if key == "step":
            continue
        value = _plain(value)
        if value is None:
            continue
        if isinstance(value, bool):
            flags[key] = value
        elif isinstance(value, (int, float)):
            if isinstance(value, float) and math.isnan(value):
                continue
            numbers[key] = value
        elif isinstance(value, str):
            texts[key] = value
        else:
            texts[key] = json.dumps(value, default=str)
    return numbers, flags, texts


class Logger:
    """The interface of a logger (subclass it, or write any object with these three methods)."""

    def log_metadata(self, metadata: Mapping[str, Any]) -> None:
        """The run's metadata (once, before the first row)."""

    def log_row(self, row: Mapping[str, Any], step: int) -> None:
        """One tracked step's row (the record's columns: ``StepRecord.as_row()``)."""

    def close(self) -> None:
        """Flush and close (idempotent)."""


class _Changes:
    """The booleans and texts of the previous row, to log them when they change."""

    def __init__(self):
        self.last: dict = {}

    def changed(self, values: Mapping[str, Any]) -> dict:
        out = {k: v for k, v in values.items() if self.last.get(k, object()) != v}
        self.last.update(values)
        return out


class TensorBoardLogger(Logger):
    """Scalars per step in a TensorBoard log folder (``torch.utils.tensorboard.SummaryWriter``).

    Numbers are scalars under their column name (``K/fc1``, ``drift_Z``); booleans and strings are
    text (``true``/``false``) at the first row and each change; the metadata is JSON text under
    ``metadata``.

    Args:
        log_dir: the folder of the event files (one run).
        writer: an existing ``SummaryWriter`` instead (not closed by :meth:`close`).
        prefix: put before every tag, e.g. ``"sdelip/"``.
    """

    def __init__(self, log_dir=None, writer=None, prefix: str = ""):
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer, self._own = SummaryWriter(log_dir=None if log_dir is None else str(log_dir)), True
        else:
            self._own = False
        self.writer, self.prefix = writer, prefix
        self._changes = _Changes()

    def log_metadata(self, metadata):
        text = json.dumps(dict(metadata), indent=2, default=str)
        self.writer.add_text(f"{self.prefix}metadata", "```\n" + text + "\n```", global_step=0)

    def log_row(self, row, step):
        numbers, flags, texts = split_row(row)
        for key, value in numbers.items():
            self.writer.add_scalar(self.prefix + key, value, global_step=int(step))
        for key, value in self._changes.changed({**flags, **texts}).items():
            shown = ("true" if value else "false") if isinstance(value, bool) else value
            self.writer.add_text(self.prefix + key, shown, global_step=int(step))

    def close(self):
        self.writer.flush()
        if self._own:
            self.writer.close()


class CSVLogger(Logger):
    """One CSV row per tracked step (booleans as True/False), the metadata as JSON beside it.

    Args:
        path: the CSV file (replaced). The metadata goes to ``<path stem>.metadata.json``.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.metadata_path = self.path.with_name(self.path.stem + ".metadata.json")
        self.columns: list = []
        self._file = None
        self._writer = None
        self.path.write_text("")

    def log_metadata(self, metadata):
        self.metadata_path.write_text(json.dumps(dict(metadata), indent=2, default=str))

    def log_row(self, row, step):
        values = {k: _plain(v) for k, v in row.items()}
        values["step"] = int(step)
        new = [k for k in values if k not in self.columns]
        if new:  # a column not seen before (e.g. a probe): rewrite with the union of the columns
            if self._file is not None:
                self._file.close()
            with open(self.path, newline="") as f:
                old = list(csv.DictReader(f))
            self.columns = (["step"] if not self.columns else self.columns) + [k for k in new if k != "step"]
            self._file = open(self.path, "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
            self._writer.writeheader()
            self._writer.writerows(old)
        self._writer.writerow({k: ("" if v is None else v) for k, v in values.items()})
        self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class WandbLogger(Logger):
    """Each row as one ``wandb.log(..., step=step)``: numbers, booleans as bools, strings as strings;
    the metadata in the run config.

    Args:
        run: an existing ``wandb`` run (not finished by :meth:`close`); else one is started with
            ``wandb.init(**init_kwargs)`` at the first call (e.g. ``project=``, ``dir=``,
            ``mode="offline"``).
    """

    def __init__(self, run=None, **init_kwargs):
        self.run, self._own, self.init_kwargs = run, run is None, init_kwargs

    def _run(self):
        if self.run is None:
            import wandb

            self.run = wandb.init(**self.init_kwargs)
        return self.run

    def log_metadata(self, metadata):
        self._run().config.update(json.loads(json.dumps(dict(metadata), default=str)), allow_val_change=True)

    def log_row(self, row, step):
        numbers, flags, texts = split_row(row)
        self._run().log({**numbers, **flags, **texts}, step=int(step))

    def close(self):
        if self._own and self.run is not None:
            self.run.finish()
            self.run = None


_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


@contextlib.contextmanager
def _file_store_allowed(uri: Optional[str]):
    """MLflow 3 refuses its local file store (``file:`` URIs, "maintenance mode") unless
    ``MLFLOW_ALLOW_FILE_STORE`` is set: set while this logger uses one, unless the user set it."""
    if not (uri and str(uri).startswith("file:")) or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


class MLflowLogger(Logger):
    """Numbers as MLflow metrics at their step; booleans and strings as tags (MLflow metrics are numbers
    only): ``<name>`` holds the last value, ``<name>.true_steps`` the steps where a boolean was true;
    column names with ``/`` as ``.`` (:meth:`key`); the metadata as params (flattened, long values cut) and the artifact ``metadata.json``.

    Args:
        tracking_uri: MLflow's tracking URI, e.g. a database ``"sqlite:///mlflow.db"`` or a local file store
            ``"file:///abs/path/mlruns"`` (MLflow 3 keeps the file store in maintenance mode; this
            logger allows it for its own calls) (default: MLflow's).
        experiment: the experiment name (created if absent; default MLflow's default experiment).
        run_name: the new run's name.
        run_id: log into this existing run instead (not ended by :meth:`close`).
    """

    def __init__(self, tracking_uri: Optional[str] = None, experiment: Optional[str] = None,
                 run_name: Optional[str] = None, run_id: Optional[str] = None):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self._own = run_id is None
        with self._store():
            self.client = MlflowClient(tracking_uri=tracking_uri)
            if run_id is None:
                exp_id = "0"
                if experiment is not None:
                    exp = self.client.get_experiment_by_name(experiment)
                    exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
                run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self.run_id = run_id
        self._true_steps: dict = {}
        self._changes = _Changes()

    def _store(self):
        return _file_store_allowed(self.tracking_uri)

    @staticmethod
    def key(name: str) -> str:
        """A column name as an MLflow key: ``/`` becomes ``.`` (``K/fc1`` → ``K.fc1``: in a file store
        the metric ``K`` and the folder of ``K/fc1`` would clash), other characters MLflow refuses ``_``."""
        return _MLFLOW_KEY.sub("_", name.replace("/", "."))

    def log_metadata(self, metadata):
        from mlflow.entities import Param

        params = [Param(self.key(k)[:250], str(v if not isinstance(v, (dict, list)) else json.dumps(v, default=str))[:500])
                  for k, v in dict(metadata).items()]
        with self._store():
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.log_dict(self.run_id, json.loads(json.dumps(dict(metadata), default=str)), "metadata.json")

    def log_row(self, row, step):
        import time

        from mlflow.entities import Metric, RunTag

        numbers, flags, texts = split_row(row)
        now = int(time.time() * 1000)
        metrics = [Metric(self.key(k), float(v), now, int(step)) for k, v in numbers.items()]
        tags = []
        for k, v in flags.items():
            if v:
                self._true_steps.setdefault(k, []).append(int(step))
                steps = ",".join(map(str, self._true_steps[k]))
                tags.append(RunTag(self.key(k) + ".true_steps", steps[-4900:]))
        for k, v in self._changes.changed({**flags, **texts}).items():
            tags.append(RunTag(self.key(k), ("true" if v else "false") if isinstance(v, bool) else v[:4900]))
        with self._store():
            for i in range(0, max(len(metrics), 1), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], tags=tags if i == 0 else [])

    def close(self):
        if self._own and self.run_id is not None:
            with self._store():
                self.client.set_terminated(self.run_id)
            self._own = False


class LoggerFanout:
    """The tracker's loggers: the metadata before the first row, then every row it writes, then close."""

    def __init__(self, loggers: Iterable):
        self.loggers = list(loggers)
        self._started = False

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def write(self, rec, metadata: Mapping) -> None:
        """One written :class:`~sdelip.record.StepRecord` (``rec.as_row()``) to every logger."""
        if not self._started:
            self._started = True
            for lg in self.loggers:
                lg.log_metadata(metadata)
        row = rec.as_row()
        for lg in self.loggers:
            lg.log_row(row, int(rec.step))

    def close(self) -> None:
        close_loggers(self.loggers)


def log_rows(loggers: Iterable, rows: Iterable[tuple[int, Mapping]], metadata: Optional[Mapping] = None) -> None:
    """Send rows (step, row) to loggers, with the metadata first when given."""
    loggers = list(loggers)
    if metadata is not None:
        for lg in loggers:
            lg.log_metadata(metadata)
    for step, row in rows:
        for lg in loggers:
            lg.log_row(row, step)


def close_loggers(loggers: Iterable) -> None:
    for lg in loggers:
        lg.close()


#: ``sdelip export --to`` targets → the default destination beside the record.
EXPORT_TARGETS = {"tensorboard": ".tb", "csv": ".csv", "wandb": ".wandb", "mlflow": ".mlruns"}


def export_record(record, to: str, dest=None, project: Optional[str] = None) -> str:
    """Send an existing record (a path) through one logger; returns where it went.

    Args:
        record: the record file.
        to: ``"tensorboard"`` (a log folder), ``"csv"`` (a file), ``"wandb"`` (a W&B run; offline
            unless ``WANDB_MODE`` says otherwise, its files under ``dest``) or ``"mlflow"`` (a run in
            the local file store ``dest``, or ``dest`` as a tracking URI when it has a scheme).
        dest: the destination (default: beside the record, ``RECORD.tb``, ``RECORD.csv``,
            ``RECORD.wandb``, ``RECORD.mlruns``).
        project: the W&B project or MLflow experiment (default ``"sdelip"``).
    """
    from .record import load_metadata, load_record

    if to not in EXPORT_TARGETS:
        raise ValueError(f"--to must be one of {sorted(EXPORT_TARGETS)}, got {to!r}")
    record = Path(record)
    df = load_record(record)
    metadata = load_metadata(record) or {}
    dest = str(dest) if dest is not None else str(record) + EXPORT_TARGETS[to]
    project = project or "sdelip"
    name = record.stem
    if to == "tensorboard":
        logger = TensorBoardLogger(dest)
    elif to == "csv":
        logger = CSVLogger(dest)
    elif to == "wandb":
        Path(dest).mkdir(parents=True, exist_ok=True)
        logger = WandbLogger(project=project, name=name, dir=dest, mode=os.environ.get("WANDB_MODE", "offline"))
    else:
        uri = dest if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", dest) or dest.startswith("file:") else \
            Path(dest).resolve().as_uri()
        logger = MLflowLogger(uri, experiment=project, run_name=name)
    rows = ((int(r["step"]), {k: _record_value(v) for k, v in r.items()}) for r in df.to_dict("records"))
    try:
        log_rows([logger], rows, metadata)
    finally:
        logger.close()
    return dest


def _record_value(v):
    """A record cell as the tracker's row had it (pandas' NaN in an object column is None)."""
    v = _plain(v)
    if isinstance(v, float) and math.isnan(v):
        return None
    return v
