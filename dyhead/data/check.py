"""`dyhead check-data`: open every image of a split once, so a missing or broken file is found before a
training reaches its batch hours later.

Each image is decoded for real (JPEGs at 1/8 scale through PIL's draft mode, which still reads the whole
stream, so a truncated file fails) and its size is compared with the annotation file's. `dyhead synth` and
`dyhead fetch-coco` run it on what they made.
"""
from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from dyhead.data.coco import load_annotations
from dyhead.errors import DyheadError


def check_images(image_dir: Path, ann_file: Path, log=print, every: float = 10.0) -> int:
    """Every image `ann_file` lists, opened once; the count, or a one-line error naming the first bad file
    and how many are bad."""
    image_dir, ann_file = Path(image_dir), Path(ann_file)
    data = load_annotations(ann_file)
    if not image_dir.is_dir():
        raise DyheadError(f"image directory not found: {image_dir}")
    images = data["images"]
    bad: list[str] = []
    t0 = last = time.monotonic()
    for n, im in enumerate(images, 1):
        path = image_dir / str(im.get("file_name", ""))
        problem = _check_one(path, im.get("width"), im.get("height"))
        if problem:
            bad.append(f"{path}: {problem}")
        now = time.monotonic()
        if now - last >= every:
            last = now
            rate = n / (now - t0)
            log(f"check-data {ann_file.name}: {n}/{len(images)} images, {rate:.0f}/s, "
                f"eta {int((len(images) - n) / rate)}s, {len(bad)} bad")
    if bad:
        raise DyheadError(f"{bad[0]}" + (f" (and {len(bad) - 1} more bad images in {image_dir})" if len(bad) > 1 else ""))
    log(f"check-data {ann_file.name}: {len(images)} images in {image_dir} open and match their sizes "
        f"({time.monotonic() - t0:.1f}s)")
    return len(images)


def _check_one(path: Path, width, height) -> str | None:
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as img:
            size = img.size
            img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))  # JPEG: decode at 1/8 scale
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"cannot decode ({exc})"
    if (width, height) != size:
        return f"is {size[0]}x{size[1]}, the annotations say {width}x{height}"
    return None
