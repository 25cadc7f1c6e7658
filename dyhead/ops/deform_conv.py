"""The one entry point for modulated deformable convolution (DCNv2).

Every deformable conv in the package goes through `deform_conv2d`, so the backend
(torchvision's op or our native extension) is chosen in one place.
Layout: offset channel 2k is dy and 2k+1 is dx for kernel tap k = i*kw + j; the mask
is already sigmoided (torchvision's and the official DyHead's convention).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
import torchvision

BACKENDS = ("auto", "native", "torchvision")


def native_available() -> bool:
    """True when the compiled extension can be loaded (see dyhead.ops.native)."""
    try:
        from . import native
    except ImportError:
        return False
    return native.is_built()


_warned_cuda_fallback = False


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"dcn_backend: unknown value {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "native" if native_available() else "torchvision"
    if name == "native" and not native_available():
        from . import native

        raise RuntimeError(
            f"dcn_backend: 'native' requested but the extension is not usable ({native.status()}); "
            "run `dyhead build-ext`"
        )
    return name


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    backend: str = "torchvision",
) -> Tensor:
    """Modulated deformable conv; `backend` must already be resolved ('native' or 'torchvision')."""
    if input.is_meta:
        # FLOP counting (shapes only): a dense conv of the same shapes has the same output shape and, in the
        # multiply-add convention, the same count (the sampling and the mask product are not counted)
        return torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation)
    if backend == "native":
        from . import native

        if input.is_cuda and not native.cuda_compiled():
            # A CPU-only build on a GPU machine: keep training on torchvision's op rather than fail.
            global _warned_cuda_fallback
            if not _warned_cuda_fallback:
                _warned_cuda_fallback = True
                warnings.warn(
                    "dcn_backend=native: the extension was built without CUDA kernels; using torchvision's "
                    "op for CUDA tensors (rebuild with `dyhead build-ext --cuda on`)",
                    stacklevel=2,
                )
        else:
            return native.deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation)
    if input.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(input.device.type):
        # torchvision's kernels are fp32/fp64 only (its CPU op fails on half inputs and under autocast): run
        # it in fp32 with autocast off, as its CUDA autocast wrapper does
        with torch.autocast(input.device.type, enabled=False):
            return torchvision.ops.deform_conv2d(
                input.float(), offset.float(), weight.float(), None if bias is None else bias.float(),
                stride=stride, padding=padding, dilation=dilation, mask=None if mask is None else mask.float())
    return torchvision.ops.deform_conv2d(
        input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )
