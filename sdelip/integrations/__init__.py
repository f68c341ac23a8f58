"""Integrations with the frameworks researchers train in (docs/integrations.md).

Each submodule imports its framework lazily and only when imported itself, so sdelip runs
without them (``pip install "sdelip[integrations]"`` installs Lightning and transformers):

- :mod:`sdelip.integrations.lightning`: :class:`~sdelip.integrations.lightning.SdelipCallback`,
  a Lightning callback tracking a ``LightningModule`` trained with automatic optimization;
- :mod:`sdelip.integrations.huggingface`: per-sample losses of Hugging Face models on dict
  batches, the adapter that lets ``ParameterSDE``/``LipschitzSDE`` take them, and
  :class:`~sdelip.integrations.huggingface.SdelipTrainer` (a ``transformers.Trainer`` that tracks);
- :mod:`sdelip.integrations.distributed`: :class:`~sdelip.integrations.distributed.DistributedTracker`
  for DDP / ``torchrun`` runs (torch only).
"""
