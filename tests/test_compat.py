"""The import-time check of the installed Axolotl: it passes on the release under test and
names the internal, or the version, that stops the plugin on another."""

from __future__ import annotations

import pytest

from axolotl_fgit import compat


def test_the_installed_axolotl_has_every_internal_the_plugin_uses():
    compat.require_axolotl()
    assert compat.axolotl_version()[:2] >= compat.MINIMUM


def test_a_moved_internal_is_named(monkeypatch):
    moved = ("axolotl.utils.collators", "DataCollatorForSeq2Seq.renamed_in_a_later_release")
    monkeypatch.setattr(compat, "INTERNALS", (*compat.INTERNALS, moved))
    with pytest.raises(ImportError, match=r"has no axolotl\.utils\.collators\.DataCollator"):
        compat.require_axolotl()


def test_an_older_axolotl_is_named_with_the_fix(monkeypatch):
    monkeypatch.setattr(compat, "version", lambda name: "0.17.2")
    with pytest.raises(
        ImportError, match=r"needs Axolotl >= 0\.18, found 0\.17\.2; pip install -U"
    ):
        compat.require_axolotl()
