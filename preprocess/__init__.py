"""Offline preprocessing for FGIT: ``fgit-preprocess`` (import name ``fgit_preprocess``)."""
