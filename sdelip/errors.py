"""Every public exception and warning of sdelip, defined once.

The modules that raise them import them from here (and re-export them, so the import paths of
0.1, e.g. ``from sdelip.tracking.tracker import InputMismatchError``, keep working);
:mod:`sdelip` re-exports them all. This module imports nothing of sdelip: any module may
import it. :func:`python_option` is the default spelling of :class:`ResumeError`'s message.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = [
    "DegenerateSpectrumWarning", "DegenerateSpectrumError", "NonFiniteError", "EngineError",
    "EngineNotApplicableError", "WeightUsesError", "SharedTensorWarning", "RuleError", "BatchAxisError",
    "NoTrackableLayerError", "UnsupportedLayerError", "InputMismatchError", "NotPlainSGDWarning",
    "SmallBatchWarning", "GradientAccumulationError", "CheckpointError", "UnsafeCheckpointError",
    "CheckpointWriteError", "ResumeError", "RecordExistsError", "NotARecordError", "RecordLockedError",
    "DatasetFallbackWarning", "DatasetNotFoundError", "NoOptimizerRuleError", "UnsupportedOptimizerError",
    "UnmodelledUpdateError", "DamagedRecordError", "RecordWriteError", "RecordNotClosedError",
    "RecurrentInputError", "SecondOrderLossError", "LossMismatchError",
    "MixedPrecisionError",
    "IntegrationError", "PerSampleLossError", "UnsupportedPrecisionError",
    "DistributedTrackingError",
    "UnsupportedOptimizerSDEError",
    "LearningRateScheduleError",
]


# Numerics of the math core (Assumption 11, finite values)

class DegenerateSpectrumWarning(UserWarning):
    """The top singular value of a weight matrix is (nearly) repeated.

    Lemma 13 and Theorem 14 assume σ1 > σ2 (Assumption 11). When the relative gap
    (σ1 − σ2)/σ1 falls below the tolerance the operator-norm Hessian is
    ill-conditioned; sdelip clamps the gap and flags the value instead of
    returning inf or NaN.
    """


class DegenerateSpectrumError(ValueError):
    """Raised instead of :class:`DegenerateSpectrumWarning` when asked to, or when σ1 = 0."""


class NonFiniteError(FloatingPointError):
    """A loss, gradient or dynamics term is NaN or infinite."""


# Engines: the per-sample statistics of a step

class EngineError(RuntimeError):
    """An engine could not compute the per-sample statistics of a step."""


class EngineNotApplicableError(ValueError):
    """The requested engine does not apply to this model (e.g. factored with BatchNorm)."""


class WeightUsesError(EngineError):
    """A forward pass applied a tracked weight a different number of times than the tracker counts.

    The product bound K contains σ1(θ)^c for a weight applied c times (Prop 8), so the
    number of uses must be known and the same in every forward pass.
    """


class SharedTensorWarning(UserWarning):
    """A tracked layer's output does not carry the samples on one axis: exact, but a batched backward per step."""


# Layer rules and the inventory of tracked layers

class RuleError(RuntimeError):
    """A rule could not compute the statistics of a use (message names the layer and step)."""


class BatchAxisError(RuleError):
    """The axis of a layer's input that carries the samples cannot be determined."""


class RecurrentInputError(RuleError):
    """A recurrent layer (nn.RNN/LSTM/GRU) is given an input whose samples are on no axis (a PackedSequence)."""


class SecondOrderLossError(EngineError):
    """The losses contain a gradient taken with ``create_graph=True`` (a gradient penalty).

    The weights then enter the loss also through the backward graph of that gradient, which
    no layer hook sees; the coupled engine differentiates the losses themselves and is exact.
    """


class LossMismatchError(EngineError):
    """The materialised engine's ``loss_fn`` does not give the gradient the step applied.

    The batch mean of its per-sample gradients differs from the gradient of the step's own
    ``losses.mean()`` (another loss, a penalty term, fresh dropout masks, a precision the
    recomputation does not reproduce): its numbers would describe another loss.
    """


class MixedPrecisionError(EngineError):
    """An engine cannot form the per-sample gradients of a forward pass run under ``torch.autocast``."""


class NoTrackableLayerError(ValueError):
    """The model has no trainable weight matrix to track."""


class UnsupportedLayerError(ValueError):
    """A trainable weight matrix has no layer rule and ``unsupported="error"`` was asked for."""


# Tracking: inputs, optimizer, steps

class InputMismatchError(TypeError):
    """The model's parameters and the data are on different devices or have different dtypes."""


class NotPlainSGDWarning(UserWarning):
    """The optimizer has no update rule in :mod:`sdelip.optim`: only realised increments are recorded.

    (Until sdelip 0.1 this warned for every optimizer but plain SGD and the terms were then
    computed as for plain SGD; optimizers with a rule are now modelled exactly.)
    """


class SmallBatchWarning(UserWarning):
    """A tracked step has a mini-batch of one sample: it is not tracked (Prop 5 needs M ≥ 2)."""


class GradientAccumulationError(RuntimeError):
    """Several :meth:`~sdelip.tracking.tracker.Tracker.backward` calls per optimizer step (gradient accumulation)."""


