"""The native DCNv2 extension (sources in dyhead/csrc): loader and Python-side registrations.

Importing this module never compiles anything and never raises: the library is looked up lazily,
on the first `is_built()` or `deform_conv2d` call, from the manifest that `dyhead build-ext`
(dyhead.ops.build) writes, in `build/ext/` at the repository root or in `$DYHEAD_EXT_DIR`.

It is used only when
  * the manifest exists and names a library file that exists,
  * the manifest's source hash equals the hash of the current dyhead/csrc sources (a stale
    build is never run against newer sources), and it was built for the running torch version,
  * `torch.ops.load_library` loads it.
Once loaded, the ops `dyhead::deform_conv2d` and `dyhead::deform_conv2d_backward` get a fake
(meta) kernel here, so `torch.compile(fullgraph=True)` traces them. Autograd and autocast are in C++
(csrc/deform_conv_autograd.cpp, csrc/deform_conv.cpp): CUDA runs in the autocast dtype, CPU in fp32.

Environment: DYHEAD_EXT_DIR (build directory), DYHEAD_DCN_CPU_ISA=default|avx2|avx512 (cap the CPU
kernel variant; the best the CPU supports by default), DYHEAD_DCN_COLUMN_KB (column buffer budget
per chunk; default 1 MiB on CPU, 512 MiB on CUDA), DYHEAD_DCN_CUDA_GRAD_INPUT=gather|atomic (how the
CUDA backward forms the input gradient: a deterministic gather, the default, or an fp32 atomic
scatter, kept to measure against).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CSRC_DIR = Path(__file__).resolve().parents[1] / "csrc"
MANIFEST_NAME = "manifest.json"
SOURCE_SUFFIXES = (".h", ".hpp", ".cpp", ".cu", ".cuh")

_lock = threading.RLock()
_ready = False  # library loaded and Python registrations done
_status = "not checked yet"
_fwd_op: Any = None
_manifest: dict | None = None
_has_cuda = False  # the loaded library has the CUDA kernels


def default_ext_dir() -> Path:
    """`$DYHEAD_EXT_DIR` if set, else `build/ext` at the repository root."""
    env = os.environ.get("DYHEAD_EXT_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "build" / "ext"


def source_files() -> list[Path]:
    """All extension sources, sorted (C++ and CUDA alike: one hash covers both)."""
    return sorted(p for p in CSRC_DIR.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def source_hash() -> str:
    h = hashlib.sha256()
    for p in source_files():
        h.update(p.relative_to(CSRC_DIR).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def read_manifest(ext_dir: Path | None = None) -> dict | None:
    path = Path(ext_dir or default_ext_dir()) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ops_present() -> bool:
    return hasattr(torch.ops, "dyhead") and hasattr(torch.ops.dyhead, "deform_conv2d")


def _load() -> None:
    """Load the library named by the manifest (raises with a one-line reason when unusable)."""
    global _manifest, _has_cuda
    ext_dir = default_ext_dir()
    manifest = read_manifest(ext_dir)
    if manifest is None:
        raise RuntimeError(f"no build manifest at {ext_dir / MANIFEST_NAME}")
    lib = Path(manifest.get("library", ""))
    if not lib.is_absolute():
        lib = ext_dir / lib
    if not lib.is_file():
        raise RuntimeError(f"the manifest names {lib}, which does not exist")
    if manifest.get("source_hash") != source_hash():
        raise RuntimeError("dyhead/csrc changed since the extension was built")
    if manifest.get("torch_version") != torch.__version__:
        raise RuntimeError(f"built for torch {manifest.get('torch_version')}, running torch {torch.__version__}")
    if not _ops_present():  # a second library would clash with the registered `dyhead` namespace
        torch.ops.load_library(str(lib))
    if not _ops_present():
        raise RuntimeError(f"{lib} loaded but registered no dyhead::deform_conv2d")
    _manifest = manifest
    _has_cuda = bool(torch.ops.dyhead._has_cuda())


def is_built() -> bool:
    """True when the extension is (or can now be) loaded and matches the current sources."""
    global _ready, _status
    if _ready:
        return True
    with _lock:
        if _ready:
            return True
        try:
            _load()
            _register_python_side()
        except Exception as e:  # noqa: BLE001 - any failure means "not available"
            _status = f"{type(e).__name__}: {e}".splitlines()[0]
            return False
        _ready = True
        _status = "loaded"
        return True


def status() -> str:
    """One line: 'loaded' or why the extension is not usable (after an is_built() call)."""
    if not _ready:
        is_built()
    return _status


def cuda_compiled() -> bool:
    """True when the loaded library has the CUDA kernels (a cached flag: cheap, and traceable)."""
    return (_ready or is_built()) and _has_cuda


def manifest() -> dict | None:
    """The manifest of the loaded library (None when not loaded)."""
    return dict(_manifest) if _ready and _manifest is not None else None


# ---- Python registrations: fake kernels and autograd ------------------------------------------------


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - (dil * (k - 1) + 1)) // stride + 1


def _fake_forward(input, offset, mask, weight, bias, stride, padding, dilation):
    torch._check(input.dim() == 4 and weight.dim() == 4 and offset.dim() == 4, lambda: "4-d tensors expected")
    n, _, h, w = input.shape
    cout, _, kh, kw = weight.shape
    ho = _out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _out_size(w, kw, stride[1], padding[1], dilation[1])
    return input.new_empty((n, cout, ho, wo))


def _fake_backward(grad_out, input, offset, mask, weight, has_bias, stride, padding, dilation, output_mask):
    # Shapes and dtypes mirror the C++ kernel: unwanted or absent gradients are empty (0,) tensors.
    def grad_or_empty(want: bool, like: Tensor | None, shape=None):
        if want and like is not None:
            return input.new_empty(shape if shape is not None else like.shape)
        return input.new_empty((0,))

    return (
        grad_or_empty(output_mask[0], input),
        grad_or_empty(output_mask[1], offset),
        grad_or_empty(output_mask[2], mask),
        grad_or_empty(output_mask[3], weight),
        grad_or_empty(output_mask[4] and has_bias, weight, (weight.shape[0],)),
    )


_python_side_done = False


def _register_python_side() -> None:
    global _python_side_done, _fwd_op
    if _python_side_done:
        return
    _fwd_op = torch.ops.dyhead.deform_conv2d.default
    torch.library.register_fake("dyhead::deform_conv2d")(_fake_forward)
    torch.library.register_fake("dyhead::deform_conv2d_backward")(_fake_backward)
    _python_side_done = True


def _pair(v) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    a, b = v
    return [int(a), int(b)]


def deform_conv2d(input: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor, bias: Tensor | None = None,
                  stride=1, padding=0, dilation=1) -> Tensor:
    """Modulated deformable conv 2D with torchvision's semantics, run by the native extension (the arguments of
    dyhead.ops.deform_conv2d)."""
    if not _ready and not is_built():
        raise RuntimeError(f"dyhead native DCN extension unavailable ({_status}); run `dyhead build-ext`")
    return _fwd_op(input, offset, mask, weight, bias, _pair(stride), _pair(padding), _pair(dilation))


# The library may already be in this process (loaded by another import path, or torch importing
# this module for the `m.set_python_module` stub): then the Python side is registered right away.
# Never raises and never loads or compiles anything by itself.
try:
    if _ops_present():
        is_built()
except Exception:  # noqa: BLE001
    pass
