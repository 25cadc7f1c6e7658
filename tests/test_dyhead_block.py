"""The DyHead block against its spec (../shared/reference/dyhead_spec.md §A)."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from dyhead.modeling.dyhead import DyHead, DyHeadBlock, DyHeadConfig, DyReLU, high_branch_offsets


def pyramid(channels=32, p3=16, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, channels, p3 >> i, p3 >> i, generator=g) for i in range(5)]


def test_parameter_count_matches_official_checksum():
    model = DyHead(DyHeadConfig(blocks=6, channels=256))
    assert sum(p.numel() for p in model.parameters()) == 11_503_656


@pytest.mark.parametrize("mode", ["resample", "crop", "official"])
def test_block_keeps_p3_to_p7_shapes(mode):
    feats = pyramid(p3=32)  # padded to 256 px: P3 32x32 ... P7 2x2
    out = DyHead(DyHeadConfig(blocks=2, channels=32, high_offsets=mode))(feats)
    assert [o.shape for o in out] == [f.shape for f in feats]


def test_shapes_on_non_square_odd_pyramid():
    # 800x1344 style levels: P6 13x21 -> P7 7x11 (ceil halving).
    sizes = [(25, 42), (13, 21), (7, 11)]
    feats = [torch.randn(1, 16, h, w) for h, w in sizes]
    out = DyHeadBlock(DyHeadConfig(blocks=1, channels=16))(feats)
    assert [tuple(o.shape[-2:]) for o in out] == sizes


@pytest.mark.parametrize("switches", [(False, False, False), (True, False, True), (False, True, False)])
def test_switches_change_structure_not_shapes(switches):
    scale, spatial, task = switches
    block = DyHeadBlock(DyHeadConfig(channels=32, scale=scale, spatial=spatial, task=task))
    assert hasattr(block, "offset") == spatial
    assert hasattr(block, "scale_attn") == scale
    assert (block.task_attn is not None) == task
    feats = pyramid()
    assert [o.shape for o in block(feats)] == [f.shape for f in feats]


def test_dyrelu_starts_as_relu():
    x = torch.randn(4, 32, 8, 8)
    assert torch.equal(DyReLU(32)(x), F.relu(x))


def test_scale_weights_start_at_one_half():
    block = DyHeadBlock(DyHeadConfig(channels=32))
    w = block.scale_weight(torch.randn(8, 32, 8, 8))
    assert w.shape == (8, 1, 1, 1)
    assert torch.all(w >= 0.5) and torch.all(w < 0.55)  # ReLU before the hard sigmoid: never below 0.5


def reference_block(block, feats):
    """ReLU(mean_b 0.5 * GN_b(DCN_b(.))) written out with torchvision's op (spec §G check 1)."""
    outs = []
    for l, x in enumerate(feats):
        om = block.offset(x)
        off, mask = om[:, :18], om[:, 18:].sigmoid()

        def dcn(branch, inp, o, m, stride):
            y = torchvision.ops.deform_conv2d(inp, o, branch.conv.weight, branch.conv.bias, stride=stride, padding=1, mask=m)
            return branch.norm(y)

        branches = [dcn(block.mid, x, off, mask, 1)]
        if l > 0:
            branches.append(dcn(block.low, feats[l - 1], off, mask, 2))
        if l < len(feats) - 1:
            h, w = feats[l + 1].shape[-2:]
            o2 = F.adaptive_avg_pool2d(off, (h, w)) * 0.5
            m2 = F.adaptive_avg_pool2d(mask, (h, w))
            hi = dcn(block.high, feats[l + 1], o2, m2, 1)
            branches.append(F.interpolate(hi, size=x.shape[-2:], mode="bilinear", align_corners=True))
        outs.append(F.relu(torch.stack([0.5 * b for b in branches]).mean(0)))
    return outs


def test_block_at_init_equals_written_out_reference():
    torch.manual_seed(0)
    block = DyHeadBlock(DyHeadConfig(channels=32))
    torch.nn.init.zeros_(block.scale_attn.weight)  # scale weight exactly hsig(0) = 0.5
    feats = pyramid()
    for got, want in zip(block(feats), reference_block(block, feats)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_high_offsets_modes():
    off = torch.arange(2 * 18 * 4 * 4, dtype=torch.float32).view(2, 18, 4, 4)
    mask = torch.rand(2, 9, 4, 4)
    o, m = high_branch_offsets(off, mask, (2, 2), "crop")
    assert torch.equal(o, off[:, :, :2, :2])
    o, m = high_branch_offsets(off, mask, (2, 2), "official")
    # the official kernel reads the first 18*2*2 values of each sample's flat block
    assert torch.equal(o[1].flatten(), off[1].flatten()[: 18 * 4])
    o, m = high_branch_offsets(off, mask, (2, 2), "resample")
    assert torch.allclose(o[0, 0, 0, 0], off[0, 0, :2, :2].mean() * 0.5)
    assert m.shape == (2, 9, 2, 2)
    with pytest.raises(ValueError, match="high_offsets"):
        high_branch_offsets(off, mask, (2, 2), "bogus")


def test_block_is_differentiable_end_to_end():
    block = DyHeadBlock(DyHeadConfig(channels=16, gn_groups=8))
    feats = [f.requires_grad_() for f in pyramid(channels=16, p3=16)]
    sum(o.square().sum() for o in block(feats)).backward()
    assert all(p.grad is not None for p in block.parameters() if p.requires_grad)
    assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in feats)
