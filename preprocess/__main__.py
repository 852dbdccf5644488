"""``python -m preprocess`` is ``fgit-preprocess``."""

from fgit_preprocess.cli import main

main()
