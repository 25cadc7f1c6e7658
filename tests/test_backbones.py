"""The paper's backbones: torchvision-identical ResNet/ResNeXt bodies, ImageNet weights by name, the DCN variant."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from dyhead.config import resolve
from dyhead.errors import DyheadError
from dyhead.modeling.backbone import BackboneConfig, DeformConv3x3, ResNet, load_backbone_weights
from dyhead.modeling.build import build_detector
from dyhead.modeling.pretrained import weights_path

TORCHVISION = {"r50": torchvision.models.resnet50, "r101": torchvision.models.resnet101,
               "x101": torchvision.models.resnext101_64x4d}


def body_state(model: torch.nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


@pytest.mark.parametrize("arch", ["r50", "r101", "x101"])
def test_parameter_counts_equal_torchvisions(arch):
    tv = TORCHVISION[arch](weights=None)
    ours = ResNet(BackboneConfig(name=arch, norm="bn", freeze_at=0))
    n_tv = sum(p.numel() for name, p in tv.named_parameters() if not name.startswith("fc."))
    assert sum(p.numel() for p in ours.parameters()) == n_tv
    # frozen BN keeps the same names and shapes, as buffers (no num_batches_tracked)
    frozen = ResNet(BackboneConfig(name=arch, norm="frozen_bn"))
    expected = {k: v.shape for k, v in body_state(tv).items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in frozen.state_dict().items()} == expected


def test_imagenet_file_loads_by_its_name(tmp_path):
    state = torchvision.models.resnet50(weights=None).state_dict()  # what download.pytorch.org serves, fc included
    path = weights_path("r50", tmp_path)
    assert path.name == "resnet50-0676ba61.pth"
    torch.save(state, path)
    model = ResNet(BackboneConfig(name="r50", norm="frozen_bn", freeze_at=2))
    load_backbone_weights(model, str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not model.conv1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    assert model.layer2[0].conv1.weight.requires_grad


def test_build_detector_loads_the_profiles_weights(tmp_path, repo_copy):
    """The coco profile names data/weights/<torchvision file>; the builder loads it into the body."""
    run = resolve("atss-r50-dyh6-LSC-1x", "coco")
    state = torchvision.models.resnet50(weights=None).state_dict()
    path = repo_copy / run.backbone["weights"]
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    model = build_detector(run, num_classes=80, dcn_backend="torchvision")
    assert torch.equal(model.backbone.body.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])
    path.unlink()
    with pytest.raises(DyheadError, match="file not found.*fetch-weights"):
        build_detector(run, num_classes=80, dcn_backend="torchvision")


def test_wrong_shaped_file_is_refused(tmp_path):
    narrow = ResNet(BackboneConfig(name="r50", depths=(1, 1, 1, 1), base_width=16, norm="bn", freeze_at=0))
    path = tmp_path / "narrow.pth"
    torch.save(narrow.state_dict(), path)
    wide = ResNet(BackboneConfig(name="r50", depths=(1, 1, 1, 1), base_width=32, norm="bn", freeze_at=0))
    with pytest.raises(DyheadError, match=r"narrow\.pth: conv1\.weight has shape \(16, 3, 7, 7\), model expects "
                                          r"\(32, 3, 7, 7\)"):
        load_backbone_weights(wide, str(path))
    deeper = ResNet(BackboneConfig(name="r101", depths=(1, 1, 2, 1), base_width=16, norm="bn", freeze_at=0))
    with pytest.raises(DyheadError, match=r"missing \d+ tensors, e\.g\. layer3\.1\."):
        load_backbone_weights(deeper, str(path))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DyheadError, match=r"cannot read .*junk\.pth"):
        load_backbone_weights(wide, str(tmp_path / "junk.pth"))


def test_dcn_variant_loads_plain_resnet_weights(tmp_path):
    plain_cfg = BackboneConfig(name="x101", depths=(1, 1, 2, 1), base_width=16, groups=8, width_per_group=16,
                               norm="frozen_bn", freeze_at=1)
    plain = ResNet(plain_cfg)
    path = tmp_path / "x101.pth"
    torch.save(plain.state_dict(), path)
    dcn = ResNet(BackboneConfig(**{**plain_cfg.__dict__, "dcn_stages": (3, 4, 5)}))
    load_backbone_weights(dcn, str(path))
    deform = [m for m in dcn.modules() if isinstance(m, DeformConv3x3)]
    assert len(deform) == 1 + 2 + 1  # every block of layer2..layer4, none in layer1
    assert not any(isinstance(m, DeformConv3x3) for m in dcn.layer1.modules())
    assert torch.equal(dcn.layer3[1].conv2.weight, plain.layer3[1].conv2.weight)
    for m in deform:  # offset/mask convs untouched by the file: still zero
        assert m.offset.weight.abs().sum() == 0 and m.offset.bias.abs().sum() == 0

    x = torch.randn(2, 3, 96, 64)
    feats = dcn(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 16), (12, 8), (6, 4), (3, 2)]
    assert [f.shape[1] for f in feats] == dcn.out_channels
    (sum(f.mean() for f in feats)).backward()
    assert all(m.offset.weight.grad is not None for m in deform)  # the offsets learn


def test_zero_offsets_sample_the_regular_grid():
    """At init a DCNv2 conv is the plain conv on a regular grid, scaled by its mask sigmoid(0) = 0.5."""
    torch.manual_seed(0)
    conv = DeformConv3x3(16, stride=2, groups=4, dilation=1, backend="torchvision")
    x = torch.randn(2, 16, 11, 9)
    expected = 0.5 * F.conv2d(x, conv.weight, stride=2, padding=1, groups=4)
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_dcn_experiment_builds_on_mini_and_tiny():
    for profile in ("tiny", "mini"):
        run = resolve("atss-x101dcn-dyh6-LSC-2x-ms", profile)
        # load_weights=False: mini's stand-in weights are made by `dyhead pretrain`, not shipped
        model = build_detector(run, num_classes=3, dcn_backend="torchvision", load_weights=False)
        assert any(isinstance(m, DeformConv3x3) for m in model.backbone.body.layer4.modules())
        assert run.profile["input"]["min_size_train"] == run.profile["input"]["min_size_train_multiscale"]


def test_mini_stand_ins_keep_the_family_order():
    """r101 deeper than r50, x101 grouped; DCN variants add only the offset convs."""
    counts = {}
    for key in ("r50", "r101", "x101", "x101-dcn"):
        bb = resolve("atss-r50-base-1x", "mini").profile["model"]["backbones"][key]
        cfg = BackboneConfig(name=bb["name"], depths=tuple(bb["depths"]), base_width=bb["base_width"],
                             groups=bb.get("groups"), width_per_group=bb.get("width_per_group"),
                             dcn_stages=tuple(bb.get("dcn_stages", ())), norm=bb["norm"], freeze_at=bb["freeze_at"])
        model = ResNet(cfg)
        counts[key] = sum(p.numel() for p in model.parameters())
        if key == "x101":
            assert model.layer3[0].conv2.groups > 1
    assert counts["r50"] < counts["r101"] < counts["x101"] < counts["x101-dcn"]
