"""The native DCNv2 extension (dyhead/csrc, dyhead.ops.native / build) against torchvision's op.

The extension is built once per session by the module fixture (`build_extension` into the default
build dir, or $DYHEAD_EXT_DIR; incremental, so seconds when up to date and a minute or two from
scratch). `-m slow` adds the CUDA compile+link check; the GPU tests run only with a CUDA device.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from dyhead.errors import DyheadError
from dyhead.ops import build, native
from dyhead.ops.deform_conv import deform_conv2d, resolve_backend

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ext():
    if not native.is_built():
        build.build_extension(cuda="auto" if torch.cuda.is_available() else "off")
    assert native.is_built(), native.status()
    return native


# ---- helpers ---------------------------------------------------------------------------------------


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_case(
    seed: int,
    n=2,
    c=8,
    h=9,
    w=7,
    cout=6,
    k=(3, 3),
    stride=1,
    pad=1,
    dil=1,
    groups=1,
    offset_groups=1,
    mask=True,
    bias=True,
    offset_scale=2.0,
    offset_shift=0.0,
    dtype=torch.float64,
    device="cpu",
):
    g = torch.Generator().manual_seed(seed)
    kh, kw = _pair(k)
    sh, sw = _pair(stride)
    ph, pw = _pair(pad)
    dh, dw = _pair(dil)
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    kk = kh * kw

    def t(*shape, fn=torch.randn):
        return fn(*shape, generator=g, dtype=torch.float64)

    tensors = {
        "input": t(n, c, h, w),
        "offset": t(n, 2 * offset_groups * kk, ho, wo) * offset_scale + offset_shift,
        "mask": t(n, offset_groups * kk, ho, wo, fn=torch.rand) if mask else None,
        "weight": t(cout, c // groups, kh, kw) / math.sqrt(c // groups * kk),
        "bias": t(cout) if bias else None,
    }
    tensors = {
        key: (v.to(device=device, dtype=dtype).requires_grad_() if v is not None else None) for key, v in tensors.items()
    }
    grad = t(n, cout, ho, wo).to(device=device, dtype=dtype)
    conv = dict(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw))
    return tensors, grad, conv


def run(backend: str, tensors: dict, grad: torch.Tensor, conv: dict):
    """Output and the gradients of all (present) inputs, for one backend."""
    x, off, m, w, b = (tensors[k] for k in ("input", "offset", "mask", "weight", "bias"))
    if backend == "native":
        y = native.deform_conv2d(x, off, m, w, b, conv["stride"], conv["padding"], conv["dilation"])
    else:
        y = torchvision.ops.deform_conv2d(x, off, w, b, mask=m, **conv)
    leaves = [v for v in (x, off, m, w, b) if v is not None]
    grads = torch.autograd.grad(y, leaves, grad)
    names = [k for k in ("input", "offset", "mask", "weight", "bias") if tensors[k] is not None]
    return y.detach(), dict(zip(names, grads))


def assert_matches(tensors, grad, conv, rtol, atol):
    y_n, g_n = run("native", tensors, grad, conv)
    y_t, g_t = run("torchvision", tensors, grad, conv)
    assert y_n.shape == y_t.shape and y_n.dtype == y_t.dtype
    torch.testing.assert_close(y_n, y_t, rtol=rtol, atol=atol, msg=lambda m: f"output: {m}")
    assert g_n.keys() == g_t.keys()
    for key in g_n:
        torch.testing.assert_close(g_n[key], g_t[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"grad {key}: {m}")


NAMED_CASES = {
    "default": {},
    "stride2": dict(stride=2),
    "stride_hw": dict(stride=(2, 1), h=10, w=9),
    "pad0": dict(pad=0),
    "pad2_dil2": dict(pad=2, dil=2),
    "dil_hw": dict(dil=(1, 2), pad=(1, 2)),
    "kernel_1x1": dict(k=1, pad=0),
    "kernel_2x3": dict(k=(2, 3), pad=(1, 1), h=8),
    "kernel_5x5": dict(k=5, pad=2, c=4, cout=4),
    "groups2": dict(groups=2),
    "offset_groups2": dict(offset_groups=2),
    "offset_groups4_groups2": dict(offset_groups=4, groups=2),
    "groups_cross_offset_groups": dict(c=12, cout=6, groups=3, offset_groups=2),
    "depthwise": dict(c=8, cout=8, groups=8, offset_groups=8),
    "no_mask": dict(mask=False),
    "no_bias": dict(bias=False),
    "no_mask_no_bias": dict(mask=False, bias=False),
    "large_offsets": dict(offset_scale=25.0),
    "far_outside": dict(offset_scale=0.1, offset_shift=100.0),
    "edges": dict(offset_scale=0.7, offset_shift=-1.3),
    "batch1": dict(n=1),
    "batch7_chunks": dict(n=7, c=4, cout=4, h=12, w=12),
    "wide_channels": dict(n=1, c=64, cout=16, h=6, w=5),
    "tiny_1x1_input": dict(h=1, w=1),
    "no_padding_small": dict(h=3, w=3, pad=0),
}


@pytest.mark.parametrize("name", sorted(NAMED_CASES))
def test_matches_torchvision_fp64(ext, name):
    """Same semantics exactly: fp64 agreement to rounding, for every feature of the op."""
    tensors, grad, conv = make_case(0, **NAMED_CASES[name])
    assert_matches(tensors, grad, conv, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["default", "stride2", "groups2", "offset_groups2", "no_mask", "edges", "batch7_chunks"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_torchvision_fp32(ext, name, seed):
    tensors, grad, conv = make_case(seed, dtype=torch.float32, **NAMED_CASES[name])
    assert_matches(tensors, grad, conv, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("seed", range(12))
def test_matches_torchvision_random_shapes(ext, seed):
    r = torch.Generator().manual_seed(1000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=r))]

    groups = pick([1, 1, 2])
    offset_groups = pick([1, 1, 2, 4])
    c = pick([4, 8, 16]) * groups * offset_groups // math.gcd(groups, offset_groups)
    k = pick([(3, 3), (3, 3), (1, 1), (2, 3), (3, 1)])
    cfg = dict(
        n=pick([1, 2, 3, 5]),
        c=c,
        cout=pick([2, 4, 8]) * groups,
        h=pick([1, 3, 5, 8, 13]),
        w=pick([2, 4, 7, 11]),
        k=k,
        stride=(pick([1, 2]), pick([1, 2])),
        pad=(pick([0, 1, 2]), pick([0, 1, 2])),
        dil=(pick([1, 2]), pick([1, 2])),
        groups=groups,
        offset_groups=offset_groups,
        mask=pick([True, True, False]),
        bias=pick([True, False]),
        offset_scale=pick([0.5, 2.0, 6.0]),
    )
    kh, kw = cfg["k"]
    if cfg["h"] + 2 * cfg["pad"][0] < cfg["dil"][0] * (kh - 1) + 1 or cfg["w"] + 2 * cfg["pad"][1] < cfg["dil"][1] * (kw - 1) + 1:
        cfg["pad"] = (kh * cfg["dil"][0], kw * cfg["dil"][1])  # keep the output non-empty
    tensors, grad, conv = make_case(seed, dtype=torch.float32, **cfg)
    assert_matches(tensors, grad, conv, rtol=1e-4, atol=2e-4)


def test_zero_offsets_equal_conv2d(ext):
    """With zero offsets and unit mask, DCN is a plain convolution (forward and all gradients)."""
    tensors, grad, conv = make_case(5, n=3, c=8, h=11, w=10, stride=2, pad=1, offset_scale=0.0)
    tensors["mask"] = torch.ones_like(tensors["mask"]).requires_grad_()
    x, w, b = tensors["input"], tensors["weight"], tensors["bias"]
    y_n, g_n = run("native", tensors, grad, conv)
    y_c = F.conv2d(x, w, b, **conv)
    gx, gw, gb = torch.autograd.grad(y_c, (x, w, b), grad)
    torch.testing.assert_close(y_n, y_c.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_n["input"], gx)
    torch.testing.assert_close(g_n["weight"], gw)
    torch.testing.assert_close(g_n["bias"], gb)
    # and the offset/mask gradients (one-sided at the padding border, as torchvision) agree too
    _, g_t = run("torchvision", tensors, grad, conv)
    torch.testing.assert_close(g_n["offset"], g_t["offset"])
    torch.testing.assert_close(g_n["mask"], g_t["mask"])


def test_mask_none_is_dcnv1(ext):
    """mask=None behaves as a mask of ones, and every other gradient is the same."""
    tensors, grad, conv = make_case(3, mask=False)
    _, g_none = run("native", tensors, grad, conv)
    off = tensors["offset"]
    ones = torch.ones(off.shape[0], off.shape[1] // 2, *off.shape[2:], dtype=off.dtype, requires_grad=True)
    y_ones, g_ones = run("native", {**tensors, "mask": ones}, grad, conv)
    y_none, _ = run("native", tensors, grad, conv)
    torch.testing.assert_close(y_none, y_ones)
    assert set(g_none) == {"input", "offset", "weight", "bias"}
    for key in g_none:
        torch.testing.assert_close(g_none[key], g_ones[key])


def test_gradcheck_fp64(ext):
    tensors, _, conv = make_case(11, n=2, c=4, h=5, w=6, cout=3, stride=(1, 2), offset_scale=1.5)
    args = [tensors[k] for k in ("input", "offset", "mask", "weight", "bias")]
    fn = lambda x, o, m, w, b: native.deform_conv2d(x, o, m, w, b, **conv)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


def test_gradcheck_fp64_groups_no_mask(ext):
    tensors, _, conv = make_case(12, n=1, c=4, h=4, w=5, cout=4, groups=2, offset_groups=2, mask=False, bias=False)
    args = [tensors[k] for k in ("input", "offset", "weight")]
    fn = lambda x, o, w: native.deform_conv2d(x, o, None, w, None, **conv)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


def test_partial_gradients(ext):
    """Only the requested gradients are computed, and they equal the full computation's."""
    tensors, grad, conv = make_case(4)
    _, full = run("native", tensors, grad, conv)
    x = tensors["input"].detach()
    off = tensors["offset"].detach().requires_grad_()
    w = tensors["weight"].detach()
    y = native.deform_conv2d(x, off, tensors["mask"].detach(), w, tensors["bias"].detach(), **conv)
    (g_off,) = torch.autograd.grad(y, (off,), grad)
    torch.testing.assert_close(g_off, full["offset"])


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "no_mask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_every_subset_of_gradients(ext, mask, bias):
    """The C++ autograd node maps each wanted gradient to its input whichever optional inputs are absent
    (absent tensors have no edge, so the indices shift): every subset of inputs that require grad."""
    tensors, grad, conv = make_case(5, mask=mask, bias=bias)
    names = [k for k in ("input", "offset", "mask", "weight", "bias") if tensors[k] is not None]
    for wanted in range(1, 2 ** len(names)):
        grads = {}
        for backend in ("native", "torchvision"):
            t = {k: (v.detach().requires_grad_(bool(wanted >> names.index(k) & 1)) if k in names else None)
                 for k, v in tensors.items()}
            y = deform_conv2d(t["input"], t["offset"], t["mask"], t["weight"], t["bias"], backend=backend, **conv)
            y.backward(grad)
            grads[backend] = {k: t[k].grad for k in names}
        for k in names:
            if wanted >> names.index(k) & 1:
                torch.testing.assert_close(grads["native"][k], grads["torchvision"][k], rtol=1e-9, atol=1e-9)
            else:
                assert grads["native"][k] is None

