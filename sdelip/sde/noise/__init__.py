"""The gradient-noise sources of the SDE systems: where Def 4's drift and diffusion come from.

``data`` (mini-batches drawn reproducibly), ``materialised`` (expected and per-sample
gradients by ``torch.func``), ``factored`` (the increments as one weighted backward, per-sample
statistics by the layer rules), ``reshuffle`` (the dataset-level pass of reshuffled epochs),
``estimator`` (which data, gradient source and engine), ``factor`` (the factor G of the
diffusion and the Euler increments G·v).

May import: :mod:`sdelip.core`, :mod:`sdelip.rules`, :mod:`sdelip.engines` and the SDE's
``layout`` and ``evaluation``.
"""
