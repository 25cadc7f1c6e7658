"""A deterministic synthetic detection set in real COCO format (the CPU stand-in for COCO 2017).

Classes differ by shape only: every object gets a random colour, so the detector has to look at
shape. Sizes are log-uniform from ~6 px to most of the image (scale awareness), shapes come with
random aspect ratios and rotations and are painted over each other and over an unannotated,
cluttered background (spatial awareness). Boxes are the tight boxes of the *visible* pixels, and
objects left mostly hidden are not annotated, so labels stay honest under occlusion.

    out_dir/train/000000000001.png ...       lossless PNG, RGB
    out_dir/val/000000000001.png ...
    out_dir/annotations/instances_{train,val}.json
    out_dir/synth.json                       arguments + summary; written last = the set is complete

The drawing parts (shape_ops, place, draw_mask, background, class_colour) and the atomic folder build
(build_set) are public: dyhead/data/cocolike.py draws COCO-geometry images with them.
"""
from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dyhead.errors import DyheadError

FORMAT_VERSION = 3
SHAPES = ("rectangle", "ellipse", "triangle", "cross", "ring", "diamond", "hexagon", "star")
# Non-contiguous like real COCO (1..90 with gaps): loaders must map ids to labels.
CATEGORY_IDS = (1, 2, 3, 5, 8, 13, 21, 34)
SPLITS = {"train": 0, "val": 1}

# Rotation range (degrees, +-) per shape: small for rectangle/diamond so one never becomes the other.
ROTATION = {"rectangle": 15, "ellipse": 90, "triangle": 180, "cross": 20, "ring": 90,
            "diamond": 15, "hexagon": 30, "star": 180}
_MAX_OBJECTS = 8
_CROWD_PROB = 0.02        # per object
_DEGENERATE_PROB = 0.01   # per train image: one unusable box that loaders must filter
MIN_VISIBLE = 0.5         # keep an object only if this fraction of its own pixels stays visible


def area_ranges(image_size: int) -> dict[str, list[float]]:
    """COCO's small/medium/large limits (32^2, 96^2 px) scaled to this image size.

    Scaled by size/320 rather than size/640: with sizes log-uniform from 6 px to 3/4 of the image,
    the three buckets then hold about 27/40/33% of the objects, close to COCO's 41/34/24%.
    """
    r = image_size / 320.0
    small, medium = (32 * r) ** 2, (96 * r) ** 2
    return {"small": [0.0, small], "medium": [small, medium], "large": [medium, 1e10]}


