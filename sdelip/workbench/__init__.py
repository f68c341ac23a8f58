"""The workbench of the paper's experiments: training loop, models, datasets, regularizers, sweeps.

``train`` (the paper's SGD loop with live tracking), ``config`` (its :class:`TrainConfig` and
result), ``models`` (the paper's networks and initialisations), ``data`` (datasets and
deterministic loaders; the bundled MNIST digits), ``regularizers`` (Appendix B, Sec 8.4–8.5),
``sweep`` (independent runs in-process or on Ray).

May import everything below it: :mod:`sdelip.core`, :mod:`sdelip.rules`, :mod:`sdelip.tracking`,
:mod:`sdelip.record`.
"""
