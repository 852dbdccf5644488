"""Which Axolotl is installed, and whether it has every internal the plugin relies on.

Supported: Axolotl 0.18 and later (checked against 0.18, 0.19, 0.20 and 0.21). Nothing caps
the version: a later release that moved one of these internals fails at import with a
message that names it, instead of training something else.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

MINIMUM = (0, 18)
# (module, attribute path) pairs the plugin subclasses or calls.
INTERNALS = (
    ("axolotl.prompt_strategies.chat_template", "ChatTemplateStrategy._tokenize_single_prompt"),
    ("axolotl.prompt_strategies.chat_template", "ChatTemplateStrategy.get_conversation_thread"),
    ("axolotl.prompt_strategies.chat_template", "ChatTemplateStrategy._get_tools"),
    ("axolotl.prompt_strategies.chat_template", "StrategyLoader._get_strategy_params"),
    ("axolotl.prompt_strategies.chat_template", "StrategyLoader._get_strategy_cls"),
    ("axolotl.utils.collators", "DataCollatorForSeq2Seq"),
    ("axolotl.utils.collators", "V2BatchSamplerDataCollatorForSeq2Seq"),
    ("axolotl.core.trainers.base", "AxolotlTrainer.axolotl_cfg"),
    ("axolotl.integrations.base", "BasePlugin.get_collator_cls_and_kwargs"),
)


def axolotl_version() -> tuple[int, ...]:
    """The installed Axolotl's version as numbers (``0.19.0`` → ``(0, 19, 0)``)."""
    try:
        text = version("axolotl")
    except PackageNotFoundError as err:
        raise ImportError(
            "axolotl-fgit is an Axolotl plugin, but Axolotl is not installed; pip install axolotl"
        ) from err
    return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())


def require_axolotl() -> None:
    """Raise ImportError naming the problem when this Axolotl cannot run the plugin."""
    import importlib

    found = axolotl_version()
    if found[:2] < MINIMUM:
        raise ImportError(
            f"axolotl-fgit needs Axolotl >= {'.'.join(map(str, MINIMUM))}, "
            f"found {'.'.join(map(str, found))}; pip install -U axolotl"
        )
    for module, path in INTERNALS:
        obj = importlib.import_module(module)
        for name in path.split("."):
            if not hasattr(obj, name):
                raise ImportError(
                    f"Axolotl {'.'.join(map(str, found))} has no {module}.{path}, which "
                    "axolotl-fgit uses; install a supported Axolotl (0.18 to 0.21 are tested) "
                    "or report this version"
                )
            obj = getattr(obj, name)