# Checkpoints and resuming

class CheckpointError(ValueError):
    """A file is not a usable sdelip checkpoint (missing, truncated, another format)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds Python objects other than tensors and plain containers.

    Loading such a file with pickle could run arbitrary code, so it is refused unread.
    """


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, no permission, …); the previous one is intact."""

    def __str__(self) -> str:  # the message alone, without "[Errno N]"
        return str(self.strerror)


def python_option(option: str, value: Any) -> str:
    """An option as a Python caller writes it, e.g. ``lr=0.01`` (a configuration object by its ``active()``)."""
    active = getattr(value, "active", None)
    if callable(active):
        value = active() or "none"
    return f"{option}={value!r}"


class ResumeError(ValueError):
    """A run cannot continue from its checkpoint and record as asked.

    Either the options differ from those of the run that wrote the checkpoint (or the
    record), or the record and the checkpoint do not belong together. The message names
    every differing option with both values; :meth:`describe` spells the options for
    another audience (the command line names its flags).

    Attributes:
        problem: what is wrong; ``{overwrite}`` and ``{checkpoint}`` stand for those options.
        changes: the :class:`~sdelip.tracking.resume.OptionChange` list (empty when the options agree).
        source: ``"checkpoint"`` or ``"record"``: whose options ``changes`` compares with.

    Args:
        problem, changes, source: the attributes.
        spell: how the message spells an option and its value (default :func:`python_option`).
    """

    def __init__(self, problem: str, changes: Sequence["OptionChange"] = (), source: str = "checkpoint",
                 spell: Callable[[str, Any], str] = None):
        self.problem = problem
        self.changes = list(changes)
        self.source = source
        super().__init__(self.describe(spell or python_option))

    def describe(self, spell: Callable[[str, Any], str] = python_option) -> str:
        """The message with options spelled by ``spell(option, value)``."""
        problem = self.problem.replace("{overwrite}", spell("overwrite", True))
        lines = [problem.replace("{checkpoint}", spell("checkpoint", "FILE"))]
        lines += [f"  {spell(c.option, c.requested)} now, {spell(c.option, c.checkpoint)} in the {self.source}"
                  for c in self.changes]
        if self.changes:
            lines.append(f"A resumed run continues the configuration of the run that wrote the {self.source}: rerun "
                         f"with its options, or pass {spell('overwrite', True)} to start a new run, which replaces the "
                         "record and the checkpoint.")
        return "\n".join(lines)


# Records

class RecordExistsError(FileExistsError):
    """The record file already holds steps and neither append nor overwrite was asked for."""


class NotARecordError(ValueError):
    """A path is not an sdelip record: a directory, not an SQLite file, another program's database, or damaged."""


class RecordLockedError(RuntimeError):
    """Another writer holds the record (the message names it)."""


# Workbench datasets

class DatasetFallbackWarning(UserWarning):
    """A requested dataset was unavailable and a documented substitute was loaded."""


class DatasetNotFoundError(FileNotFoundError):
    """Dataset files are missing (and could not be downloaded)."""

class NoOptimizerRuleError(LookupError):
    """No rule is registered for the optimizer's exact class (message lists the supported ones)."""


class UnsupportedOptimizerError(ValueError):
    """A registered optimizer is configured (or used) in a way its rule does not model exactly.

    The message names the optimizer, the parameter and the cause.
    """


class UnmodelledUpdateError(ValueError):
    """A record's steps whose update the model coefficients do not describe (named, with the cause)."""


class DamagedRecordError(NotARecordError):
    """A record whose rows fail their checksums or whose file is cut short (the message names both)."""


class RecordWriteError(OSError):
    """Writing a record failed (full disk, a lock held by another program, the file gone); the message names it."""

    def __str__(self) -> str:  # the message alone, without "[Errno N]"
        return str(self.args[0]) if self.args else ""


class RecordNotClosedError(RecordWriteError):
    """The record could not be made one self-contained file at close; the message says how to finish it."""


# Integrations with training frameworks (sdelip.integrations)

class IntegrationError(ValueError):
    """A training framework's setting that the tracker cannot measure exactly (Lightning, HF Trainer, DDP)."""


class PerSampleLossError(IntegrationError):
    """The training step did not give the per-sample losses the tracker needs (the contract is named)."""


class UnsupportedPrecisionError(IntegrationError):
    """A mixed-precision setting (loss scaling, bf16/fp16 autocast) that the tracker refuses by name."""


class DistributedTrackingError(IntegrationError):
    """A distributed (DDP) run that :class:`~sdelip.integrations.distributed.DistributedTracker` cannot track exactly."""


class UnsupportedOptimizerSDEError(UnsupportedOptimizerError):
    """An optimizer (or one of its settings) that :class:`sdelip.sde.OptimizerSDE` has no SDE for.

    The message names the optimizer and the setting (amsgrad, maximize, several param groups, …).
    """


class LearningRateScheduleError(ValueError):
    """One learning rate η was given for a record whose η varies (a schedule, e.g. StepLR).

    The simulations integrate on the record's own η(t) (its ``t`` and ``lr`` columns); a single
    η would stretch or shrink the clock silently, so it is refused (Python and the command line alike).
    """
