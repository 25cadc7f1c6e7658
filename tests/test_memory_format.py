"""runtime.memory_format: channels_last — the same detector in NHWC: same losses and gradients up to rounding,
checkpoints that load across layouts, and its own settings digest.

Compared in float64: in float32 a tiny model's backbone gradients (BatchNorm over two 64-px images) amplify
the different summation order of NHWC kernels to several percent, in either layout against a rerun with
another thread count, which would hide a real layout bug behind a loose tolerance."""
from dataclasses import replace

import pytest
import torch

from dyhead.config import resolve
from dyhead.modeling.build import build_detector
from dyhead.ops import native


def with_runtime(run, **settings):
    return replace(run, profile={**run.profile, "runtime": {**run.profile["runtime"], **settings}})


def batch():
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 2.0, 60.0, 20.0]]),
                "labels": torch.tensor([1, 2])}] * 2
    return images, targets


@pytest.mark.parametrize("backend", ["torchvision", "native"])
def test_channels_last_trains_the_same_detector(backend):
    if backend == "native" and not native.is_built():
        pytest.skip("native extension not built (`dyhead build-ext`)")
    base = resolve("atss-r50-dyh2-LSC-1x", "tiny")
    nhwc_run = with_runtime(base, memory_format="channels_last")
    models = []
    for run in (base, nhwc_run):
        torch.manual_seed(0)
        models.append(build_detector(run, 3, backend, load_weights=False).double().train())
    plain, nhwc = models
    convs = [p for p in nhwc.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    images, targets = batch()
    losses = []
    for model in models:
        out = model(images, targets)
        sum(out.values()).backward()
        losses.append({k: v.item() for k, v in out.items()})
    for k in losses[0]:
        assert losses[1][k] == pytest.approx(losses[0][k], rel=1e-10), k
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in models]
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-7, atol=1e-12, msg=name)
    # a checkpoint of either layout loads into the other and predicts the same boxes
    plain.load_state_dict(nhwc.state_dict())
    for m in models:  # an untrained classifier scores ~0.01: keep every candidate
        m.cfg = replace(m.cfg, score_thresh=0.0)
        m.eval()
    with torch.no_grad():
        a, b = plain(images), nhwc(images)
    assert all(len(x["scores"]) > 0 for x in a)
    for x, y in zip(a, b):
        torch.testing.assert_close(x["scores"], y["scores"], rtol=1e-9, atol=1e-12)


def test_memory_format_has_its_own_digest_and_contiguous_keeps_the_old_one():
    base = resolve("atss-r50-base-1x", "tiny")
    assert "memory_format" not in base.profile["runtime"]
    assert with_runtime(base, memory_format="contiguous").digest == base.digest
    assert with_runtime(base, memory_format="channels_last").digest != base.digest
