"""Axolotl plugin for FGIT (fault-guided fine-tuning): ``plugins: [axolotl_fgit.FGITPlugin]``.

``FGITPlugin`` is imported lazily so that the pure modules (``loss``, ``args``) and the
``fgit-eval`` tool load without pulling in Axolotl.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FGITPlugin"]


def __getattr__(name: str) -> Any:
    if name == "FGITPlugin":
        from axolotl_fgit.plugin import FGITPlugin

        return FGITPlugin
    raise AttributeError(f"module 'axolotl_fgit' has no attribute {name!r}")
