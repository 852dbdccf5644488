"""``python -m preprocess`` is ``fgit-preprocess``."""

from preprocess.cli import main

main()
