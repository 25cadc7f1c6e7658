"""Deterministic, resumable batches grouped by aspect ratio.

The whole data stream is a pure function of (seed, iteration): epoch e is a permutation drawn
from seed + e, cut into single-group global batches, and every sample carries an augmentation seed
derived from (seed, epoch, position). A run killed at iteration k resumes with `batch_at(k)` on
exactly the batches (and augmentations) an uninterrupted run would have seen.
"""
from __future__ import annotations

import bisect
from itertools import count

import torch
from torch.utils.data import Sampler

from dyhead.errors import DyheadError

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: nearby inputs give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def aug_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at `position` (in the global stream) of `epoch`."""
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ epoch) ^ position) >> 1  # 63 bits


def group_ids(aspect_ratios: list[float], num_groups: int) -> list[int]:
    """2 groups: portrait (w/h < 1) vs landscape (>= 1), like detectron2/mmdet. More groups: bins
    evenly spaced in log2(w/h) over [-1, 1] (the outer two open-ended), like torchvision's."""
    if num_groups < 1:
        raise DyheadError(f"num_groups: must be >= 1, got {num_groups}")
    edges = [2.0 ** (2 * i / num_groups - 1) for i in range(1, num_groups)]
    return [bisect.bisect_right(edges, ar) for ar in aspect_ratios]


class GroupedBatchSchedule:
    def __init__(self, aspect_ratios: list[float], batch_size: int, seed: int, num_groups: int = 2,
                 rank: int = 0, world_size: int = 1, drop_last_group_remainder: bool = False):
        if not aspect_ratios:
            raise DyheadError("sampler: the dataset is empty")
        if batch_size < 1 or world_size < 1 or batch_size % world_size:
            raise DyheadError(f"batch_size: {batch_size} must be a positive multiple of world_size {world_size}")
        if not 0 <= rank < world_size:
            raise DyheadError(f"rank: {rank} not in [0, {world_size})")
        self.groups = group_ids(aspect_ratios, num_groups)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last_group_remainder = drop_last_group_remainder
        sizes: dict[int, int] = {}
        for g in self.groups:
            sizes[g] = sizes.get(g, 0) + 1
        # constant over epochs: each group gives ceil (topped up) or floor (dropped) of n_g / B
        rounding = (lambda n: n // batch_size) if drop_last_group_remainder else (lambda n: -(-n // batch_size))
        self._iters = sum(rounding(n) for n in sizes.values())
        if self._iters == 0:
            raise DyheadError(f"sampler: no full batch of {batch_size} in {len(self.groups)} samples "
                              "with drop_last_group_remainder")
        self._cache: tuple[int, list] | None = None

    @property
    def iters_per_epoch(self) -> int:
        return self._iters

    def _global_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.groups), generator=g).tolist()
        B = self.batch_size
        buffers: dict[int, list[int]] = {}
        members: dict[int, list[int]] = {}
        batches = []
        for i in perm:
            grp = self.groups[i]
            members.setdefault(grp, []).append(i)
            buf = buffers.setdefault(grp, [])
            buf.append(i)
            if len(buf) == B:
                batches.append(buf)
                buffers[grp] = []
        for grp in sorted(buffers):
            buf = buffers[grp]
            if not buf or self.drop_last_group_remainder:
                continue
            # top up with the group's other samples in permutation order (repeats if it is tiny)
            taken = set(buf)
            fill = [i for i in members[grp] if i not in taken] or members[grp]
            while len(buf) < B:
                buf.extend(fill[: B - len(buf)])
            batches.append(buf)
        return batches

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's share of every global batch of `epoch`, as (index, aug_seed) pairs."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        B, per = self.batch_size, self.batch_size // self.world_size
        lo = self.rank * per
        out = []
        for b, batch in enumerate(self._global_batches(epoch)):
            shard = batch[lo: lo + per]
            out.append([(i, aug_seed(self.seed, epoch, b * B + lo + j)) for j, i in enumerate(shard)])
        self._cache = (epoch, out)
        return out

    def batch_at(self, iteration: int) -> list[tuple[int, int]]:
        if iteration < 0:
            raise DyheadError(f"iteration: must be >= 0, got {iteration}")
        epoch, b = divmod(iteration, self._iters)
        return self.epoch_batches(epoch)[b]

    def iter_from(self, iteration: int):
        """Infinite stream of this rank's batches starting at global iteration `iteration`."""
        for it in count(iteration):
            yield self.batch_at(it)


class ResumableBatchSampler(Sampler):
    """For DataLoader(batch_sampler=...): the batches of iterations [start_iter, num_iters)."""

    def __init__(self, schedule: GroupedBatchSchedule, start_iter: int, num_iters: int):
        super().__init__()
        self.schedule = schedule
        self.start_iter = start_iter
        self.num_iters = num_iters

    def __iter__(self):
        for it in range(self.start_iter, self.num_iters):
            yield self.schedule.batch_at(it)

    def __len__(self) -> int:
        return max(0, self.num_iters - self.start_iter)