def unit_polygon(n: int, radius=1.0, phase=0.0) -> np.ndarray:
    a = phase + np.arange(n) * (2 * math.pi / n)
    r = np.resize(np.asarray(radius, dtype=np.float64), n)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def shape_ops(shape: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons in the unit box [-1, 1]^2 with the fill each paints (0 cuts a hole)."""
    if shape == "rectangle":
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), 255)]
    if shape == "ellipse":
        return [(unit_polygon(40), 255)]
    if shape == "triangle":
        return [(np.array([[0, -1], [1, 1], [-1, 1]], float), 255)]
    if shape == "cross":
        t = rng.uniform(0.25, 0.42)
        pts = [[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t],
               [t, 1], [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t]]
        return [(np.array(pts, float), 255)]
    if shape == "ring":
        return [(unit_polygon(40), 255), (unit_polygon(40, rng.uniform(0.45, 0.7)), 0)]
    if shape == "diamond":
        return [(np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], float), 255)]
    if shape == "hexagon":
        return [(unit_polygon(6), 255)]
    if shape == "star":
        return [(unit_polygon(10, [1.0, rng.uniform(0.4, 0.55)], -math.pi / 2), 255)]
    raise AssertionError(shape)


def place(ops, cx, cy, w, h, angle_deg) -> list[tuple[list[tuple[float, float]], int]]:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    rot = np.array([[c, s], [-s, c]])
    out = []
    for pts, fill in ops:
        p = (pts * [w / 2, h / 2]) @ rot + [cx, cy]
        out.append(([tuple(q) for q in p.tolist()], fill))
    return out


def draw_mask(width: int, height: int, placed) -> np.ndarray:
    """[height, width] bool mask of placed polygons (a fill of 0 cuts a hole)."""
    m = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(m)
    for pts, fill in placed:
        d.polygon(pts, fill=fill)
    return np.asarray(m) > 0


def upsample(coarse: np.ndarray, width: int, height: int) -> np.ndarray:
    """Separable bilinear upsampling of a [k, k, C] grid to [height, width, C]: smooth shading."""
    k = coarse.shape[0]

    def taps(n):
        p = np.linspace(0, k - 1, n)
        i0 = np.minimum(p.astype(int), k - 2)
        return i0, p - i0

    i0, f = taps(height)
    rows = coarse[i0] * (1 - f[:, None, None]) + coarse[i0 + 1] * f[:, None, None]
    j0, g = taps(width)
    g = g.reshape(1, -1, 1)
    return rows[:, j0] * (1 - g) + rows[:, j0 + 1] * g


def random_colour(rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.25, 1.0)))


def class_colour(rng: np.random.Generator, cls: int, num_classes: int) -> np.ndarray:
    # Each class has a hue, jittered by up to 60% of the spacing into its neighbours: colour hints at
    # the class, shape decides it, so a small network learns within minutes yet cannot rely on colour.
    hue = (cls + rng.uniform(-0.6, 0.6)) / num_classes
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)))


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A shaded, noisy [height, width, 3] float image with clutter (lines, blobs) that is no object."""
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.3, 0.8)))
    img = base + 0.3 * (upsample(rng.random((5, 5, 3)), width, height) - 0.5)
    img += rng.normal(0.0, 0.03, img.shape)
    # Clutter that must not be detected: thin lines and jagged blobs, half-transparent.
    for _ in range(int(rng.integers(2, 9))):
        m = Image.new("L", (width, height), 0)
        pts = [tuple(q) for q in (rng.random((2, 2)) * [width, height]).tolist()]
        ImageDraw.Draw(m).line(pts, fill=255, width=int(rng.integers(1, 3)))
        blend(img, np.asarray(m) > 0, random_colour(rng), 0.5)
    for _ in range(int(rng.integers(0, 5))):
        m = Image.new("L", (width, height), 0)
        n = int(rng.integers(7, 13))
        r = rng.uniform(2, min(width, height) / 8) * rng.uniform(0.3, 1.0, n)
        pts = unit_polygon(n, r) + rng.random(2) * [width, height]
        ImageDraw.Draw(m).polygon([tuple(q) for q in pts.tolist()], fill=255)
        blend(img, np.asarray(m) > 0, random_colour(rng), 0.4)
    return img


def blend(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float) -> None:
    img[mask] = img[mask] * (1 - alpha) + colour * alpha


def _sample_object(rng: np.random.Generator, size: int, num_classes: int):
    """One object (or one crowd of small same-class objects): class index, crowd flag, polygons."""
    cls = int(rng.integers(num_classes))
    shape = SHAPES[cls]
    crowd = bool(rng.random() < _CROWD_PROB)
    if crowd:
        rw, rh = rng.uniform(0.25, 0.6, 2) * size
        x0, y0 = rng.uniform(0, size - rw), rng.uniform(0, size - rh)
        placed = []
        for _ in range(int(rng.integers(4, 11))):
            s = max(3.0, rng.uniform(0.12, 0.3) * min(rw, rh))
            cx, cy = x0 + rng.uniform(0, rw), y0 + rng.uniform(0, rh)
            angle = rng.uniform(-ROTATION[shape], ROTATION[shape])
            placed += place(shape_ops(shape, rng), cx, cy, s, s, angle)
        return cls, True, placed
    # log-uniform size (sqrt of box area) and aspect ratio
    s = math.exp(rng.uniform(math.log(6.0), math.log(0.75 * size)))
    ar_max = 3.0 if shape in ("rectangle", "ellipse", "triangle", "diamond") else 2.0
    ar = math.exp(rng.uniform(-math.log(ar_max), math.log(ar_max)))
    w, h = s * math.sqrt(ar), s / math.sqrt(ar)
    # centre may sit near the border (truncated objects), never so far that most is outside
    cx = rng.uniform(min(w / 4, size / 2), max(size - w / 4, size / 2))
    cy = rng.uniform(min(h / 4, size / 2), max(size - h / 4, size / 2))
    angle = rng.uniform(-ROTATION[shape], ROTATION[shape])
    return cls, False, place(shape_ops(shape, rng), cx, cy, w, h, angle)


