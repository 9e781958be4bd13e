"""Torch datasets and samplers over a dataset directory written by ``foldtune prepare``.

The directory's files (manifest.csv, chains/*.npz, errors.csv) are read and written by ``data.chains``, which
needs no torch; its functions are re-exported here for callers that already import torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from data.chains import (DATASET_FORMAT, ERROR_COLUMNS, MANIFEST_COLUMNS, chain_path, load_chain,  # noqa: F401
                         manifest_row, read_manifest, save_chain)
from data.structure import ProteinChain

# ------------------------------------------------------------------------------------------- crops
def crop_start(length: int, crop_size: int | None, seed: int, epoch: int, index: int,
               observed: np.ndarray | None = None) -> int:
    """Start of the contiguous crop of item ``index`` in ``epoch``, fixed by the seed: uniform over the starts
    whose window holds at least one observed position (every start when ``observed`` (length,) is None)."""
    if crop_size is None or length <= crop_size:
        return 0
    starts = np.arange(length - crop_size + 1)
    if observed is not None:
        seen = np.concatenate([[0], np.cumsum(np.asarray(observed, dtype=np.int64))])
        starts = starts[seen[starts + crop_size] - seen[starts] > 0]
        if starts.size == 0:
            raise ValueError(f"item {index}: no crop of {crop_size} holds an observed residue")
    rng = np.random.default_rng([seed, epoch, index])
    return int(starts[rng.integers(0, len(starts))])


class FoldingDataset(torch.utils.data.Dataset):
    """Cropped chains of a prepared dataset for structure training.

    Item ``i`` (a dict): ``aatype (L,) long``, ``residue_index (L,) long`` (deposited-sequence index),
    ``mask (L,) float`` (ones: every position of the crop is a residue the model sees), ``observed (L,) float``
    (1 = the position has coordinates), ``atom37_positions (L, 37, 3) float``, ``atom37_mask (L, 37) float``
    (zero where unobserved, so the losses ignore those positions), ``chain_id`` str, ``sequence`` str,
    ``crop_start`` int, ``resolution`` float (Å, NaN when the entry has none: NMR, predicted); L = min(length,
    crop_size). Crops are windows of the full sequence that hold at least
    one observed position. The crop depends only on (seed, epoch, i): call ``set_epoch(e)`` each epoch (as
    with DistributedSampler) to get new crops.
    """

    def __init__(self, dataset_dir: str | os.PathLike, chain_ids: Sequence[str] | None = None,
                 crop_size: int | None = None, seed: int = 0, cache: bool = True):
        self.dataset_dir = Path(dataset_dir)
        manifest = read_manifest(self.dataset_dir).set_index("chain_id", drop=False)
        if chain_ids is None:
            chain_ids = manifest["chain_id"].tolist()
        unknown = [c for c in chain_ids if c not in manifest.index]
        if unknown:
            raise ValueError(f"{self.dataset_dir / 'manifest.csv'}: chain_id: not in dataset: {unknown[:5]}")
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size: must be >= 1, got {crop_size}")
        self.chain_ids = list(chain_ids)
        self.full_lengths = [int(manifest.at[c, "length"]) for c in self.chain_ids]
        self._npz = [self.dataset_dir / manifest.at[c, "npz"] for c in self.chain_ids]
        self.crop_size = crop_size
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, ProteinChain] | None = {} if cache else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def lengths(self) -> list[int]:
        """Cropped lengths, for ``TokenBudgetBatchSampler``."""
        return [min(n, self.crop_size) if self.crop_size else n for n in self.full_lengths]

    def __len__(self) -> int:
        return len(self.chain_ids)

    def chain(self, index: int) -> ProteinChain:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        chain = load_chain(self._npz[index])
        if self._cache is not None:
            self._cache[index] = chain
        return chain

    def __getitem__(self, index: int) -> dict:
        chain = self.chain(index)
        start = crop_start(len(chain), self.crop_size, self.seed, self.epoch, index, observed=chain.observed)
        stop = start + (self.crop_size or len(chain))
        window = slice(start, min(stop, len(chain)))
        length = window.stop - window.start
        return {
            "aatype": torch.from_numpy(chain.aatype[window].copy()),
            "residue_index": torch.from_numpy(chain.residue_index[window].copy()),
            "mask": torch.ones(length, dtype=torch.float32),
            "observed": torch.from_numpy(chain.observed[window].astype(np.float32)),
            "atom37_positions": torch.from_numpy(chain.atom37_positions[window].copy()),
            "atom37_mask": torch.from_numpy(chain.atom37_mask[window].copy()),
            "chain_id": self.chain_ids[index],
            "sequence": chain.sequence[window],
            "crop_start": start,
            "resolution": float("nan") if chain.resolution is None else float(chain.resolution),
        }


def collate(items: Sequence[dict]) -> dict:
    """Pad a list of ``FoldingDataset`` items to the longest: ``aatype (B,L) long`` (pad 20 = X, masked),
    ``residue_index (B,L) long`` (pad 0), ``mask (B,L) float`` (1 = real residue), ``observed (B,L) float``,
    ``atom37_positions (B,L,37,3) float``, ``atom37_mask (B,L,37) float``, ``resolution (B,) float`` (Å, NaN
    unknown; the pLDDT loss's resolution filter), ``chain_id`` list[str]."""
    if not items:
        raise ValueError("collate: empty batch")
    batch, width = len(items), max(len(item["aatype"]) for item in items)
    out = {
        "aatype": torch.full((batch, width), 20, dtype=torch.long),
        "residue_index": torch.zeros((batch, width), dtype=torch.long),
        "mask": torch.zeros((batch, width), dtype=torch.float32),
        "observed": torch.zeros((batch, width), dtype=torch.float32),
        "atom37_positions": torch.zeros((batch, width, 37, 3), dtype=torch.float32),
        "atom37_mask": torch.zeros((batch, width, 37), dtype=torch.float32),
    }
    for row, item in enumerate(items):
        n = len(item["aatype"])
        for key in out:
            if key in item:  # items built elsewhere may lack "observed": then every position counts
                out[key][row, :n] = torch.as_tensor(item[key])
            elif key == "observed":
                out[key][row, :n] = 1.0
    out["resolution"] = torch.tensor([float(item.get("resolution", float("nan"))) for item in items],
                                     dtype=torch.float32)
    out["chain_id"] = [item["chain_id"] for item in items]
    return out


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Length-bucketed batches whose padded size ``len(batch) * max(lengths in batch) <= max_tokens``.

    Indices are sorted by length (ties broken at random when shuffling) and cut greedily, so each batch holds
    similar lengths; with ``shuffle`` the batch order is permuted per epoch (``set_epoch``). Every index appears
    exactly once per epoch. A single item longer than ``max_tokens`` forms its own batch (crop it instead).
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, shuffle: bool = True, seed: int = 0,
                 max_batch_size: int | None = None):
        if max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
        self.lengths = [int(n) for n in lengths]
        self.max_tokens = int(max_tokens)
        self.shuffle = shuffle
        self.seed = seed
        self.max_batch_size = max_batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        lengths = np.asarray(self.lengths)
        tiebreak = rng.random(len(lengths)) if self.shuffle else np.arange(len(lengths))
        order = np.lexsort((tiebreak, lengths))
        batches: list[list[int]] = []
        current: list[int] = []
        for index in order.tolist():
            longest = self.lengths[index]  # ascending order: the newcomer is the longest
            full = self.max_batch_size is not None and len(current) >= self.max_batch_size
            if current and ((len(current) + 1) * longest > self.max_tokens or full):
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class SequenceDataset(torch.utils.data.Dataset):
    """Sequences only, for the masked-LM path: items ``{"chain_id", "sequence"}`` (cropped like
    ``FoldingDataset``). Build from a dataset directory or from ``{chain_id: sequence}``; batch with
    ``collate_sequences`` (ESM tokens)."""

    def __init__(self, source: str | os.PathLike | dict[str, str], chain_ids: Sequence[str] | None = None,
                 crop_size: int | None = None, seed: int = 0):
        if isinstance(source, dict):
            sequences = dict(source)
        else:
            manifest = read_manifest(source)
            sequences = dict(zip(manifest["chain_id"], manifest["sequence"]))
        self.chain_ids = list(chain_ids) if chain_ids is not None else list(sequences)
        missing = [c for c in self.chain_ids if c not in sequences]
        if missing:
            raise ValueError(f"{source}: chain_id: not in dataset: {missing[:5]}")
        self.sequences = [sequences[c] for c in self.chain_ids]
        self.crop_size, self.seed, self.epoch = crop_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def lengths(self) -> list[int]:
        return [min(len(s), self.crop_size) if self.crop_size else len(s) for s in self.sequences]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict:
        sequence = self.sequences[index]
        start = crop_start(len(sequence), self.crop_size, self.seed, self.epoch, index)
        return {"chain_id": self.chain_ids[index], "sequence": sequence[start : start + (self.crop_size or len(sequence))]}


def collate_sequences(items: Sequence[dict]) -> dict:
    """``tokens (B, Lmax+2) long`` (fair-esm alphabet, pad 1), ``chain_id`` and ``sequence`` lists."""
    from data.tokenize import esm_tokens

    sequences = [item["sequence"] for item in items]
    return {"tokens": esm_tokens(sequences), "chain_id": [item["chain_id"] for item in items], "sequence": sequences}
