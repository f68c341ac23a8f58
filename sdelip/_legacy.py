"""Old import paths, kept working for one release (0.2): each is the module at its new place.

sdelip 0.1 had 32 public modules side by side at the top level; 0.2 groups them by idea
(docs/architecture.md). ``import sdelip.tracker`` or ``from sdelip.spectral import decompose``
still work: the old name is an alias of the same module object (so ``mock.patch`` on it and
``isinstance`` checks behave as before), and the first import through an old name emits a
:class:`DeprecationWarning` naming the new one. ``sdelip.models``, ``sdelip.data``,
``sdelip.regularizers`` and ``sdelip.train`` also stay attributes of the package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "sdelip.spectral": "sdelip.core.spectral",
    "sdelip.curvature": "sdelip.core.decompositions",
    "sdelip.dynamics": "sdelip.core.formulas",
    "sdelip.terms": "sdelip.core.catalogue",
    "sdelip.noise": "sdelip.core.noise",
    "sdelip.statistics": "sdelip.core.statistics",
    "sdelip.layers": "sdelip.rules.inventory",
    "sdelip.tracker": "sdelip.tracking.tracker",
    "sdelip.pipeline": "sdelip.tracking.measurement",
    "sdelip.optimizer_view": "sdelip.tracking.optimizer_view",
    "sdelip.monitor": "sdelip.tracking.hooks",
    "sdelip.schedule": "sdelip.tracking.schedule",
    "sdelip.tracker_safety": "sdelip.tracking.safety",
    "sdelip.tracker_checkpoint": "sdelip.tracking.checkpointing",
    "sdelip.run_metadata": "sdelip.tracking.metadata",
    "sdelip.probes": "sdelip.tracking.probes",
    "sdelip.threads": "sdelip.tracking.threads",
    "sdelip.checkpoint": "sdelip.tracking.checkpoint",
    "sdelip.resume": "sdelip.tracking.resume",
    "sdelip.record_format": "sdelip.record.format",
    "sdelip.record_read": "sdelip.record.read",
    "sdelip.record_lock": "sdelip.record.lock",
    "sdelip.prediction": "sdelip.analysis.prediction",
    "sdelip.plotting": "sdelip.analysis.plotting",
    "sdelip.train": "sdelip.workbench.train",
    "sdelip.train_config": "sdelip.workbench.config",
    "sdelip.models": "sdelip.workbench.models",
    "sdelip.data": "sdelip.workbench.data",
    "sdelip.regularizers": "sdelip.workbench.regularizers",
    "sdelip.sweep": "sdelip.workbench.sweep",
    "sdelip.sde.gradients": "sdelip.sde.noise.materialised",
    "sdelip.sde.weighted_noise": "sdelip.sde.noise.factored",
    "sdelip.sde.reshuffle": "sdelip.sde.noise.reshuffle",
    "sdelip.sde.noise_factor": "sdelip.sde.noise.factor",
    "sdelip.sde.estimator": "sdelip.sde.noise.estimator",
    "sdelip.sde.data": "sdelip.sde.noise.data",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolve an old module name to the module at its new place (the same object)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        for old, new in MOVED.items():  # a submodule of a moved package (sdelip.sweep.tasks)
            if fullname.startswith(old + "."):
                return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        name = spec.name
        for old, new in sorted(MOVED.items(), key=lambda kv: -len(kv[0])):
            if name == old or name.startswith(old + "."):
                target = new + name[len(old):]
                break
        warnings.warn(f"{name} moved to {target}; the old path works until sdelip 0.3", DeprecationWarning,
                      stacklevel=3)
        return importlib.import_module(target)

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())  # before the path finder: a submodule of a moved package is never loaded twice
