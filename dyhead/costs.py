"""What a job is expected to cost, for scheduling: Snakemake starts the longest trainings first.

The estimate is relative (seconds of one CPU thread on the mini profile, per 1000 iterations) and needs to
order jobs correctly, not to predict wall time: a training costs its iterations times a per-iteration price
of its detector, plus a price per DyHead block. The prices are the per-iteration times measured on mini
(one thread, batch 8; train.json `train_seconds`): a 10-block ATSS costs ~3.5x its baseline, each block
~0.3 of a baseline iteration, Faster R-CNN ~3x an ATSS baseline, RetinaNet ~0.7x.
"""
from __future__ import annotations

# per-iteration price of the detector with its baseline head, relative to ATSS's (1.0)
DETECTOR_PRICE = {"atss": 1.0, "fcos": 1.05, "retinanet": 0.7, "reppoints": 1.1, "faster_rcnn": 3.0}
HEADLESS_SHARE = 0.6  # the detector without its towers (a DyHead head replaces them)
BLOCK_PRICE = 0.3  # one DyHead block, per iteration
BACKBONE_PRICE = {"r50": 1.0, "r101": 1.3, "x101": 1.8}  # deeper stand-ins cost more per iteration


def train_cost(spec: dict, iterations: int) -> float:
    """Relative cost of training `spec` (an experiments.yaml entry) for `iterations`: larger runs first."""
    det = DETECTOR_PRICE.get(spec["detector"], 1.0)
    blocks = spec["head"]["blocks"]
    head = det * HEADLESS_SHARE + BLOCK_PRICE * blocks if blocks else det
    if spec["head"].get("tower_convs", 4) != 4 and not blocks:  # the coupling control's towers
        head = det * (HEADLESS_SHARE + (1 - HEADLESS_SHARE) * spec["head"]["tower_convs"] / 4)
    backbone = BACKBONE_PRICE.get(spec["backbone"].split("-")[0], 1.0) * (1.5 if "dcn" in spec["backbone"] else 1.0)
    return iterations * head * backbone / 1000


def train_priority(spec: dict, iterations: int, one_x: int) -> int:
    """Snakemake's `priority` for a training (an integer; higher starts first). Above every evaluation and
    FLOP count, so the long trainings start as soon as their inputs exist. Counted in units of the profile's
    1x (`one_x` iterations), so the order is the same whether 1x is 1000 iterations (mini), 2 (cocolike) or
    90k (coco): a cost in raw iterations would round every cocolike training to the same priority."""
    return 100 + round(10 * train_cost(spec, iterations) * 1000 / one_x)
