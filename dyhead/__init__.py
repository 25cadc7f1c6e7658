"""dyhead: a reproducible pipeline for Dynamic Head (Dai et al., CVPR 2021).

The block for your own detector:

    from dyhead import DyHead, DyHeadConfig
    head = DyHead(DyHeadConfig(blocks=6, channels=256))   # a list of [N, C, H_l, W_l] maps in, same shapes out
"""

__version__ = "0.1.0"
__all__ = ["DyHead", "DyHeadConfig", "__version__"]


def __getattr__(name: str):
    # imported on first use: the CLI's light commands (list, dvc-yaml) do not pay for torch
    if name in ("DyHead", "DyHeadConfig"):
        from dyhead.modeling import dyhead as block

        return getattr(block, name)
    raise AttributeError(f"module 'dyhead' has no attribute {name!r}")
