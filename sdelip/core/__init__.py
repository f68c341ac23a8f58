"""The math core: tensors in, tensors out — no hooks, no files, no models.

=====================  ======================================================================
module                 what it holds
=====================  ======================================================================
``spectral``           σ1, u1, v1, the gap and the operator norm's Jacobian and Hessian of one
                       weight matrix by a thin SVD (Prop 9, Lemma 12–13, Assumption 11)
``decompositions``     the ``Decomposition`` protocol (the primitives every route exposes); the
                       same primitives from the smaller Gram matrix, and batched over SDE
                       trajectories
``formulas``           the Thm 14–17 term formulas: μ, κ (Prop 6 split), ‖λ‖², step curvature
                       (one ``terms_from_projections`` for every decomposition route);
                       network sums (Thm 15); the moments of K(t) (Thm 16–17)
``catalogue``          every quantity named once: record columns, labels, which the SDE
                       computes or integrates, how it scales for a weight applied c times
``noise``              layer-wise gradient noise from per-sample gradients (Prop 5–7)
``statistics``         the per-sample statistics of one layer that the formulas consume
=====================  ======================================================================

May import: torch, numpy, attrs, :mod:`sdelip.errors` and :mod:`sdelip._checks`; nothing else of
sdelip (the rest of the library builds on this package, never the other way round).
"""
