"""Axolotl plugin for FGIT (fault-guided fine-tuning): ``plugins: [axolotl_fgit.FGITPlugin]``."""
