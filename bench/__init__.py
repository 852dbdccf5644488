"""fgit-bench: does FGIT beat plain SFT on held-out problems? (A/B with executed tests)"""
