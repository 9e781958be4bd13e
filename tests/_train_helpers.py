"""Small real datasets for the training / prediction tests (chains from shared/data/structures)."""

from __future__ import annotations

import csv
from pathlib import Path

from data.chains import manifest_row, save_chain
from data.structure import read_chain
from tests.shared_data import SHARED_STRUCTURES

STRUCTURES = SHARED_STRUCTURES


def make_dataset(out: Path, files: list[tuple[str, str]]) -> tuple[Path, Path]:
    """Write DATASET/{manifest.csv,chains/*.npz} and splits.csv for [(file, split)]; returns (dataset, splits)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "chains").mkdir(exist_ok=True)
    rows = []
    for name, split in files:
        chain = read_chain(STRUCTURES / name)
        chain_id = f"{chain.pdb_id.lower()}_{chain.chain}"
        save_chain(chain, out / "chains" / f"{chain_id}.npz")
        rows.append({**manifest_row(chain, name, f"chains/{chain_id}.npz"), "chain_id": chain_id, "_split": split})
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[k for k in rows[0] if k != "_split"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    splits = out / "splits.csv"
    with open(splits, "w", newline="") as handle:
        handle.write("chain_id,split,cluster\n")
        for i, row in enumerate(rows):
            for split in row["_split"].split("+"):
                handle.write(f"{row['chain_id']},{split},{i}\n")
    return out, splits
