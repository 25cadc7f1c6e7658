"""ImageNet weights of the paper's backbones: torchvision's published files, fetched and verified.

The hex in each file name is the prefix of the file's sha256, which torch.hub checks; we check it
too. torchvision publishes the sizes in MiB rounded to three decimals (`_file_size` in the weights
metadata), so the size check allows that rounding. The DCN variants load the same files.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from dyhead.data.fetch import Remote, fetch_file, verify
from dyhead.errors import DyheadError

TORCHVISION_MODELS = "https://download.pytorch.org/models"
WEIGHTS_DIR = Path("data/weights")
_MIB_ROUNDING = 525  # bytes: half of 0.001 MiB


def _torchvision(file: str, mib: float) -> Remote:
    prefix = file.rsplit("-", 1)[1].split(".")[0]
    return Remote(file, file, TORCHVISION_MODELS, size=round(mib * 2**20), size_tolerance=_MIB_ROUNDING,
                  sha256_prefix=prefix)


# architecture (backbone `name`) -> IMAGENET1K_V1 weights of torchvision's resnet50 / resnet101 / resnext101_64x4d
IMAGENET = {
    "r50": _torchvision("resnet50-0676ba61.pth", 97.781),
    "r101": _torchvision("resnet101-63fe2227.pth", 170.511),
    "x101": _torchvision("resnext101_64x4d-173b62eb.pth", 319.318),
}


def weights_path(arch: str, root: Path = WEIGHTS_DIR) -> Path:
    """Where `dyhead fetch-weights` puts the file of `arch` (the name the profiles refer to)."""
    if arch not in IMAGENET:
        raise DyheadError(f"no ImageNet weights known for backbone {arch!r}; known: {', '.join(IMAGENET)}")
    return Path(root) / IMAGENET[arch].name


def arch_of_file(name: str) -> str | None:
    return next((a for a, r in IMAGENET.items() if r.name == Path(name).name), None)


def fetch_weights(archs: list[str], root: Path = WEIGHTS_DIR, *, mirror: str | None = None,
                  from_dir: Path | None = None, log=print, **download_kw) -> list[Path]:
    """Download (or copy from `from_dir`) and verify the ImageNet file of each architecture."""
    out = []
    for arch in dict.fromkeys(archs):
        dest = weights_path(arch, root)
        remote = IMAGENET[arch]
        if from_dir is not None and not dest.exists():
            src = Path(from_dir) / remote.name
            if not src.is_file():
                raise DyheadError(f"{from_dir}: no {remote.name} (ImageNet weights of {arch})")
            verify(src, remote, log)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
            log(f"{dest}: copied from {src}")
        else:
            fetch_file(remote, dest, mirror=mirror, log=log, **download_kw)
        out.append(dest)
    return out


# Stand-ins for the ImageNet files where none can be downloaded (the cocolike profile): torchvision's own
# architecture, randomly initialised with a fixed seed, saved as the same kind of state dict, so a profile
# loads them by path exactly as coco loads the real ones. Named so no one takes them for ImageNet weights.
STANDIN_SUFFIX = "-random-init-not-imagenet.pth"
_TORCHVISION_ARCH = {"r50": "resnet50", "r101": "resnet101", "x101": "resnext101_64x4d"}


def standin_name(arch: str) -> str:
    if arch not in _TORCHVISION_ARCH:
        raise DyheadError(f"no stand-in weights for backbone {arch!r}; known: {', '.join(_TORCHVISION_ARCH)}")
    return _TORCHVISION_ARCH[arch] + STANDIN_SUFFIX


def arch_of_standin(name: str) -> str | None:
    return next((a for a in _TORCHVISION_ARCH if standin_name(a) == Path(name).name), None)


def save_standin_weights(arch: str, root: Path, seed: int = 0, log=print) -> Path:
    """Write torchvision's `arch` with random weights (seeded) as `root/<standin_name>`; skip it if present."""
    import torch
    import torchvision

    from dyhead.files import save_torch

    dest = Path(root) / standin_name(arch)
    if dest.exists():
        log(f"{dest}: already there")
        return dest
    torch.manual_seed(seed)
    model = getattr(torchvision.models, _TORCHVISION_ARCH[arch])(weights=None)
    save_torch(dest, model.state_dict())
    log(f"{dest}: torchvision {_TORCHVISION_ARCH[arch]} with RANDOM weights (seed {seed}); a stand-in, not ImageNet")
    return dest
