"""``python -m fgit_preprocess`` is ``fgit-preprocess``."""

from fgit_preprocess.cli import main

main()
