"""The files of a dataset directory written by ``foldtune prepare`` (no torch needed to read or write them).

Layout (docs/design.md), format version ``DATASET_FORMAT``::

    DATASET/manifest.csv        chain_id,pdb_id,chain,length,n_observed,sequence_source,sequence,method,resolution,
                                release_date,source_file,npz
    DATASET/chains/<chain_id>.npz
    DATASET/errors.csv          file,chain,stage,reason

``length`` is the full (deposited) length N and ``n_observed`` the positions with a CA atom; ``sequence`` is
the full sequence. Format 2 (issue 11) stores full-length chains; format-1 datasets (observed residues only)
are refused with a one-line message asking to rerun ``foldtune prepare``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from data.io import atomic_path
from data.structure import ProteinChain

DATASET_FORMAT = 2
MANIFEST_COLUMNS = ["chain_id", "pdb_id", "chain", "length", "n_observed", "sequence_source", "sequence", "method",
                    "resolution", "release_date", "source_file", "npz"]
ERROR_COLUMNS = ["file", "chain", "stage", "reason"]
_NPZ_ARRAYS = ("aatype", "residue_index", "observed", "author_number", "insertion_code", "atom37_positions",
               "atom37_mask", "b_factors")
_NPZ_TEXT = ("sequence", "pdb_id", "chain", "method", "release_date", "source_file", "sequence_source", "sequence_note")
_REQUIRED = ("aatype", "residue_index", "observed", "author_number", "insertion_code", "atom37_positions",
             "atom37_mask", "sequence")


def _old_format(path: Path, found: str) -> ValueError:
    return ValueError(f"{path}: format: {found}, this foldtune reads dataset format {DATASET_FORMAT} "
                      f"(full-length chains); rerun `foldtune prepare`")


def save_chain(chain: ProteinChain, path: str | os.PathLike) -> None:
    """Write one chain as an uncompressed ``.npz`` (atomic). Text fields are 0-d str arrays."""
    payload = {key: np.asarray(getattr(chain, key)) for key in _NPZ_ARRAYS}
    payload["insertion_code"] = np.asarray(chain.insertion_code, dtype="<U1")
    payload["observed"] = np.asarray(chain.observed, dtype=bool)
    for key in _NPZ_TEXT:
        payload[key] = np.array(getattr(chain, key) or "")
    payload["model"] = np.array(chain.model, dtype=np.int64)
    payload["resolution"] = np.array(np.nan if chain.resolution is None else chain.resolution, dtype=np.float64)
    payload["format_version"] = np.array(DATASET_FORMAT, dtype=np.int64)
    with atomic_path(path) as tmp:
        np.savez(tmp, **payload)


def load_chain(npz_path: str | os.PathLike) -> ProteinChain:
    """Inverse of ``save_chain``. A chain file of another format version raises a one-line ValueError."""
    npz_path = Path(npz_path)
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{npz_path}: npz: unreadable ({exc})") from exc
    version = int(data["format_version"]) if "format_version" in data else 1
    if version != DATASET_FORMAT:
        raise _old_format(npz_path, f"chain file of dataset format {version}")
    for key in _REQUIRED:
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
        observed=data["observed"].astype(bool),
        author_number=data["author_number"].astype(np.int64),
        sequence_source=text("sequence_source") or "observed",
        sequence_note=text("sequence_note") or "",
    )


def read_manifest(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """``manifest.csv`` with string chain ids kept as written ("" for a blank chain, "NA" stays "NA")."""
    path = Path(dataset_dir) / "manifest.csv"
    if not path.is_file():
        raise ValueError(f"{path}: manifest: not found (run `foldtune prepare` first)")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "n_observed" not in frame.columns and {"chain_id", "length", "sequence"} <= set(frame.columns):
        raise _old_format(path, "manifest of dataset format 1 (no n_observed column)")
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: columns: missing {missing}")
    frame["length"] = frame["length"].astype(int)
    frame["n_observed"] = frame["n_observed"].astype(int)
    frame["resolution"] = pd.to_numeric(frame["resolution"].replace("", np.nan))
    return frame


def manifest_row(chain: ProteinChain, source_file: str | os.PathLike, npz: str | os.PathLike) -> dict:
    """The manifest.csv row of a written chain."""
    return {
        "chain_id": chain.chain_id, "pdb_id": chain.pdb_id, "chain": chain.chain, "length": len(chain),
        "n_observed": chain.n_observed, "sequence_source": chain.sequence_source, "sequence": chain.sequence,
        "method": chain.method or "", "resolution": "" if chain.resolution is None else chain.resolution,
        "release_date": chain.release_date or "", "source_file": str(source_file), "npz": str(npz),
    }


def chain_path(dataset_dir: str | os.PathLike, chain_id: str) -> Path:
    return Path(dataset_dir) / "chains" / f"{chain_id}.npz"
