"""A deterministic synthetic set with COCO 2017's geometry (the `cocolike` profile's data).

What the coco profile's pipeline sees of COCO, without COCO: JPEG images of COCO's sizes (long side
mostly 640, landscape and portrait, 4:3 most often), its 80 categories with their names, supercategories
and ids (1..90 with COCO's ten gaps), a long-tailed number of objects per image (about 7 on average) and
of instances per class (person most), object sizes drawn in COCO's small/medium/large shares, and ~1%
crowd annotations. The objects themselves are mini's shapes (dyhead.data.synthetic): a class is a shape
and a hue band, so the numbers a model reaches here say nothing about COCO.

    out_dir/train2017/000000000001.jpg ...    (COCO's layout and file names)
    out_dir/val2017/000000000002.jpg ...
    out_dir/annotations/instances_{train,val}2017.json
    out_dir/synth.json                          arguments + summary; written last = the set is complete
"""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dyhead.data import synthetic
from dyhead.errors import DyheadError

FORMAT_VERSION = 1
SPLITS = {"train": "train2017", "val": "val2017"}

# COCO 2017's categories: (id, name, supercategory). Ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused.
CATEGORIES = tuple(
    (cid, name, sup)
    for sup, items in (
        ("person", [(1, "person")]),
        ("vehicle", [(2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
                     (8, "truck"), (9, "boat")]),
        ("outdoor", [(10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"),
                     (15, "bench")]),
        ("animal", [(16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"),
                    (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe")]),
        ("accessory", [(27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase")]),
        ("sports", [(34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"),
                    (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
                    (43, "tennis racket")]),
        ("kitchen", [(44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"),
                     (51, "bowl")]),
        ("food", [(52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
                  (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake")]),
        ("furniture", [(62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"),
                       (70, "toilet")]),
        ("electronic", [(72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
                        (77, "cell phone")]),
        ("appliance", [(78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator")]),
        ("indoor", [(84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
                    (89, "hair drier"), (90, "toothbrush")]),
    )
    for cid, name in items
)
NUM_CLASSES = len(CATEGORIES)  # 80
_HUE_BANDS = math.ceil(NUM_CLASSES / len(synthetic.SHAPES))  # class k: shape k % 8, hue band k // 8

# Instances per class fall off with rank (COCO: person ~26% of all boxes, the rarest classes ~0.1%).
_RANK_WEIGHTS = 1.0 / np.arange(1, NUM_CLASSES) ** 0.7
_CLASS_P = np.concatenate([[0.25], 0.75 * _RANK_WEIGHTS / _RANK_WEIGHTS.sum()])
# Image shape: long side 640 for most COCO images; (long / short, probability), portrait ~25%.
_LONG_SIDE_640 = 0.9
_ASPECTS = ((4 / 3, 0.55), (3 / 2, 0.2), (16 / 9, 0.08), (1.0, 0.07), (5 / 4, 0.05), (2.0, 0.05))
_PORTRAIT = 0.25
# Objects per image: 1 + negative binomial, ~10.5 drawn of which ~7 stay visible enough to annotate (COCO: 7.3).
_COUNT_R, _COUNT_MEAN, _MAX_OBJECTS = 1.2, 9.5, 60
# Drawn shares of small (< 32^2 px), medium and large (> 96^2) objects (occlusion then shifts them to COCO's
# 41/34/24%), and the sqrt(area) range of each.
_SIZE_BUCKETS = ((0.39, 8.0, 32.0), (0.33, 32.0, 96.0), (0.28, 96.0, None))
_CROWD_PROB = 0.01
_JPEG_QUALITY = 90


def image_shape(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one image, COCO-like."""
    long = 640 if rng.random() < _LONG_SIDE_640 else int(rng.integers(400, 640))
    ratios, probs = zip(*_ASPECTS)
    short = int(round(long / ratios[int(rng.choice(len(ratios), p=probs))]))
    return (short, long) if rng.random() < _PORTRAIT else (long, short)


def _sample_object(rng: np.random.Generator, width: int, height: int):
    """One object (or one crowd of small same-class objects): class index, crowd flag, placed polygons."""
    cls = int(rng.choice(NUM_CLASSES, p=_CLASS_P))
    shape = synthetic.SHAPES[cls % len(synthetic.SHAPES)]
    spin = synthetic.ROTATION[shape]
    if rng.random() < _CROWD_PROB:
        rw, rh = rng.uniform(0.2, 0.5) * width, rng.uniform(0.2, 0.5) * height
        x0, y0 = rng.uniform(0, width - rw), rng.uniform(0, height - rh)
        placed = []
        for _ in range(int(rng.integers(5, 16))):
            s = max(4.0, rng.uniform(0.1, 0.25) * min(rw, rh))
            cx, cy = x0 + rng.uniform(0, rw), y0 + rng.uniform(0, rh)
            placed += synthetic.place(synthetic.shape_ops(shape, rng), cx, cy, s, s, rng.uniform(-spin, spin))
        return cls, True, placed
    shares, lows, highs = zip(*_SIZE_BUCKETS)
    bucket = int(rng.choice(len(shares), p=shares))
    hi = highs[bucket] or 0.8 * min(width, height)
    s = math.exp(rng.uniform(math.log(lows[bucket]), math.log(max(hi, lows[bucket] + 1))))
    ar = math.exp(rng.uniform(-math.log(3.0), math.log(3.0)))
    w, h = s * math.sqrt(ar), s / math.sqrt(ar)
    cx = rng.uniform(min(w / 4, width / 2), max(width - w / 4, width / 2))
    cy = rng.uniform(min(h / 4, height / 2), max(height - h / 4, height / 2))
    return cls, False, synthetic.place(synthetic.shape_ops(shape, rng), cx, cy, w, h, rng.uniform(-spin, spin))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Mini's cluttered background drawn at half size and scaled up: a quarter of the cost at 640 px."""
    half = synthetic.background(rng, (width + 1) // 2, (height + 1) // 2)
    small = Image.fromarray((np.clip(half, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), "RGB")
    return np.asarray(small.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255


def render_image(seed: int, split: str, index: int):
    """One image: (uint8 [H, W, 3], annotations as (class index, iscrowd, bbox xywh, visible area))."""
    rng = np.random.default_rng([seed, 100 + list(SPLITS).index(split), index])
    width, height = image_shape(rng)
    img = _background(rng, width, height)
    owner = np.zeros((height, width), np.uint8)  # which object is visible at each pixel (0 = none)
    count = min(_MAX_OBJECTS, 1 + int(rng.negative_binomial(_COUNT_R, _COUNT_R / (_COUNT_R + _COUNT_MEAN))))
    objects = []
    for k in range(1, count + 1):
        cls, crowd, placed = _sample_object(rng, width, height)
        mask = synthetic.draw_mask(width, height, placed)
        colour = synthetic.class_colour(rng, cls // len(synthetic.SHAPES), _HUE_BANDS)
        img[mask] = colour * rng.uniform(0.85, 1.15) + rng.normal(0, 0.03, (int(mask.sum()), 3))
        owner[mask] = k
        objects.append((cls, crowd, int(mask.sum())))
    anns = []
    for k, (cls, crowd, full) in enumerate(objects, 1):
        ys, xs = np.nonzero(owner == k)
        if full == 0 or len(xs) < max(4, synthetic.MIN_VISIBLE * full):
            continue  # mostly hidden or off-image: not annotated
        x0, y0 = int(xs.min()), int(ys.min())
        w, h = int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0
        if min(w, h) < 2:
            continue
        anns.append((cls, int(crowd), [float(x0), float(y0), float(w), float(h)], float(len(xs))))
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), anns


def _image_id(split: str, index: int) -> int:
    # disjoint and non-contiguous across splits, as COCO's are: loaders must not assume 1..N
    return 2 * index + 1 + list(SPLITS).index(split)


def _write_split(root: Path, split: str, n: int, seed: int, progress: bool) -> dict:
    folder = root / SPLITS[split]
    folder.mkdir(parents=True)
    images, annotations = [], []
    stats = {"images": n, "annotations": 0, "crowd": 0, "sizes": {"small": 0, "medium": 0, "large": 0},
             "objects_per_image": {"mean": 0.0, "max": 0}, "landscape": 0, "portrait": 0, "square": 0}
    for i in range(n):
        pixels, anns = render_image(seed, split, i)
        height, width = pixels.shape[:2]
        image_id = _image_id(split, i)
        name = f"{image_id:012d}.jpg"
        buf = io.BytesIO()  # fixed encoder options, no metadata: identical bytes for identical pixels
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=_JPEG_QUALITY)
        (folder / name).write_bytes(buf.getvalue())
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        stats["landscape" if width > height else "portrait" if height > width else "square"] += 1
        stats["objects_per_image"]["max"] = max(stats["objects_per_image"]["max"], len(anns))
        for cls, iscrowd, bbox, area in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORIES[cls][0],
                                "bbox": bbox, "area": area, "iscrowd": iscrowd})
            if iscrowd:
                stats["crowd"] += 1
            else:
                stats["sizes"]["small" if area < 32**2 else "medium" if area < 96**2 else "large"] += 1
        if progress and (i + 1) % max(1, n // 10) == 0:
            print(f"cocolike {SPLITS[split]}: {i + 1}/{n} images", file=sys.stderr, flush=True)
    stats["annotations"] = len(annotations)
    stats["objects_per_image"]["mean"] = round(len(annotations) / n, 3)
    categories = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in CATEGORIES]
    coco = {"info": {"description": "dyhead cocolike: synthetic shapes with COCO 2017's geometry",
                     "version": str(FORMAT_VERSION)},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(exist_ok=True)
    with open(root / "annotations" / f"instances_{SPLITS[split]}.json", "w") as fh:
        json.dump(coco, fh, sort_keys=True, separators=(",", ":"))
    return stats


def make_cocolike(out_dir: Path, *, num_train: int, num_val: int, seed: int = 0, progress: bool = True) -> dict:
    """Build the set under `out_dir` (atomically; a no-op when it is already there) -> summary."""
    args = {"num_train": num_train, "num_val": num_val, "seed": seed}
    for key, value in args.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise DyheadError(f"cocolike data: {key} must be an integer >= {0 if key == 'seed' else 1}, got {value!r}")

    def write(tmp: Path) -> dict:
        return {split: _write_split(tmp, split, n, seed, progress) for split, n in (("train", num_train),
                                                                                     ("val", num_val))}

    return synthetic.build_set(Path(out_dir), FORMAT_VERSION, args, write)