def test_cpu_isa_variants_agree(ext, monkeypatch):
    """The baseline, AVX2 and AVX-512 builds of the CPU kernels give the same results."""
    tensors, grad, conv = make_case(8, n=3, c=24, cout=8, h=10, w=9, groups=2, offset_groups=3, dtype=torch.float32)
    results = {}
    for isa in ("default", "avx2", "avx512"):
        monkeypatch.setenv("DYHEAD_DCN_CPU_ISA", isa)
        results[isa] = run("native", tensors, grad, conv)
    for isa in ("avx2", "avx512"):
        torch.testing.assert_close(results[isa][0], results["default"][0], rtol=1e-5, atol=1e-5)
        for key in results[isa][1]:
            torch.testing.assert_close(results[isa][1][key], results["default"][1][key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget_kb", [1, 8, 64])
def test_small_column_budget_pixel_blocks(ext, budget_kb):
    """Columns bounded by DYHEAD_DCN_COLUMN_KB (read once per process, hence a subprocess): images
    and output pixels are then processed in blocks, with channel splits on 2 threads; same result."""
    proc = _python(
        """
        import torch, torchvision
        from dyhead.ops import native
        assert native.is_built(), native.status()
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        for (n, c, h, w, stride, groups, og, with_mask) in [(1, 16, 13, 11, 1, 1, 1, True), (3, 8, 9, 10, 2, 2, 2, True),
                                                           (2, 12, 7, 7, 1, 3, 1, False)]:
            ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
            x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
            off = (torch.randn(n, 18 * og, ho, wo, generator=g, dtype=torch.float64) * 2).requires_grad_()
            m = torch.rand(n, 9 * og, ho, wo, generator=g, dtype=torch.float64, requires_grad=True) if with_mask else None
            wt = torch.randn(6, c // groups, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
            b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
            gy = torch.randn(n, 6, ho, wo, generator=g, dtype=torch.float64)
            leaves = [t for t in (x, off, m, wt, b) if t is not None]
            y1 = native.deform_conv2d(x, off, m, wt, b, stride, 1, 1)
            g1 = torch.autograd.grad(y1, leaves, gy)
            y2 = torchvision.ops.deform_conv2d(x, off, wt, b, stride=stride, padding=1, mask=m)
            g2 = torch.autograd.grad(y2, leaves, gy)
            torch.testing.assert_close(y1, y2, rtol=1e-9, atol=1e-9)
            for a, r in zip(g1, g2):
                torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)
        print("OK")
        """,
        DYHEAD_DCN_COLUMN_KB=str(budget_kb),
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_threads_deterministic(ext):
    """Same result run to run (no atomics on CPU); thread counts differ only by summation order."""
    tensors, grad, conv = make_case(9, n=1, c=32, cout=8, h=12, w=12, dtype=torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = run("native", tensors, grad, conv)
        b = run("native", tensors, grad, conv)
        torch.set_num_threads(1)
        c = run("native", tensors, grad, conv)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    for k in a[1]:
        torch.testing.assert_close(a[1][k], c[1][k], rtol=1e-5, atol=1e-5)


def test_fake_tensor_and_meta(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 13, 11)
        off = torch.empty(2, 2 * 2 * 9, 7, 6)
        m = torch.empty(2, 2 * 9, 7, 6)
        w = torch.empty(16, 4, 3, 3)
        y = native.deform_conv2d(x, off, m, w, torch.empty(16), 2, 1, 1)
        assert tuple(y.shape) == (2, 16, 7, 6) and y.dtype == torch.float32
        grads = torch.ops.dyhead.deform_conv2d_backward(
            torch.empty(2, 16, 7, 6), x, off, m, w, True, [2, 2], [1, 1], [1, 1], [True] * 5
        )
        assert [tuple(g.shape) for g in grads] == [tuple(x.shape), tuple(off.shape), tuple(m.shape), tuple(w.shape), (16,)]
    meta = dict(device="meta")
    y = torch.ops.dyhead.deform_conv2d(
        torch.empty(1, 4, 8, 8, **meta), torch.empty(1, 18, 8, 8, **meta), None, torch.empty(5, 4, 3, 3, **meta), None,
        [1, 1], [1, 1], [1, 1],
    )
    assert y.device.type == "meta" and tuple(y.shape) == (1, 5, 8, 8)


def test_opcheck(ext):
    tensors, _, conv = make_case(13, dtype=torch.float32)
    args = [tensors[k] for k in ("input", "offset", "mask", "weight", "bias")]
    args += [list(conv["stride"]), list(conv["padding"]), list(conv["dilation"])]
    result = torch.library.opcheck(torch.ops.dyhead.deform_conv2d.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


class _TinyDcn(torch.nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.offset = torch.nn.Conv2d(c, 27, 3, padding=1)
        self.weight = torch.nn.Parameter(torch.randn(c, c, 3, 3) * 0.2)
        self.bias = torch.nn.Parameter(torch.zeros(c))

    def forward(self, x):
        o = self.offset(x)
        return deform_conv2d(x, o[:, :18], o[:, 18:].sigmoid(), self.weight, self.bias, 1, 1, 1, backend="native")


def test_torch_compile_fullgraph(ext):
    torch._dynamo.reset()
    torch.manual_seed(0)
    mod = _TinyDcn()
    x = torch.randn(2, 4, 6, 6)
    compiled = torch.compile(mod, fullgraph=True)
    out_c = compiled(x)
    out_c.square().sum().backward()
    grads_c = [p.grad.clone() for p in mod.parameters()]
    mod.zero_grad()
    out_e = mod(x)
    out_e.square().sum().backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for gc, ge in zip(grads_c, (p.grad for p in mod.parameters())):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_cpu_autocast_bf16(ext):
    """Under CPU autocast the op runs in float32 (documented choice) and gradients flow back to bf16."""
    tensors, grad, conv = make_case(14, dtype=torch.float32)
    x = tensors["input"].detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = native.deform_conv2d(x, tensors["offset"], tensors["mask"], tensors["weight"], tensors["bias"], **conv)
    assert y.dtype == torch.float32
    y.backward(grad)
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    ref = torchvision.ops.deform_conv2d(
        x.detach().float(), tensors["offset"], tensors["weight"], tensors["bias"], mask=tensors["mask"], **conv
    )
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=2e-4)


def test_half_inputs_on_cpu_upcast(ext):
    tensors, grad, conv = make_case(15, dtype=torch.float32)
    args = {k: (v.detach().bfloat16() if v is not None else None) for k, v in tensors.items()}
    y = native.deform_conv2d(args["input"], args["offset"], args["mask"], args["weight"], args["bias"], **conv)
    assert y.dtype == torch.bfloat16
    ref = run("torchvision", tensors, grad, conv)[0]
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


def test_empty_batch(ext):
    y = native.deform_conv2d(
        torch.empty(0, 4, 5, 5), torch.empty(0, 18, 5, 5), torch.empty(0, 9, 5, 5), torch.randn(3, 4, 3, 3), None, 1, 1, 1
    )
    assert tuple(y.shape) == (0, 3, 5, 5)


def test_bad_shapes_raise(ext):
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(RuntimeError, match="offset"):
        native.deform_conv2d(x, torch.randn(1, 17, 5, 5), None, torch.randn(3, 4, 3, 3), None, 1, 1, 1)
    with pytest.raises(RuntimeError, match="mask"):
        native.deform_conv2d(x, torch.randn(1, 18, 5, 5), torch.rand(1, 8, 5, 5), torch.randn(3, 4, 3, 3), None, 1, 1, 1)
    with pytest.raises(RuntimeError, match="dtype"):
        native.deform_conv2d(x, torch.randn(1, 18, 5, 5).double(), None, torch.randn(3, 4, 3, 3), None, 1, 1, 1)


def test_resolve_backend_auto_picks_native(ext):
    assert resolve_backend("auto") == "native"
    assert resolve_backend("native") == "native"
    assert resolve_backend("torchvision") == "torchvision"
    tensors, grad, conv = make_case(16, dtype=torch.float32)
    x, off, m, w, b = (tensors[k] for k in ("input", "offset", "mask", "weight", "bias"))
    y_n = deform_conv2d(x, off, m, w, b, conv["stride"], conv["padding"], conv["dilation"], backend="native")
    y_t = deform_conv2d(x, off, m, w, b, conv["stride"], conv["padding"], conv["dilation"], backend="torchvision")
    torch.testing.assert_close(y_n, y_t, rtol=1e-4, atol=2e-4)


def test_manifest(ext):
    man = native.manifest()
    assert man is not None
    assert man["source_hash"] == native.source_hash()
    assert man["torch_version"] == torch.__version__
    assert (native.default_ext_dir() / man["library"]).is_file()
    on_disk = json.loads((native.default_ext_dir() / "manifest.json").read_text())
    assert {"library", "cuda", "arch_list", "torch_version", "source_hash"} <= on_disk.keys()


# ---- no extension / no compiler: the package keeps working ---------------------------------------------


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
        timeout=300,
    )


def test_import_without_library_is_safe(tmp_path):
    """No manifest: importing is silent, is_built() is False, auto falls back to torchvision."""
    proc = _python(
        """
        import torch
        from dyhead.ops import native, deform_conv
        assert not hasattr(torch.ops.dyhead, "deform_conv2d")
        assert native.is_built() is False
        assert "no build manifest" in native.status(), native.status()
        assert deform_conv.resolve_backend("auto") == "torchvision"
        try:
            deform_conv.resolve_backend("native")
        except RuntimeError as e:
            assert "build-ext" in str(e)
        else:
            raise AssertionError("native resolved without a library")
        print("OK")
        """,
        DYHEAD_EXT_DIR=str(tmp_path),
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_stale_manifest_is_not_used(ext, tmp_path):
    """A library built from other sources (hash mismatch) is never loaded."""
    man = dict(native.manifest())
    lib = native.default_ext_dir() / man["library"]
    (tmp_path / man["library"]).write_bytes(lib.read_bytes())
    man["source_hash"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    proc = _python(
        """
        from dyhead.ops import native
        assert native.is_built() is False
        print(native.status())
        """,
        DYHEAD_EXT_DIR=str(tmp_path),
    )
    assert proc.returncode == 0 and "changed since" in proc.stdout, proc.stdout + proc.stderr


def test_build_without_compiler_is_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(build, "find_cxx", lambda: None)
    with pytest.raises(DyheadError, match="no C\\+\\+ compiler") as err:
        build.build_extension(tmp_path)
    assert "\n" not in str(err.value)
    assert build.main(["--build-dir", str(tmp_path)]) == 2
    err_out = capsys.readouterr().err.strip()
    assert err_out.startswith("dyhead: error:") and len(err_out.splitlines()) == 1
    assert not (tmp_path / "manifest.json").exists()


def test_build_cuda_on_without_nvcc_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(DyheadError, match="--cuda on") as err:
        build.build_extension(tmp_path, cuda="on")
    assert "\n" not in str(err.value)


def test_arch_list_keeps_arch_specific_variants(monkeypatch):
    """9.0a (what an H100/H200 image may preset) is sm_90 to nvcc's list; 7.0 is dropped by CUDA 13."""
    monkeypatch.setattr(build, "nvcc_archs", lambda nvcc: {"7.5", "8.0", "9.0", "10.0"})
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0;9.0a;10.0f+PTX")
    assert build.resolve_arch_list("nvcc") == ("9.0a;10.0f+PTX", ["7.0"])
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "6.1")
    with pytest.raises(DyheadError, match="none of the CUDA architectures 6.1"):
        build.resolve_arch_list("nvcc")


def test_build_cli_help(capsys):
    with pytest.raises(SystemExit) as ex:
        build.main(["--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert "--build-dir" in out and "--cuda" in out and "TORCH_CUDA_ARCH_LIST" in out


def test_failed_build_keeps_previous_manifest(monkeypatch, tmp_path):
    """A compile failure raises a one-line DyheadError and never touches an existing manifest."""
    (tmp_path / "manifest.json").write_text('{"marker": 1}')
    monkeypatch.setattr(build, "_WORKER", "import sys; print('x.cpp:1:1: error: forced failure'); sys.exit(1)")
    with pytest.raises(DyheadError, match="forced failure") as err:
        build.build_extension(tmp_path, cuda="off")
    assert "\n" not in str(err.value)
    assert (tmp_path / "work-cpu" / "build.log").is_file()
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"marker": 1}


# ---- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cuda_sources_compile_and_link(tmp_path):
    """nvcc compiles the CUDA kernels and the library links and loads (run in the build's child)."""
    if build.find_nvcc() is None or torch.version.cuda is None:
        pytest.skip("needs nvcc (CUDA_HOME) and a CUDA build of torch to compile the CUDA kernels")
    lib = build.build_extension(tmp_path / "ext", cuda="on")
    man = json.loads((tmp_path / "ext" / "manifest.json").read_text())
    assert lib.is_file() and man["cuda"] is True and man["arch_list"]
    assert "cuda/deform_conv_cuda.cu" in man["sources"]
    assert man["source_hash"] == native.source_hash()


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (CPU-only CI and dev machines)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", sorted(NAMED_CASES))
def test_cuda_fp32_matches_torchvision(ext, name):
    if not native.cuda_compiled():
        pytest.skip("a GPU is present but the extension was built without its CUDA kernels (no nvcc at build time)")
    tensors, grad, conv = make_case(21, dtype=torch.float32, device="cuda", **NAMED_CASES[name])
    assert_matches(tensors, grad, conv, rtol=1e-4, atol=2e-4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", sorted(NAMED_CASES))
def test_cuda_fp64_matches_torchvision(ext, name):
    """Every feature of the op, including channel counts that give each vector width of the kernels."""
    if not native.cuda_compiled():
        pytest.skip("a GPU is present but the extension was built without its CUDA kernels (no nvcc at build time)")
    tensors, grad, conv = make_case(22, device="cuda", **NAMED_CASES[name])
    assert_matches(tensors, grad, conv, rtol=1e-9, atol=1e-9)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("c", [16, 6])  # 8 channels per 16-byte access, and one at a time
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_matches_fp32_reference(ext, dtype, c):
    if not native.cuda_compiled():
        pytest.skip("a GPU is present but the extension was built without its CUDA kernels (no nvcc at build time)")
    tensors, grad, conv = make_case(23, n=2, c=c, cout=16, h=12, w=10, dtype=torch.float32, device="cuda")
    low = {k: (v.detach().to(dtype).requires_grad_() if v is not None else None) for k, v in tensors.items()}
    # The fp32 reference reads the same rounded values: the offset gradient jumps where a sample crosses a
    # pixel edge, so rounding the offsets alone moves a few of its elements by up to 28% of its largest
    # (torchvision in fp64 on rounded vs unrounded inputs, seed 23: 2 elements for fp16, 4 for bf16).
    ref = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in low.items()}
    y_ref, g_ref = run("torchvision", ref, grad.to(dtype).float(), conv)
    y, g = run("native", low, grad.to(dtype), conv)
    assert y.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(y.float(), y_ref, rtol=tol, atol=tol)
    for key in g:
        scale = g_ref[key].abs().max().clamp_min(1.0)
        torch.testing.assert_close(g[key].float() / scale, g_ref[key] / scale, rtol=tol, atol=tol)


@pytest.mark.gpu
@needs_gpu
def test_cuda_autocast_runs_in_autocast_dtype(ext):
    if not native.cuda_compiled():
        pytest.skip("a GPU is present but the extension was built without its CUDA kernels (no nvcc at build time)")
    tensors, grad, conv = make_case(24, dtype=torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = native.deform_conv2d(*(tensors[k] for k in ("input", "offset", "mask", "weight", "bias")), **conv)
    assert y.dtype == torch.bfloat16
    y.float().backward(grad)
    assert tensors["input"].grad.dtype == torch.float32


@pytest.mark.gpu
@needs_gpu
def test_cuda_matches_cpu(ext):
    if not native.cuda_compiled():
        pytest.skip("a GPU is present but the extension was built without its CUDA kernels (no nvcc at build time)")
    tensors, grad, conv = make_case(25, n=3, c=32, cout=16, h=17, w=15, stride=2, dtype=torch.float32)
    y_cpu, g_cpu = run("native", tensors, grad, conv)
    cuda = {k: (v.detach().cuda().requires_grad_() if v is not None else None) for k, v in tensors.items()}
    y_gpu, g_gpu = run("native", cuda, grad.cuda(), conv)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=2e-4)
    for key in g_cpu:
        torch.testing.assert_close(g_gpu[key].cpu(), g_cpu[key], rtol=1e-4, atol=2e-4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backward_deterministic(ext, dtype):
    """grad_x is a gather (no atomics): two runs give bit-identical gradients, even where many samples
    share a cell (offsets pulled towards one corner)."""
    if not native.cuda_compiled():
        pytest.skip("a GPU is present but the extension was built without its CUDA kernels (no nvcc at build time)")
    tensors, grad, conv = make_case(26, n=2, c=32, cout=16, h=12, w=12, offset_scale=0.5, offset_shift=-2.0,
                                    dtype=torch.float32, device="cuda")
    tensors = {k: (v.detach().to(dtype).requires_grad_() if v is not None else None) for k, v in tensors.items()}
    y1, g1 = run("native", tensors, grad.to(dtype), conv)
    y2, g2 = run("native", tensors, grad.to(dtype), conv)
    assert torch.equal(y1, y2)
    for key in g1:
        assert torch.equal(g1[key], g2[key]), key


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("grad_input,budget_kb", [("gather", 1), ("gather", 64), ("atomic", 1), ("atomic", 0)])
def test_cuda_pixel_blocks_and_grad_input_modes(ext, grad_input, budget_kb):
    """The CUDA paths a default run does not take: output pixels in blocks (grad_x accumulated in fp32
    over them) and images in chunks (DYHEAD_DCN_COLUMN_KB), and grad_x by the atomic scatter
    (DYHEAD_DCN_CUDA_GRAD_INPUT=atomic); both read once per process, hence a subprocess."""
    if not native.cuda_compiled():
        pytest.skip("a GPU is present but the extension was built without its CUDA kernels (no nvcc at build time)")
    proc = _python(
        """
        import torch, torchvision
        from dyhead.ops import native
        assert native.is_built(), native.status()
        g = torch.Generator().manual_seed(0)
        for (n, c, h, w, stride, groups, og, with_mask) in [(1, 16, 13, 11, 1, 1, 1, True), (3, 8, 9, 10, 2, 2, 2, True),
                                                           (2, 12, 7, 7, 1, 3, 1, False), (5, 32, 6, 9, 1, 1, 2, True)]:
            ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
            def t(*shape, fn=torch.randn, scale=1.0):
                return (fn(*shape, generator=g, dtype=torch.float64) * scale).cuda().requires_grad_()
            x = t(n, c, h, w)
            off = t(n, 18 * og, ho, wo, scale=2.0)
            m = t(n, 9 * og, ho, wo, fn=torch.rand) if with_mask else None
            wt = t(6, c // groups, 3, 3)
            b = t(6)
            gy = torch.randn(n, 6, ho, wo, generator=g, dtype=torch.float64).cuda()
            leaves = [v for v in (x, off, m, wt, b) if v is not None]
            y1 = native.deform_conv2d(x, off, m, wt, b, stride, 1, 1)
            g1 = torch.autograd.grad(y1, leaves, gy)
            y2 = torchvision.ops.deform_conv2d(x, off, wt, b, stride=stride, padding=1, mask=m)
            g2 = torch.autograd.grad(y2, leaves, gy)
            torch.testing.assert_close(y1, y2, rtol=1e-9, atol=1e-9)
            for a, r in zip(g1, g2):
                torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)
        print("OK")
        """,
        DYHEAD_DCN_COLUMN_KB=str(budget_kb),
        DYHEAD_DCN_CUDA_GRAD_INPUT=grad_input,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
