"""Data: the synthetic COCO-format set, the COCO dataset, transforms and resumable batching."""
from dyhead.data.coco import CocoDetection, collate
from dyhead.data.sampler import GroupedBatchSchedule, ResumableBatchSampler
from dyhead.data.synthetic import area_ranges, make_synthetic_coco
from dyhead.data.transforms import (Compose, RandomHorizontalFlip, ResizeShortestSide, batch_images,
                                    build_transforms)

__all__ = ["CocoDetection", "collate", "GroupedBatchSchedule", "ResumableBatchSampler", "area_ranges",
           "make_synthetic_coco", "Compose", "RandomHorizontalFlip", "ResizeShortestSide", "batch_images",
           "build_transforms"]
