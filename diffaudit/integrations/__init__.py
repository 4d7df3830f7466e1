"""Glue between :class:`diffaudit.monitor.MemorizationMonitor` and training frameworks.

Each submodule imports its framework lazily, so importing this package costs nothing:

* :mod:`diffaudit.integrations.lightning` -- ``MemorizationCallback``, a Lightning ``Callback`` (needs
  ``pip install "diffaudit[lightning]"``);
* :mod:`diffaudit.integrations.accelerate` -- ``check_after_save``, two lines in the diffusers example training
  scripts (accelerate loops); works with any accelerate-like object.
"""
from __future__ import annotations

__all__ = ["lightning", "accelerate"]
