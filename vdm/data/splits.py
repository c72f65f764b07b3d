"""Training data: the processed uint8 arrays, memory-mapped, served in reproducible batches.

The global batch for step s depends only on (seed, s): each epoch is one shuffle of the whole
training set (torch's DistributedSampler with one replica, seeded with seed + epoch), cut into
consecutive global batches; under DDP process r of W takes slice r of each. So a run resumed
at step s sees exactly the batches an uninterrupted run would, whatever the process count.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from vdm.core.errors import UserError

PROCESSED_FIX = "restore it with `dvc checkout data/processed`, or rebuild it with `dvc repro preprocess`"


def load_images(path: str | os.PathLike, fix: str, size: int | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 images of a .npy another stage wrote, memory-mapped read-only, N >= 1,
    H = W (= `size` when given). Anything else (missing, empty, cut short or grown, not a .npy,
    pickled, another dtype or shape) is one UserError naming the file, then `fix` (which stage
    rebuilds it)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: {fix}")
    if not path.is_file():
        raise UserError(f"{path} is not a file: {fix}")
    nbytes = path.stat().st_size
    if nbytes == 0:
        raise UserError(f"{path} is empty (0 bytes: a copy or a write that stopped at its start): {fix}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "greater than file size" in str(e):  # the header promises more bytes than there are
            raise UserError(f"{path} is cut short ({nbytes} bytes, fewer than its header declares): {fix}") from None
        raise UserError(
            f"{path} is not a .npy array of images ({(str(e).splitlines() or [''])[0][:120]}): {fix}"
        ) from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path} cannot be read as a .npy array ({e}): {fix}") from None
    if not isinstance(arr, np.memmap):
        raise UserError(f"{path} is not a .npy array of images: {fix}")
    if arr.offset + arr.nbytes != nbytes:
        raise UserError(
            f"{path} is {nbytes} bytes but its header declares {arr.offset + arr.nbytes}: damaged or changed on "
            f"disk: {fix}"
        )
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[1] != arr.shape[2]:
        raise UserError(f"{path} holds {arr.dtype} {arr.shape}, expected square images (N, H, H, 3) uint8: {fix}")
    if len(arr) == 0:
        raise UserError(f"{path} holds no images (shape {arr.shape}): {fix}")
    if size is not None and arr.shape[1] != size:
        raise UserError(f"{path} holds {arr.shape[1]}x{arr.shape[2]} images, expected {size}x{size}: {fix}")
    return arr


def load_split(processed: str | os.PathLike, split: str, size: int | None = None) -> np.ndarray:
    """data/processed/<split>.npy: (N, H, W, 3) uint8, memory-mapped read-only, checked (load_images)."""
    return load_images(Path(processed) / f"{split}.npy", PROCESSED_FIX, size)


def to_nchw(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) uint8 (channels_last in memory). Arrays are copied
    (a memory-mapped slice is read-only); tensors are viewed."""
    t = torch.from_numpy(np.array(batch)) if isinstance(batch, np.ndarray) else batch
    return t.permute(0, 3, 1, 2)


def hflip_half(batch: torch.Tensor, gen: torch.Generator, rank: int = 0, world: int = 1) -> torch.Tensor:
    """(B, H, W, C): each image mirrored left-right with probability 1/2, drawn from gen (for the
    global batch of B x world images, of which this is slice `rank`)."""
    b = len(batch)
    flip = (torch.rand(b * world, generator=gen) < 0.5)[rank * b : (rank + 1) * b]
    if not bool(flip.any()):
        return batch
    out = batch.clone()
    out[flip] = torch.flip(batch[flip], dims=[2])
    return out


class _Range:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def train_groups(processed: str | os.PathLike, n: int) -> np.ndarray:
    """The group (Pokémon) of each of the n images of data/processed/train.npy, from manifest.csv:
    (n,) int, groups numbered from 0 in order of first appearance."""
    path = Path(processed) / "manifest.csv"
    if not path.is_file():
        raise UserError(f"{path} not found (train.decay_balance needs each image's Pokémon): {PROCESSED_FIX}")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("split") == "train"]
        index = {int(r["index"]): r["group"] for r in rows}
    except (KeyError, ValueError, TypeError, csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"{path} has no readable split, index and group columns ({e}): {PROCESSED_FIX}") from None
    if sorted(index) != list(range(n)):
        raise UserError(f"{path} lists {len(index)} training images but train.npy holds {n}: {PROCESSED_FIX}")
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(index[i], len(ids)) for i in range(n)], dtype=np.int64)


def balance_weights(groups: np.ndarray, power: float) -> np.ndarray:
    """Each image's chance of being drawn, proportional to (its group's image count)^-power: 0 every
    image alike (a group's share is its image count's), 1 every group alike (an image of a Pokémon
    with 112 images is drawn 1/112 as often as the only image of another)."""
    counts = np.bincount(groups)[groups].astype(np.float64)
    w = counts**-power
    return w / w.sum()


class StepBatches(torch.utils.data.Sampler):
    """Index lists for steps start..steps-1 (one list per step): each step's global batch of `batch`
    images comes from one seeded shuffle per epoch, whatever the process count; process `rank` of
    `world` takes slice `rank` of it (batch / world images). With `weights` (each image's chance),
    the steps from `weighted_from` on draw instead: each epoch n images with replacement by those
    chances, seeded by (seed, epoch) alone, so a resumed run still sees the same batches."""

    def __init__(
        self,
        n: int,
        batch: int,
        seed: int,
        start: int,
        steps: int,
        rank: int = 0,
        world: int = 1,
        weights: np.ndarray | None = None,
        weighted_from: int = 0,
    ):
        self.sampler = DistributedSampler(_Range(n), num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
        self.weights, self.weighted_from, self.seed = weights, weighted_from, seed
        if batch % world:
            raise UserError(
                f"train.batch_size = {batch} does not split evenly over {world} processes: "
                f"make it a multiple of {world} or change train.processes"
            )
        self.batch, self.start, self.steps, self.rank, self.local = batch, start, steps, rank, batch // world
        self.per_epoch = len(self.sampler) // batch
        if self.per_epoch == 0:
            raise UserError(
                f"train.batch_size = {batch} is larger than the training set's {len(self.sampler)} images: "
                "lower train.batch_size or use more data"
            )

    def __len__(self) -> int:
        return self.steps - self.start

    def _order(self, epoch: int, weighted: bool) -> list[int]:
        if not weighted:
            self.sampler.set_epoch(epoch)
            return list(self.sampler)
        gen = torch.Generator().manual_seed(self.seed + epoch + (1 << 40))  # apart from the shuffles' seeds
        return torch.multinomial(torch.from_numpy(self.weights), len(self.weights), True, generator=gen).tolist()

    def __iter__(self):
        epoch, order = None, None
        for step in range(self.start, self.steps):
            e, k = divmod(step, self.per_epoch)
            weighted = self.weights is not None and step >= self.weighted_from
            if (e, weighted) != epoch:
                epoch, order = (e, weighted), self._order(e, weighted)
            first = k * self.batch + self.rank * self.local
            yield order[first : first + self.local]


class ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[i]))

    def __getitems__(self, idx: list[int]) -> torch.Tensor:  # one fancy-indexed read per batch
        return torch.from_numpy(self.array[np.asarray(idx)])


def batch_loader(array: np.ndarray, sampler: StepBatches, num_workers: int, pin_memory: bool) -> DataLoader:
    """Yields (B, H, W, 3) uint8 tensors, one per step."""
    return DataLoader(
        ArrayDataset(array),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=lambda x: x,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
