"""The dataset directory written by ``foldtune prepare`` and the torch datasets / samplers that read it.

Layout (docs/design.md)::

    DATASET/manifest.csv        chain_id,pdb_id,chain,length,sequence,method,resolution,release_date,source_file,npz
    DATASET/chains/<chain_id>.npz
    DATASET/errors.csv          file,chain,stage,reason
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from data.io import atomic_path
from data.structure import ProteinChain

MANIFEST_COLUMNS = ["chain_id", "pdb_id", "chain", "length", "sequence", "method", "resolution",
                    "release_date", "source_file", "npz"]
ERROR_COLUMNS = ["file", "chain", "stage", "reason"]
_NPZ_ARRAYS = ("aatype", "residue_index", "insertion_code", "atom37_positions", "atom37_mask", "b_factors")
_NPZ_TEXT = ("sequence", "pdb_id", "chain", "method", "release_date", "source_file")


# ------------------------------------------------------------------------------------------- chain files
def save_chain(chain: ProteinChain, path: str | os.PathLike) -> None:
    """Write one chain as an uncompressed ``.npz`` (atomic). Text fields are 0-d str arrays."""
    payload = {key: getattr(chain, key) for key in _NPZ_ARRAYS}
    payload["insertion_code"] = np.asarray(chain.insertion_code, dtype="<U1")
    for key in _NPZ_TEXT:
        payload[key] = np.array(getattr(chain, key) or "")
    payload["model"] = np.array(chain.model, dtype=np.int64)
    payload["resolution"] = np.array(np.nan if chain.resolution is None else chain.resolution, dtype=np.float64)
    with atomic_path(path) as tmp:
        np.savez(tmp, **payload)


def load_chain(npz_path: str | os.PathLike) -> ProteinChain:
    """Inverse of ``save_chain``; the keys of docs/design.md are required, the rest optional."""
    npz_path = Path(npz_path)
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{npz_path}: npz: unreadable ({exc})") from exc
    for key in ("aatype", "residue_index", "insertion_code", "atom37_positions", "atom37_mask", "sequence"):
        if key not in data:
            raise ValueError(f"{npz_path}: {key}: missing from chain file")
    length = len(data["aatype"])

    def text(key: str) -> str | None:
        return str(data[key]) or None if key in data else None

    resolution = float(data["resolution"]) if "resolution" in data else float("nan")
    stem_pdb, _, stem_chain = npz_path.stem.rpartition("_")
    return ProteinChain(
        pdb_id=text("pdb_id") or stem_pdb.upper(),
        chain=str(data["chain"]) if "chain" in data else stem_chain,
        model=int(data["model"]) if "model" in data else 1,
        sequence=str(data["sequence"]),
        aatype=data["aatype"].astype(np.int64),
        residue_index=data["residue_index"].astype(np.int64),
        insertion_code=data["insertion_code"].astype("<U1"),
        atom37_positions=data["atom37_positions"].astype(np.float32),
        atom37_mask=data["atom37_mask"].astype(np.float32),
        b_factors=data["b_factors"].astype(np.float32) if "b_factors" in data else np.zeros((length, 37), np.float32),
        method=text("method"),
        resolution=None if np.isnan(resolution) else resolution,
        release_date=text("release_date"),
        source_file=text("source_file") or "",
    )


def read_manifest(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """``manifest.csv`` with string chain ids kept as written ("" for a blank chain, "NA" stays "NA")."""
    path = Path(dataset_dir) / "manifest.csv"
    if not path.is_file():
        raise ValueError(f"{path}: manifest: not found (run `foldtune prepare` first)")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: columns: missing {missing}")
    frame["length"] = frame["length"].astype(int)
    frame["resolution"] = pd.to_numeric(frame["resolution"].replace("", np.nan))
    return frame


def chain_path(dataset_dir: str | os.PathLike, chain_id: str) -> Path:
    return Path(dataset_dir) / "chains" / f"{chain_id}.npz"


# ------------------------------------------------------------------------------------------- crops
def crop_start(length: int, crop_size: int | None, seed: int, epoch: int, index: int) -> int:
    """Start of the contiguous crop of item ``index`` in ``epoch``: uniform over valid starts, fixed by the seed."""
    if crop_size is None or length <= crop_size:
        return 0
    rng = np.random.default_rng([seed, epoch, index])
    return int(rng.integers(0, length - crop_size + 1))


class FoldingDataset(torch.utils.data.Dataset):
    """Cropped chains of a prepared dataset for structure training.

    Item ``i`` (a dict): ``aatype (L,) long``, ``residue_index (L,) long``, ``mask (L,) float`` (ones),
    ``atom37_positions (L, 37, 3) float``, ``atom37_mask (L, 37) float``, ``chain_id`` str, ``sequence`` str,
    ``crop_start`` int; L = min(length, crop_size). The crop depends only on (seed, epoch, i): call
    ``set_epoch(e)`` each epoch (as with DistributedSampler) to get new crops.
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
        start = crop_start(len(chain), self.crop_size, self.seed, self.epoch, index)
        stop = start + (self.crop_size or len(chain))
        window = slice(start, min(stop, len(chain)))
        length = window.stop - window.start
        return {
            "aatype": torch.from_numpy(chain.aatype[window].copy()),
            "residue_index": torch.from_numpy(chain.residue_index[window].copy()),
            "mask": torch.ones(length, dtype=torch.float32),
            "atom37_positions": torch.from_numpy(chain.atom37_positions[window].copy()),
            "atom37_mask": torch.from_numpy(chain.atom37_mask[window].copy()),
            "chain_id": self.chain_ids[index],
            "sequence": chain.sequence[window],
            "crop_start": start,
        }


def collate(items: Sequence[dict]) -> dict:
    """Pad a list of ``FoldingDataset`` items to the longest: ``aatype (B,L) long`` (pad 20 = X, masked),
    ``residue_index (B,L) long`` (pad 0), ``mask (B,L) float`` (1 = real residue),
    ``atom37_positions (B,L,37,3) float``, ``atom37_mask (B,L,37) float``, ``chain_id`` list[str]."""
    if not items:
        raise ValueError("collate: empty batch")
    batch, width = len(items), max(len(item["aatype"]) for item in items)
    out = {
        "aatype": torch.full((batch, width), 20, dtype=torch.long),
        "residue_index": torch.zeros((batch, width), dtype=torch.long),
        "mask": torch.zeros((batch, width), dtype=torch.float32),
        "atom37_positions": torch.zeros((batch, width, 37, 3), dtype=torch.float32),
        "atom37_mask": torch.zeros((batch, width, 37), dtype=torch.float32),
    }
    for row, item in enumerate(items):
        n = len(item["aatype"])
        for key in out:
            out[key][row, :n] = torch.as_tensor(item[key])
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
