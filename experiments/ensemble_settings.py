"""The ensemble validation's settings: scales, sampling schemes, models and task-name prefixes.

Every task's config holds its scale's :data:`SETTINGS`, so a change here changes the
task ids (and reruns the sweep); the counts kept out of SETTINGS (``N_SHARED_SDE`` and
the reshuffle leg's) leave the other tasks' ids alone. See ``ensemble_validation.py``.
"""

from __future__ import annotations

#: Scales. ``n_param_sde`` trajectories of the parameter SDE in chunks of ``sde_chunk`` (one task each),
#: drift from independent batches of ``grad_batch_size``; Π σ1 of the simulated parameters every
#: ``direct_every`` steps.
SETTINGS = {
    "tiny": dict(model="mlp", dataset="mnist-embedded", lr=0.05, batch_size=16, steps=6, n_runs=3,
                 max_train_samples=None, n_sde=2_000, n_checkpoints=3, decomposition="svd",
                 n_param_sde=4, sde_chunk=2, grad_batch_size=64, direct_every=1, n_boot=200),
    "quick": dict(model="mlp", dataset="mnist", lr=0.05, batch_size=64, steps=186, n_runs=16,
                  max_train_samples=None, n_sde=10_000, n_checkpoints=6, decomposition="gram",
                  n_param_sde=64, sde_chunk=16, grad_batch_size=256, direct_every=1, n_boot=2_000),
    "paper": dict(model="convnet", dataset="cifar10", lr=1e-3, batch_size=256, steps=5_000, n_runs=32,
                  max_train_samples=None, n_sde=100_000, n_checkpoints=8, decomposition="svd",
                  n_param_sde=256, sde_chunk=64, grad_batch_size=2_048, direct_every=25, n_boot=2_000),
}

INIT_SEED = 0

#: Trajectories of the parameter SDE with shared noise (``--shared-noise``), per scale (kept out of
#: SETTINGS, which every task's config holds, so that the flag leaves the other tasks' ids alone).
N_SHARED_SDE = {"tiny": 4, "quick": 32, "paper": 256}

#: Trajectories of the reshuffled parameter SDE (``--reshuffle``) per scale, in tasks of ``RESHUFFLE_CHUNK``.
#: One trajectory-step runs all N training samples forward and backward (about 1 s for the quick scale's
#: MLP on one core, docs/performance.md), hence fewer than the iid SDE's.
N_RESHUFFLE_SDE = {"tiny": 2, "quick": 28, "paper": 64}
RESHUFFLE_CHUNK = {"tiny": 2, "quick": 4, "paper": 16}
#: With --reshuffle-only: trajectories of the shared-noise iid SDE (the first of its full-run chunks).
N_SHARED_SDE_RESHUFFLE_ONLY = {"tiny": 2, "quick": 16, "paper": 64}

#: The reduced-SDE variants: name → include_* switches of ReducedLipschitzSDE.
VARIANTS = {
    "full": {},
    "without κ": {"include_noise_curvature": False},
    "without diffusion": {"include_diffusion": False},
    "without Itô correction": {"include_ito_correction": False},
    "without μ": {"include_drift": False},
}

#: The models of the three-way comparison, in table order.
MODELS = ("parameter SDE, Π σ1(θ)", "parameter SDE, Itô", "parameter SDE, Itô + step curvature",
          "reduced SDE (Thm 17)")

#: With --shared-noise: the parameter SDE without Assumption 3 (noise_coupling="shared").
SHARED_MODEL = "parameter SDE, shared noise, Π σ1(θ)"

#: Task-name prefix of the parameter SDE's chunks per noise coupling.
SDE_PREFIX = {"layers": "parameter-sde", "shared": "parameter-sde-shared", "reshuffle": "parameter-sde-reshuffle"}

#: Models of the reshuffle leg (``--reshuffle``), in table order.
RESHUFFLE_MODELS = ("parameter SDE, epoch-pinned noise, Π σ1(θ)", "parameter SDE, iid shared noise, Π σ1(θ)",
                    "reduced SDE, epoch-pinned", "reduced SDE (Thm 17)", "reduced SDE, epoch-pinned + step curvature")

QUANTILES = (0.025, 0.5, 0.975)

SCHEMES = {
    "reshuffled": "sdelip.workbench.train: a reshuffled permutation per epoch, batches without replacement within it",
    "iid": "control: every step draws M distinct samples uniformly, independently of the other steps",
}
#: The ``TrainConfig.sampling`` of each scheme (both runs are :func:`sdelip.workbench.train.train`).
SAMPLING = {"reshuffled": "reshuffle", "iid": "iid"}
