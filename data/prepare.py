"""Structure files -> dataset directory (manifest.csv, chains/<chain_id>.npz, errors.csv). Used by ``foldtune prepare``.

Chains are full length (``data.structure``); the length filters apply to the full length. A chain whose
deposited sequence could not be reconciled with its observed residues is still written (observed residues
only, ``sequence_source`` "observed") and gets a ``stage="sequence"`` warning row in errors.csv.
Needs no torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from data.chains import ERROR_COLUMNS, MANIFEST_COLUMNS, manifest_row, save_chain
from data.io import atomic_path
from data.structure import ProteinChain, nonfinite_atoms, read_chains

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")


@dataclass
class ChainFilters:
    min_len: int = 16
    max_len: int | None = 1024
    max_unknown: float = 0.1  # fraction of X residues
    max_resolution: float | None = None  # Å; chains without a resolution (NMR, predicted) pass

    def reason(self, chain: ProteinChain) -> str | None:
        """Why ``chain`` is rejected, or None. Lengths are full (deposited) lengths."""
        if len(chain) < self.min_len:
            return f"length {len(chain)} < min_len {self.min_len}"
        if self.max_len is not None and len(chain) > self.max_len:
            return f"length {len(chain)} > max_len {self.max_len}"
        if chain.unknown_fraction > self.max_unknown:
            return f"unknown fraction {chain.unknown_fraction:.2f} > max_unknown {self.max_unknown}"
        if self.max_resolution is not None and chain.resolution is not None and chain.resolution > self.max_resolution:
            return f"resolution {chain.resolution} > max_resolution {self.max_resolution}"
        return None


def mask_nonfinite_atoms(chain: ProteinChain) -> list[str]:
    """Mask (in place) the atoms of ``chain`` whose coordinates are NaN or ±inf: atom37_mask 0 and position 0,
    and a position whose CA is masked is no longer observed. Returns `nonfinite_atoms`' lines (for
    errors.csv)."""
    import numpy as np

    from data.residue_constants import atom_types

    bad, lines = nonfinite_atoms(chain)
    if not lines:
        return []
    positions = np.asarray(chain.atom37_positions)
    chain.atom37_positions = np.where(bad[..., None], np.float32(0.0), positions).astype(np.float32)
    chain.atom37_mask = np.where(bad, np.float32(0.0), chain.atom37_mask).astype(np.float32)
    ca = atom_types.index("CA")
    chain.observed = np.asarray(chain.observed, dtype=bool) & (chain.atom37_mask[:, ca] > 0)
    return lines


@dataclass
class PrepareSummary:
    chains_written: int = 0
    chains_rejected: int = 0
    chains_unreconciled: int = 0  # written with observed residues only: deposited sequence did not match
    atoms_masked: int = 0  # atoms with NaN / inf coordinates, masked (named in errors.csv, stage "coordinates")
    files_read: int = 0
    files_rejected: int = 0
    seconds: float = 0.0
    errors: list[dict] = field(default_factory=list)

    def line(self) -> str:
        return (f"prepare: {self.chains_written} chains written from {self.files_read} files; "
                f"{self.files_rejected} files rejected, {self.chains_rejected} chains filtered, "
                f"{self.chains_unreconciled} with an unreconciled deposited sequence (observed residues only); "
                + (f"{self.atoms_masked} atoms with non-finite coordinates masked; " if self.atoms_masked else "")
                + f"{self.seconds:.1f} s")


def is_structure_name(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith(STRUCTURE_SUFFIXES) and not path.name.startswith(".")


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named directly (any suffix) plus structure files found under directories (recursively), sorted."""
    files: list[Path] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and is_structure_name(p)))
        else:
            files.append(path)  # a missing file becomes an error row, not a crash
    seen, unique = set(), []
    for path in files:
        key = str(path.resolve()) if path.exists() else str(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


# fetch_report.csv statuses whose file this fetch delivered (the others: failed, filtered).
DELIVERED = ("downloaded", "cached", "local")


def read_fetch_report(path: str | os.PathLike) -> list[Path]:
    """The structure files a `foldtune fetch` delivered, per its ``fetch_report.csv`` (rows whose status is
    one of `DELIVERED`), sorted by path without repeats, as `collect_inputs` orders a directory (the dataset's
    chain order, and so training, must not depend on the order the ids were fetched in). A file named by the
    report is looked up beside the report first (its --out directory), then at the path as written. Files in
    that directory the report does not list (an earlier fetch's, or ids now filtered) are not returned: the
    dataset is exactly this fetch."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: fetch report: not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: fetch report: not a CSV ({exc})") from None
    if not {"status", "path"} <= set(frame.columns):
        raise ValueError(f"{path}: columns: need status,path (a foldtune fetch report; got {list(frame.columns)})")
    files: list[Path] = []
    for row in frame.itertuples():
        if row.status not in DELIVERED or not row.path:
            continue
        beside = path.parent / Path(row.path).name
        file = beside if beside.is_file() else Path(row.path)
        if file not in files:
            files.append(file)
    return sorted(files)


def _file_keys(path: Path) -> set[str]:
    name = path.name
    keys = {name, name[:-3] if name.endswith(".gz") else name}
    return keys | {k.rsplit(".", 1)[0] for k in list(keys)}


class ChainSelection(dict):
    """{file name key: chains} of a chains file, and `files`: the base names its rows give (reported when
    no input has that name)."""

    files: dict[str, set[str]]


def read_chains_file(path: str | os.PathLike) -> dict[str, set[str]]:
    """``file,chain`` CSV -> {file name (basename, with and without suffixes): chains}; chain "" or "_" = blank.
    The result's `files` holds each row's base name with its chains."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"file", "chain"} <= set(frame.columns):
        raise ValueError(f"{path}: columns: need file,chain (got {list(frame.columns)})")
    wanted = ChainSelection()
    wanted.files = {}
    for row in frame.itertuples():
        chain = "" if row.chain.strip() in ("", "_", "(blank)") else row.chain.strip()
        wanted.files.setdefault(Path(row.file).name, set()).add(chain)
        for key in _file_keys(Path(row.file)):
            wanted.setdefault(key, set()).add(chain)
    return wanted


def prepare_dataset(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                    filters: ChainFilters | None = None, chains: dict[str, set[str]] | None = None,
                    model: int = 1, progress: bool = True) -> PrepareSummary:
    """Parse, clean, filter and write every protein chain of ``inputs``; every failure becomes an errors.csv row."""
    from rich.progress import Progress

    started = time.perf_counter()
    filters = filters or ChainFilters()
    out_dir = Path(out_dir)
    (out_dir / "chains").mkdir(parents=True, exist_ok=True)
    files = collect_inputs(inputs)
    summary = PrepareSummary()
    rows: list[dict] = []
    written: dict[str, str] = {}

    def reject(file: Path | str, chain: str, stage: str, reason: str) -> None:
        summary.errors.append({"file": str(file), "chain": chain, "stage": stage, "reason": reason})

    if chains is not None:
        files = [f for f in files if _file_keys(f) & chains.keys()]
        # A chains-file row whose file is not among the inputs (a typo, an id the fetch did not deliver).
        present = set().union(*(_file_keys(f) for f in files)) if files else set()
        for name, wanted_chains in sorted(getattr(chains, "files", {}).items()):
            if not _file_keys(Path(name)) & present:
                reject(name, ",".join(sorted(c or "_" for c in wanted_chains)), "select",
                       f"{name}: file: named by the chains file but not among the inputs")
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("prepare", total=len(files))
        for path in files:
            bar.advance(task)
            try:
                if not path.is_file():
                    raise ValueError(f"{path}: file: not found")
                parsed = read_chains(path, model=model, require_terminator=True)
            except ValueError as exc:
                summary.files_rejected += 1
                reject(path, "", "parse", str(exc))
                continue
            except Exception as exc:  # never lose the run for one file
                summary.files_rejected += 1
                reject(path, "", "parse", f"{path}: {type(exc).__name__}: {exc}")
                continue
            summary.files_read += 1
            wanted = None
            if chains is not None:
                wanted = set().union(*(chains[k] for k in _file_keys(path) if k in chains))
                found = {c.chain for c in parsed}
                for missing in sorted(wanted - found):
                    reject(path, missing, "select", f"{path}: chain: no protein chain {missing!r} in file")
            for chain in parsed:
                if wanted is not None and chain.chain not in wanted:
                    continue
                reason = filters.reason(chain)
                if reason is None and chain.chain_id in written:
                    reason = f"duplicate chain_id {chain.chain_id} (already from {written[chain.chain_id]})"
                    stage = "dedupe"
                else:
                    stage = "filter"
                if reason is not None:
                    summary.chains_rejected += 1
                    reject(path, chain.chain, stage, reason)
                    continue
                before = int((chain.atom37_mask > 0).sum())
                for residue in mask_nonfinite_atoms(chain):
                    reject(path, chain.chain, "coordinates", f"{path}: chain {chain.chain or '_'}: {residue}: "
                           "non-finite (NaN/inf) coordinates; atoms masked")
                summary.atoms_masked += before - int((chain.atom37_mask > 0).sum())
                if not chain.n_observed:
                    summary.chains_rejected += 1
                    reject(path, chain.chain, "coordinates", f"{path}: chain {chain.chain or '_'}: no residue with "
                           "a finite CA left")
                    continue
                npz = Path("chains") / f"{chain.chain_id}.npz"
                save_chain(chain, out_dir / npz)
                written[chain.chain_id] = str(path)
                rows.append(manifest_row(chain, path, npz))
                if chain.unreconciled:
                    summary.chains_unreconciled += 1
                    reject(path, chain.chain, "sequence", f"{path}: chain {chain.chain or '_'}: "
                           f"{chain.sequence_note}; written with its {chain.n_observed} observed residues only")
    summary.chains_written = len(rows)
    with atomic_path(out_dir / "manifest.csv") as tmp:
        pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(tmp, index=False)
    with atomic_path(out_dir / "errors.csv") as tmp:
        pd.DataFrame(summary.errors, columns=ERROR_COLUMNS).to_csv(tmp, index=False)
    summary.seconds = time.perf_counter() - started
    return summary
