"""Which items form micro-batch m: a pure function of (seed, m), so resume needs only the step."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from trainer.data.buckets import Bucket, BucketBatchSampler
from trainer.data.seeds import generator
from trainer.events import JobFailed

Slot = int | tuple[int, int]  # an item index, or (pool, position in pool) for a class-image slot


class DataOrder:
    """Which items micro-batch m holds, from (seed, m) alone.

    The data is an endless stream of epochs; an epoch lists each item `repeats` times, shuffled by a
    generator seeded with (seed, epoch). Micro-batch m takes stream positions [m*bs, (m+1)*bs), so a batch
    can straddle two epochs (no image is dropped, none is seen twice within an epoch).

    `pools` (prior preservation): `(slots, item indices)` per concept with class images. The concept gets
    `slots` class samples per epoch (as many as its instance samples, kohya's balance), filled with its class
    images in turn: slot s of epoch e holds class image `(e * slots + s) % len(items)`, so every class image
    is used evenly, over several epochs when there are more class images than slots (kohya would only ever
    use the first ones).

    `bucket_of` (aspect-ratio buckets): the bucket of each item. Every micro-batch then comes from one
    bucket (`BucketBatchSampler` over the epoch's slots); a bucket's leftovers form a smaller batch, so a
    batch never straddles two epochs. Without pools every epoch has the same number of batches; with
    pools the count is computed per epoch (a pure function of the epoch, cached).
    """

    def __init__(self, repeats: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                 pools: Sequence[tuple[int, Sequence[int]]] = (), bucket_of: Sequence[Bucket] | None = None):
        self.slots: list[Slot] = [i for i, r in enumerate(repeats) for _ in range(r)]
        self.pools = [list(items) for _, items in pools]
        self._pool_len = [n for n, _ in pools]
        self.slots += [(p, s) for p, (n, items) in enumerate(pools) if items for s in range(n)]
        if not self.slots:
            raise JobFailed("the dataset is empty: no image has a repeat", reason="bad_input")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.bucket_of = list(bucket_of) if bucket_of is not None else None
        self._perms: dict[int, list[int]] = {}
        self._bucket_batches: dict[int, list[list[tuple[int, int]]]] = {}
        self._cum: list[int] = [0]  # bucket mode: micro-batches before epoch e
        self._n0: int | None = None

    @property
    def epoch_len(self) -> int:
        return len(self.slots)

    def resolve(self, slot: Slot, epoch: int) -> int:
        if isinstance(slot, int):
            return slot
        p, s = slot
        items = self.pools[p]
        return items[(epoch * self._pool_len[p] + s) % len(items)]

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            if self.shuffle:
                perm = torch.randperm(len(self.slots), generator=generator(self.seed, "epoch", epoch)).tolist()
            else:
                perm = list(range(len(self.slots)))
            self._perms[epoch] = [self.resolve(self.slots[i], epoch) for i in perm]
        return self._perms[epoch]

    # -- bucket mode --

    def _epoch_keys(self, epoch: int) -> list[Bucket]:
        assert self.bucket_of is not None
        return [self.bucket_of[self.resolve(slot, epoch)] for slot in self.slots]

    def _n_batches(self, epoch: int) -> int:
        counts: dict[Bucket, int] = {}
        for k in self._epoch_keys(epoch):
            counts[k] = counts.get(k, 0) + 1
        return sum(-(-n // self.batch_size) for n in counts.values())

    def bucket_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The epoch's batches as lists of (slot index, item index), each from one bucket."""
        if epoch not in self._bucket_batches:
            if len(self._bucket_batches) > 4:
                self._bucket_batches.clear()
            sampler = BucketBatchSampler(self._epoch_keys(epoch), self.batch_size, self.seed)
            self._bucket_batches[epoch] = [[(j, self.resolve(self.slots[j], epoch)) for j in b]
                                           for b in sampler.batches(epoch)]
        return self._bucket_batches[epoch]

    def _locate(self, micro_batch: int) -> tuple[int, int]:
        if not self.pools:  # every epoch has the same number of batches
            if self._n0 is None:
                self._n0 = self._n_batches(0)
            return divmod(micro_batch, self._n0)
        while self._cum[-1] <= micro_batch:
            self._cum.append(self._cum[-1] + self._n_batches(len(self._cum) - 1))
        epoch = bisect.bisect_right(self._cum, micro_batch) - 1
        return epoch, micro_batch - self._cum[epoch]

    # -- both modes --

    def positions(self, micro_batch: int) -> list[tuple[int, int, int]]:
        """(epoch, position in epoch, item index) for each sample of a micro-batch.

        The position is unique within an epoch: flips and caption shuffles are seeded with (epoch, position).
        """
        if self.bucket_of is not None:
            epoch, k = self._locate(micro_batch)
            return [(epoch, j, i) for j, i in self.bucket_batches(epoch)[k]]
        out = []
        for p in range(micro_batch * self.batch_size, (micro_batch + 1) * self.batch_size):
            epoch, pos = divmod(p, self.epoch_len)
            out.append((epoch, pos, self.epoch_order(epoch)[pos]))
        return out

    def epoch_of(self, micro_batch: int) -> int:
        if self.bucket_of is not None:
            return self._locate(micro_batch)[0]
        return (micro_batch * self.batch_size) // self.epoch_len