def render_image(seed: int, split: str, index: int, size: int, num_classes: int):
    """Render one image: (uint8 [size, size, 3], annotations as (class, iscrowd, bbox, area))."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    img = background(rng, size, size)
    yy, xx = np.mgrid[0:size, 0:size] / size
    owner = np.zeros((size, size), np.uint8)  # which object is visible at each pixel (0 = none)
    objects = []
    for k in range(1, int(rng.integers(1, _MAX_OBJECTS + 1)) + 1):
        cls, crowd, placed = _sample_object(rng, size, num_classes)
        mask = draw_mask(size, size, placed)
        colour = class_colour(rng, cls, num_classes)
        # shading + noise inside the object so it is not one flat colour
        phi = rng.uniform(0, 2 * math.pi)
        ramp = 1 + rng.uniform(-0.3, 0.3) * ((xx - 0.5) * math.cos(phi) + (yy - 0.5) * math.sin(phi))
        img[mask] = colour * ramp[mask][:, None] + rng.normal(0, 0.03, (int(mask.sum()), 3))
        owner[mask] = k
        objects.append((cls, crowd, int(mask.sum())))
    anns = []
    for k, (cls, crowd, full) in enumerate(objects, 1):
        ys, xs = np.nonzero(owner == k)
        if full == 0 or len(xs) < max(4, MIN_VISIBLE * full):
            continue  # mostly hidden (or off-image): do not ask the detector to find it
        x0, y0 = int(xs.min()), int(ys.min())
        w, h = int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0
        if min(w, h) < 2:
            continue
        anns.append((cls, int(crowd), [float(x0), float(y0), float(w), float(h)], float(len(xs))))
    if split == "train" and rng.random() < _DEGENERATE_PROB:
        cls = int(rng.integers(num_classes))
        x, y = rng.uniform(0, size - 8, 2).round(1).tolist()
        kind = int(rng.integers(3))
        box = ([x, y, 0.0, 6.0], [x, y, 6.0, 0.5], [size - 0.25, y, 6.0, 6.0])[kind]
        anns.append((cls, 0, box, box[2] * box[3]))
    pixels = (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return pixels, anns


def _is_degenerate(bbox, size: int) -> bool:
    x, y, w, h = bbox
    return min(x + w, size) - max(x, 0) <= 1 or min(y + h, size) - max(y, 0) <= 1


def _write_split(root: Path, split: str, n: int, args: dict, progress: bool) -> dict:
    size, num_classes = args["image_size"], args["num_classes"]
    (root / split).mkdir(parents=True)
    limits = area_ranges(size)
    stats = {"images": n, "annotations": 0, "boxes": 0, "crowd": 0, "degenerate": 0,
             "sizes": {"small": 0, "medium": 0, "large": 0}}
    images, annotations = [], []
    for i in range(n):
        image_id = i + 1
        name = f"{image_id:012d}.png"
        pixels, anns = render_image(args["seed"], split, i, size, num_classes)
        # fixed PNG options and no metadata chunks: byte-identical output for identical pixels
        Image.fromarray(pixels, "RGB").save(root / split / name, format="PNG", compress_level=6)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        for cls, iscrowd, bbox, area in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": CATEGORY_IDS[cls], "bbox": bbox, "area": area,
                                "iscrowd": iscrowd})
            if iscrowd:
                stats["crowd"] += 1
            elif _is_degenerate(bbox, size):
                stats["degenerate"] += 1
            else:
                stats["boxes"] += 1
                kind = next(k for k, (lo, hi) in limits.items() if lo <= area < hi)
                stats["sizes"][kind] += 1
        if progress and (i + 1) % max(1, n // 10) == 0:
            print(f"synthetic {split}: {i + 1}/{n} images", file=sys.stderr, flush=True)
    stats["annotations"] = len(annotations)
    categories = [{"id": CATEGORY_IDS[c], "name": SHAPES[c], "supercategory": "shape"}
                  for c in range(num_classes)]
    coco = {"info": {"description": "dyhead synthetic shapes", "version": str(FORMAT_VERSION)},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(exist_ok=True)
    with open(root / "annotations" / f"instances_{split}.json", "w") as fh:
        json.dump(coco, fh, sort_keys=True, separators=(",", ":"))
    return stats


def _read_manifest(out_dir: Path):
    try:
        with open(out_dir / "synth.json") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _remove_stale(out_dir: Path) -> None:
    """Delete temp/old siblings left by killed runs (their pid is gone)."""
    for prefix in (f".{out_dir.name}.tmp-", f".{out_dir.name}.old-"):
        for p in out_dir.parent.glob(prefix + "*"):
            try:
                os.kill(int(p.name[len(prefix):].split("-")[0]), 0)
            except ProcessLookupError:
                shutil.rmtree(p, ignore_errors=True)
            except (ValueError, PermissionError):
                pass


def make_synthetic_coco(out_dir: Path, *, num_train: int, num_val: int, image_size: int = 128,
                        num_classes: int = 6, seed: int = 0, progress: bool = True) -> dict:
    """Build the set under `out_dir` (atomically; a no-op when it is already there) -> summary."""
    out_dir = Path(out_dir)
    args = {"num_train": num_train, "num_val": num_val, "image_size": image_size,
            "num_classes": num_classes, "seed": seed}
    for key, value in args.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DyheadError(f"synthetic data: {key} must be a non-negative integer, got {value!r}")
    if num_train < 1 or num_val < 1:
        raise DyheadError(f"synthetic data: num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if image_size < 16:
        raise DyheadError(f"synthetic data: image_size must be >= 16, got {image_size}")
    if not 1 <= num_classes <= len(SHAPES):
        raise DyheadError(f"synthetic data: num_classes must be in 1..{len(SHAPES)}, got {num_classes}")

    def write(tmp: Path) -> dict:
        summary = {split: _write_split(tmp, split, n, args, progress)
                   for split, n in (("train", num_train), ("val", num_val))}
        summary["area_ranges"] = area_ranges(image_size)
        return summary

    return build_set(out_dir, FORMAT_VERSION, args, write)


def build_set(out_dir: Path, version: int, args: dict, write) -> dict:
    """Make a data set folder atomically: `write(tmp)` fills a temporary sibling and returns a summary, then
    synth.json (version, arguments, summary) is written last and the folder renamed into place. A no-op
    returning the stored summary when `out_dir` already holds a set of this version and these arguments."""
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest and manifest.get("version") == version and manifest.get("arguments") == args:
        return manifest["summary"]
    if out_dir.exists() and manifest is None and any(out_dir.iterdir()):
        # never delete a folder we did not make: ours always carry synth.json
        raise DyheadError(f"{out_dir}: not empty and has no synth.json; remove it or pick another folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the set is ordinary shared data
        summary = write(tmp)
        with open(tmp / "synth.json", "w") as fh:
            json.dump({"version": version, "arguments": args, "summary": summary}, fh,
                      indent=2, sort_keys=True)
            fh.write("\n")
        if out_dir.exists():  # an older set (other arguments) or an empty folder: swap it out
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
            os.rename(out_dir, old / "set")
            shutil.rmtree(old)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            other = _read_manifest(out_dir)  # a concurrent run with the same arguments won the race
            if not (other and other.get("arguments") == args):
                raise
            shutil.rmtree(tmp)
            return other["summary"]
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # JSON round trip so a fresh build and a skipped one return equal dicts
    return json.loads(json.dumps(summary))
