"""Streaming access to ``dataset.zarr`` for training and extraction: Dataset, sampler, collate.

* :class:`MaterialDataset` maps positions ``0..len(indices)-1`` to materials of the store
  (``indices`` = rows of the store index, e.g. a training split). Parts are read whole and kept in
  a small LRU cache, so memory is a few parts plus the index, whatever the store size.
* :class:`BlockShuffleSampler` makes that cache effective: per epoch it shuffles the order of the
  parts, groups ``window`` consecutive parts and shuffles the materials within each group. For
  ``world`` > 1 ranks, rank ``r`` takes the ``r``-th contiguous slice of the epoch's order (padded by
  wrapping to equal size, as ``DistributedSampler``; or truncated with ``drop_last``), so ranks get
  disjoint equal-size subsets and each rank still reads few parts at a time. ``set_epoch``,
  ``state_dict`` / ``load_state_dict`` resume an epoch exactly where it stopped.
* :func:`collate` concatenates materials into one :class:`~toolkit.data.batch.GraphBatch` and builds
  the line graph vectorised (:func:`toolkit.data.graphs.line_graph_index`).

No pymatgen or jarvis-tools here: a GPU node needs numpy, zarr and torch only.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from toolkit.data.batch import GraphBatch
from toolkit.data.graphs import line_graph_index
from toolkit.data.store import DatasetReader


class MaterialDataset(Dataset):
    """Materials of a complete dataset store; item = dict of numpy arrays (see :meth:`__getitem__`)."""

    def __init__(self, store_path: str | os.PathLike, indices: Sequence[int] | np.ndarray | None = None,
                 cache_parts: int = 2):
        self.store_path = str(store_path)
        self.cache_parts = cache_parts
        reader = DatasetReader(self.store_path, cache_parts=cache_parts)  # validates the store (complete=true)
        n = len(reader)
        self.indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise IndexError(f"indices out of range for {self.store_path} with {n} materials")
        self.part_of = reader.part_of[self.indices]  # part of each position (for the sampler)
        self._reader: DatasetReader | None = reader
        self._pid = os.getpid()

    @property
    def reader(self) -> DatasetReader:
        """The store reader of this process (re-opened after a fork / in a DataLoader worker)."""
        if self._reader is None or self._pid != os.getpid():
            self._reader = DatasetReader(self.store_path, cache_parts=self.cache_parts)
            self._pid = os.getpid()
        return self._reader

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, pos: int) -> dict[str, Any]:
        """Material at position ``pos``: ``index`` (store row), ``id``, ``formula``, ``numbers`` (n,) int64,
        ``frac_coords`` (n,3), ``lattice`` (3,3) Å, ``edge_src``/``edge_dst`` (E,) int64 local,
        ``edge_vec`` (E,3) float32 Å, ``spectrum`` (G,) float32 (NaN = masked), ``has_spectrum``."""
        return self.reader.material(int(self.indices[pos]))


class BlockShuffleSampler(Sampler[int]):
    """Chunk-aware, distributed-aware, resumable sampler over dataset positions.

    ``blocks[i]`` is the store part of position ``i`` (``MaterialDataset.part_of``)."""

    def __init__(self, blocks: np.ndarray, shuffle: bool = True, seed: int = 0, rank: int = 0, world: int = 1,
                 window: int = 2, drop_last: bool = False):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.blocks = np.asarray(blocks, dtype=np.int64)
        self.shuffle, self.seed, self.rank, self.world = bool(shuffle), int(seed), int(rank), int(world)
        self.window, self.drop_last = max(1, int(window)), bool(drop_last)
        self.epoch = 0
        self._start = 0  # positions of this epoch already consumed (resume)
        self._yielded = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the shuffle); call before iterating each epoch."""
        if int(epoch) != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """All positions of one epoch, before the split across ranks."""
        n = self.blocks.shape[0]
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch)])
        uniq = np.unique(self.blocks)
        perm = rng.permutation(uniq)
        rank_of_block = np.empty(int(uniq.max()) + 1 if uniq.size else 0, dtype=np.int64)
        rank_of_block[perm] = np.arange(perm.size)
        group = rank_of_block[self.blocks] // self.window  # window consecutive blocks form a group
        key = rng.random(n)  # random order within a group
        return np.lexsort((key, group)).astype(np.int64)

    def _per_rank(self) -> int:
        n = self.blocks.shape[0]
        return n // self.world if self.drop_last else -(-n // self.world)

    def rank_order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's positions for one epoch (equal size on every rank)."""
        order = self.epoch_order(epoch)
        per = self._per_rank()
        total = per * self.world
        if total > order.size and order.size:
            order = np.resize(order, total)  # pad by wrapping (as DistributedSampler)
        return order[self.rank * per:(self.rank + 1) * per]

    def __iter__(self) -> Iterator[int]:
        order = self.rank_order()
        start, self._start = self._start, 0
        self._yielded = start
        for pos in order[start:]:
            self._yielded += 1
            yield int(pos)

    def __len__(self) -> int:
        return self._per_rank() - self._start

    def state_dict(self, consumed: int | None = None) -> dict:
        """Where this epoch stands. ``consumed`` = samples the caller has actually processed this
        epoch (pass ``batches_done * batch_size`` when DataLoader workers prefetch ahead); default:
        the samples this sampler has yielded."""
        return {"epoch": self.epoch, "consumed": int(self._yielded if consumed is None else consumed),
                "seed": self.seed, "world": self.world, "n": int(self.blocks.shape[0]), "shuffle": self.shuffle,
                "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration continues epoch ``state['epoch']`` after ``state['consumed']`` samples."""
        mine = self.state_dict()
        for k in ("seed", "world", "n", "shuffle", "window"):
            if k in state and state[k] != mine[k]:
                raise ValueError(f"sampler state has {k}={state[k]!r}, this sampler has {mine[k]!r}: cannot resume")
        self.epoch = int(state["epoch"])
        self._start = int(state["consumed"])
        self._yielded = self._start


def collate(items: list[dict[str, Any]]) -> GraphBatch:
    """Concatenate materials (from :class:`MaterialDataset`) into one disjoint graph with its line graph."""
    na = np.array([len(it["numbers"]) for it in items], dtype=np.int64)
    ne = np.array([len(it["edge_src"]) for it in items], dtype=np.int64)
    shift = np.repeat(np.cumsum(na) - na, ne)  # numpy: torch's CPU repeat_interleave is far slower
    src = np.concatenate([it["edge_src"] for it in items]).astype(np.int64) + shift
    dst = np.concatenate([it["edge_dst"] for it in items]).astype(np.int64) + shift
    A = int(na.sum())
    target = mask = None
    if all("spectrum" in it for it in items):
        target = torch.from_numpy(np.stack([np.asarray(it["spectrum"], dtype=np.float32) for it in items]))
        mask = torch.isfinite(target)
    cond = None
    if items and all(it.get("conditions") is not None for it in items):
        cond = torch.from_numpy(np.stack([np.asarray(it["conditions"], dtype=np.float32) for it in items]))
    src_t, dst_t = torch.from_numpy(src), torch.from_numpy(dst)
    return GraphBatch(
        atomic_numbers=torch.from_numpy(np.concatenate([it["numbers"] for it in items])).long(),
        edge_index=torch.stack([src_t, dst_t]),
        edge_vec=torch.from_numpy(np.concatenate([it["edge_vec"] for it in items]).astype(np.float32)),
        line_index=line_graph_index(src_t, dst_t, A),
        atom_batch=torch.from_numpy(np.repeat(np.arange(len(items), dtype=np.int64), na)),
        n_atoms=torch.from_numpy(na), n_edges=torch.from_numpy(ne),
        index=torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
        target=target, target_mask=mask, conditions=cond, ids=[str(it["id"]) for it in items],
    )


def make_loader(store_path: str | os.PathLike, indices: Sequence[int] | np.ndarray | None = None, batch_size: int = 16,
                shuffle: bool = True, seed: int = 0, rank: int = 0, world: int = 1, num_workers: int = 0,
                window: int = 2, drop_last: bool = False, pin_memory: bool = False, epoch: int = 0,
                multiprocessing_context: str | None = None) -> DataLoader:
    """A DataLoader of :class:`GraphBatch` over ``indices`` of the store (default all materials).

    The sampler is ``loader.sampler`` (a :class:`BlockShuffleSampler`: call ``set_epoch`` each epoch;
    ``state_dict``/``load_state_dict`` to resume). Each worker keeps ``window`` parts in memory."""
    ds = MaterialDataset(store_path, indices, cache_parts=window)
    sampler = BlockShuffleSampler(ds.part_of, shuffle=shuffle, seed=seed, rank=rank, world=world, window=window,
                                  drop_last=drop_last)
    sampler.set_epoch(epoch)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, persistent_workers=False,
                      multiprocessing_context=multiprocessing_context if num_workers > 0 else None)
