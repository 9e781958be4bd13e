"""Train / val / test splits with no near-duplicate sequences across splits.

Identity convention: global alignment (Biopython ``PairwiseAligner``, BLOSUM62, gap open -11 / extend -1,
end gaps free so a fragment aligns inside its parent), identity = identical aligned pairs / length of the
*shorter* sequence. Chains are single-linkage clustered at ``identity >= threshold`` (union-find) and whole
clusters are assigned to one split, so no cross-split pair reaches the threshold. All-pairs alignment is
O(N²) (≈0.3 ms per pair of ~150-residue chains): fine up to a few thousand chains; beyond that pass an
external clustering (``read_clusters``: MMseqs2 ``easy-cluster`` TSV or ``chain_id,cluster`` CSV).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


@functools.lru_cache(maxsize=1)
def _aligner():
    from Bio.Align import PairwiseAligner, substitution_matrices

    aligner = PairwiseAligner(mode="global", substitution_matrix=substitution_matrices.load("BLOSUM62"),
                              open_gap_score=-11.0, extend_gap_score=-1.0)
    aligner.end_gap_score = 0.0
    return aligner


def sequence_identity(a: str, b: str) -> float:
    """Identical aligned pairs of the best global alignment / min(len(a), len(b)); 0 for an empty sequence."""
    if not a or not b:
        return 0.0
    if a == b:
        return 1.0
    alignment = _aligner().align(a, b)[0]
    return alignment.counts().identities / min(len(a), len(b))


def cluster_by_identity(chain_ids: Sequence[str], sequences: Sequence[str], threshold: float = 0.4,
                        progress: bool = False) -> dict[str, str]:
    """Single-linkage clusters ({chain_id: cluster name}); cluster name = its first chain id in sorted order."""
    n = len(chain_ids)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("align", total=n * (n - 1) // 2)
        for i in range(n):
            for j in range(i + 1, n):
                if find(i) != find(j) and sequence_identity(sequences[i], sequences[j]) >= threshold:
                    parent[find(j)] = find(i)
            bar.advance(task, n - i - 1)
    return _name_clusters(chain_ids, [find(i) for i in range(n)])


def _name_clusters(chain_ids: Sequence[str], roots: Sequence) -> dict[str, str]:
    members: dict = {}
    for chain_id, root in zip(chain_ids, roots):
        members.setdefault(root, []).append(chain_id)
    return {c: min(group) for group in members.values() for c in group}


def read_clusters(path: str | os.PathLike, chain_ids: Sequence[str]) -> dict[str, str]:
    """External clustering: a CSV with header ``chain_id,cluster``, or MMseqs2 ``easy-cluster`` output
    (``*_cluster.tsv``: representative<TAB>member, no header; FASTA headers must be chain ids).
    Chains missing from the file become singleton clusters."""
    path = Path(path)
    first = path.read_text().splitlines()[:1]
    if first and "chain_id" in first[0] and "cluster" in first[0]:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        mapping = dict(zip(frame["chain_id"], frame["cluster"]))
    else:
        frame = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)
        if frame.shape[1] < 2:
            raise ValueError(f"{path}: columns: expected chain_id,cluster CSV or representative<TAB>member TSV")
        mapping = dict(zip(frame[1], frame[0]))
    return _name_clusters(chain_ids, [mapping.get(c, f"__single__{c}") for c in chain_ids])


def assign_splits(clusters: dict[str, str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                  forced_test: set[str] = frozenset()) -> dict[str, str]:
    """{chain_id: split}. Clusters are visited in a seeded random order and each goes to the split furthest below
    its target chain count; clusters in ``forced_test`` go to test. With >= 3 clusters, val and test get at
    least one cluster and train keeps at least one."""
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions: need three non-negative numbers (train val test), got {list(fractions)}")
    weights = np.asarray(fractions, float) / sum(fractions)
    members: dict[str, list[str]] = {}
    for chain_id in sorted(clusters):
        members.setdefault(clusters[chain_id], []).append(chain_id)
    names = sorted(members)
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    counts = dict.fromkeys(SPLITS, 0)
    assignment: dict[str, str] = {}
    for name in order:
        if name in forced_test:
            assignment[name] = "test"
            counts["test"] += len(members[name])
    free = [name for name in order if name not in assignment]
    total = sum(len(members[name]) for name in free) + counts["test"]
    for name in free:
        deficit = [weights[k] * total - counts[s] for k, s in enumerate(SPLITS)]
        split = SPLITS[int(np.argmax(deficit))]
        assignment[name] = split
        counts[split] += len(members[name])
    by_split = {s: [n for n in order if assignment[n] == s] for s in SPLITS}

    def move(source: str, target: str) -> None:
        movable = [n for n in by_split[source] if n not in forced_test]
        smallest = min(movable, key=lambda n: (len(members[n]), n))
        by_split[source].remove(smallest)
        by_split[target].append(smallest)
        assignment[smallest] = target

    # tiny datasets: the deficit rule can leave a split empty
    if not by_split["train"]:
        donors = [s for s in ("val", "test") if [n for n in by_split[s] if n not in forced_test]]
        if donors:
            move(max(donors, key=lambda s: len(by_split[s])), "train")
    if len(names) >= 3:
        for split in ("val", "test"):
            if not by_split[split] and len(by_split["train"]) > 1:
                move("train", split)
    return {chain_id: assignment[cluster] for chain_id, cluster in clusters.items()}


def make_splits(manifest: pd.DataFrame, threshold: float = 0.4, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                seed: int = 0, clusters_file: str | os.PathLike | None = None, date_cutoff: str | None = None,
                progress: bool = False) -> pd.DataFrame:
    """DataFrame ``chain_id,split,cluster`` for every chain of a dataset manifest.

    ``date_cutoff`` (YYYY-MM-DD): a cluster holding any chain released after it goes to test as a whole (its
    earlier members too, so nothing similar stays in train); chains without a release date count as earlier.
    """
    chain_ids = manifest["chain_id"].tolist()
    if clusters_file is not None:
        clusters = read_clusters(clusters_file, chain_ids)
    else:
        clusters = cluster_by_identity(chain_ids, manifest["sequence"].tolist(), threshold, progress=progress)
    forced: set[str] = set()
    if date_cutoff:
        cutoff = pd.Timestamp(date_cutoff)
        released = pd.to_datetime(manifest["release_date"].replace("", None), errors="coerce")
        forced = {clusters[c] for c, date in zip(chain_ids, released) if pd.notna(date) and date > cutoff}
    splits = assign_splits(clusters, fractions, seed, forced_test=forced)
    frame = pd.DataFrame({"chain_id": chain_ids, "split": [splits[c] for c in chain_ids],
                          "cluster": [clusters[c] for c in chain_ids]})
    return frame


def max_cross_split_identity(manifest: pd.DataFrame, splits: pd.DataFrame) -> float:
    """Highest identity between two chains in different splits (a check; O(N²))."""
    sequences = dict(zip(manifest["chain_id"], manifest["sequence"]))
    split_of = dict(zip(splits["chain_id"], splits["split"]))
    ids = list(split_of)
    best = 0.0
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            if split_of[a] != split_of[b]:
                best = max(best, sequence_identity(sequences[a], sequences[b]))
    return best
