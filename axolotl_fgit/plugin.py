"""``plugins: [axolotl_fgit.FGITPlugin]``: wires FGIT's config, collator and trainer."""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from axolotl_fgit.compat import require_axolotl

require_axolotl()

LOG = get_logger(__name__)


class FGITPlugin(BasePlugin):
    """Active when the config has an ``fgit:`` block; otherwise it stays out of the way."""

    def get_input_args(self) -> str:
        return "axolotl_fgit.args.FGITArgs"

    def register(self, cfg: dict) -> None:
        if not cfg.get("fgit"):
            LOG.warning(
                "axolotl_fgit.FGITPlugin is listed but the config has no fgit: block; "
                "training is plain SFT. Add fgit: {alpha: 2.0} to turn FGIT on."
            )

    def get_training_args(self, cfg):
        """Count N across ranks (one scalar all-reduce), so N ranks match one process."""
        return {"average_tokens_across_devices": True} if cfg.fgit else None

    def get_trainer_cls(self, cfg):
        if not cfg.fgit:
            return None
        from axolotl_fgit.trainer import AxolotlFGITTrainer

        return AxolotlFGITTrainer

    def get_collator_cls_and_kwargs(self, cfg, is_eval: bool = False):
        if not cfg.fgit:
            return None
        from axolotl_fgit.collator import FGITDataCollator, FGITPackedDataCollator

        packed = cfg.eval_sample_packing if is_eval else cfg.sample_packing
        return (FGITPackedDataCollator if packed else FGITDataCollator), {}
