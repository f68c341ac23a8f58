"""Test-session defaults: experiment scripts run their sweeps in-process unless a test asks for Ray."""

import os

# the default of --workers in experiments/common.py and experiments/run_all (Ray with one task per core otherwise)
os.environ.setdefault("SDELIP_SWEEP_WORKERS", "1")
