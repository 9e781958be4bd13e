"""Score predicted structures against references: residue matching + the metrics of ``pipeline.metrics``.

- :func:`match_residues` pairs model and reference residues by their deposited-sequence index
  (``align="index"``), by author residue number + insertion code (``"number"``, like ``TMscore``) or by a
  global sequence alignment (``"sequence"``, like ``TMscore -seq``). The default ``"auto"`` uses the index
  when both chains carry the same deposited sequence (a dataset native and a ``foldtune predict`` PDB, both
  mmCIF/SEQRES files), else the number.
- Scores are normalised by the reference's observed residues: unobserved native positions (gaps) are not
  counted, as the TMscore program scores a full-length model against a native with missing residues.
- :func:`score_chains` / :func:`score_pair` return one dict with :data:`METRIC_KEYS`.
- :func:`score_table` scores a CSV of pairs (batch mode); :func:`score_predictions` scores a prediction
  directory against a dataset (workflow mode, docs/design.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from data.structure import ProteinChain, nonfinite_atoms, read_chain
from pipeline import metrics

METRIC_KEYS: tuple[str, ...] = ("tm_score", "gdt_ts", "gdt_ha", "rmsd", "lddt", "lddt_ca", "n_aligned", "l_ref")
ALIGN_MODES: tuple[str, ...] = ("auto", "index", "number", "sequence")


def _describe(chain: ProteinChain) -> str:
    return chain.source_file or f"{chain.pdb_id}_{chain.chain}"


def shares_deposited_sequence(model: ProteinChain, ref: ProteinChain) -> bool:
    """Both chains are positions of the same deposited sequence, so equal ``residue_index`` = same residue."""
    return model.has_deposited_sequence and ref.has_deposited_sequence and model.sequence == ref.sequence


def resolve_align(model: ProteinChain, ref: ProteinChain, align: str) -> str:
    """``"auto"`` -> ``"index"`` when :func:`shares_deposited_sequence`, else ``"number"``."""
    if align not in ALIGN_MODES:
        raise ValueError(f"align: must be one of {ALIGN_MODES}, got {align!r}")
    if align == "auto":
        return "index" if shares_deposited_sequence(model, ref) else "number"
    return align


def match_residues(model: ProteinChain, ref: ProteinChain, align: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(model_idx, ref_idx)`` of matched residues, in model order.

    ``align="index"``: the same position of the shared deposited sequence (ValueError unless both chains carry
    it). ``align="number"``: same author residue number and insertion code (each model residue takes the
    first reference residue with that key, as TMscore does). ``align="sequence"``: global alignment of the
    two sequences (Biopython PairwiseAligner, BLOSUM62, gap open -11 / extend -1, free end gaps); aligned
    positions are matched whatever their residue numbers. ``"auto"``: see :func:`resolve_align`.
    """
    align = resolve_align(model, ref, align)
    if align == "index":
        if not shares_deposited_sequence(model, ref):
            raise ValueError(f"{_describe(model)} vs {_describe(ref)}: align: 'index' needs both chains to carry "
                             f"the same deposited sequence (sources {model.sequence_source}/{ref.sequence_source})")
        pairs = [(i, i) for i in range(len(ref.sequence))]
    elif align == "number":
        first: dict[tuple[int, str], int] = {}
        for j, key in enumerate(zip(ref.author_number.tolist(), ref.insertion_code.tolist())):
            first.setdefault((int(key[0]), str(key[1]).strip()), j)
        pairs = [
            (i, first[(int(number), str(code).strip())])
            for i, (number, code) in enumerate(zip(model.author_number.tolist(), model.insertion_code.tolist()))
            if (int(number), str(code).strip()) in first
        ]
    elif align == "sequence":
        pairs = _sequence_pairs(model.sequence, ref.sequence)
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    model_idx, ref_idx = (np.asarray(v, dtype=np.int64) for v in zip(*pairs))
    return model_idx, ref_idx


def _sequence_pairs(model_seq: str, ref_seq: str) -> list[tuple[int, int]]:
    from Bio.Align import PairwiseAligner, substitution_matrices

    aligner = PairwiseAligner()
    aligner.mode = "global"
    aligner.substitution_matrix = substitution_matrices.load("BLOSUM62")
    aligner.open_gap_score, aligner.extend_gap_score = -11.0, -1.0
    aligner.end_gap_score = 0.0  # a model may cover more or less than the reference
    alignment = aligner.align(model_seq, ref_seq)[0]
    pairs = []
    for (m_lo, m_hi), (r_lo, r_hi) in zip(*alignment.aligned):
        pairs.extend(zip(range(m_lo, m_hi), range(r_lo, r_hi)))
    return pairs


class ReferenceContacts:
    """lDDT pair lists of reference chains (:func:`pipeline.metrics.lddt_contacts`), computed once per chain.

    Batch scoring compares many models with a few references; the pair search is most of lDDT's work. Keys
    are the chain objects' ids, and each entry keeps its chain alive so that an id is never reused.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[ProteinChain, tuple, tuple]] = {}

    def get(self, ref: ProteinChain) -> tuple[tuple, tuple]:
        """(all-atom contacts, CA contacts) of ``ref``."""
        entry = self._entries.get(id(ref))
        if entry is None or entry[0] is not ref:
            entry = (ref, metrics.lddt_contacts(ref.atom37_positions, ref.atom37_mask, aatype=ref.aatype),
                     metrics.lddt_contacts(ref.atom37_positions, ref.atom37_mask, ca_only=True))
            self._entries[id(ref)] = entry
        return entry[1], entry[2]


def score_chains(model: ProteinChain, ref: ProteinChain, align: str = "auto",
                 contacts: ReferenceContacts | None = None) -> dict:
    """All metrics of ``model`` against ``ref`` (normalised by the reference's observed residues).

    Returns a dict with ``tm_score, gdt_ts, gdt_ha, rmsd`` (CA, TMscore search / Kabsch RMSD over the
    matched residues), ``lddt`` (all-atom) and ``lddt_ca`` (OST conventions; reference residues missing
    in the model count as not preserved), ``n_aligned`` and ``l_ref``.
    ``contacts``: a :class:`ReferenceContacts` shared by the calls of a batch (same values, less work).
    Raises ValueError naming both structures when no residue can be matched.
    """
    for chain in (model, ref):  # NaN/inf would end in the SVD of the superposition, far from the cause
        _require_finite(chain)
    model_idx, ref_idx = match_residues(model, ref, align)
    ca = metrics.CA_INDEX
    has_ca = (model.atom37_mask[model_idx, ca] > 0) & (ref.atom37_mask[ref_idx, ca] > 0)
    model_idx, ref_idx = model_idx[has_ca], ref_idx[has_ca]
    if model_idx.size == 0:
        raise ValueError(
            f"{_describe(model)} vs {_describe(ref)}: residues: no common residues "
            f"(align={align!r}; model numbers {_span(model)}, reference numbers {_span(ref)})"
        )
    l_ref = int((ref.atom37_mask[:, ca] > 0).sum())
    _warn_if_other_protein(model, ref, model_idx, ref_idx, align)
    found = metrics.tm_score(
        model.atom37_positions[model_idx, ca], ref.atom37_positions[ref_idx, ca], l_ref=l_ref
    )
    # Model atoms laid out on the reference residues; unmatched reference residues stay masked.
    pred_pos = np.zeros_like(ref.atom37_positions)
    pred_mask = np.zeros_like(ref.atom37_mask)
    pred_pos[ref_idx] = model.atom37_positions[model_idx]
    same_type = model.aatype[model_idx] == ref.aatype[ref_idx]
    # A mutated residue keeps only the atoms both residue types share (by atom37 name).
    pred_mask[ref_idx] = model.atom37_mask[model_idx] * np.where(same_type[:, None], 1.0, ref.atom37_mask[ref_idx])
    all_atom, ca = (contacts or ReferenceContacts()).get(ref)
    lddt_all = metrics.lddt(pred_pos, ref.atom37_positions, pred_mask, ref.atom37_mask, aatype=ref.aatype,
                            contacts=all_atom)
    lddt_ca = metrics.lddt(pred_pos, ref.atom37_positions, pred_mask, ref.atom37_mask, ca_only=True, contacts=ca)
    return {
        "tm_score": found["tm_score"],
        "gdt_ts": found["gdt_ts"],
        "gdt_ha": found["gdt_ha"],
        "rmsd": found["rmsd"],
        "lddt": lddt_all,
        "lddt_ca": lddt_ca,
        "n_aligned": int(model_idx.size),
        "l_ref": l_ref,
    }


class ScoreWarning(UserWarning):
    """A score that is computed but probably not what was meant (`foldtune score` prints it as one line)."""


# Matched residues of another type than this fraction: two different proteins matched by number, not mutants.
MISMATCH_WARNING = 0.1


def _warn_if_other_protein(model: ProteinChain, ref: ProteinChain, model_idx: np.ndarray, ref_idx: np.ndarray,
                           align: str) -> None:
    mode = resolve_align(model, ref, align)
    if mode == "sequence":
        return
    differ = int((model.aatype[model_idx] != ref.aatype[ref_idx]).sum())
    if differ > MISMATCH_WARNING * model_idx.size:
        import warnings

        warnings.warn(f"{_describe(model)} vs {_describe(ref)}: {differ} of {model_idx.size} residues matched by "
                      f"{mode} differ in type (other proteins?); --align sequence "
                      "matches them by a sequence alignment", ScoreWarning, stacklevel=3)


def _require_finite(chain: ProteinChain) -> None:
    _, residues = nonfinite_atoms(chain)
    if residues:
        more = f" (and {len(residues) - 1} more residues)" if len(residues) > 1 else ""
        raise ValueError(f"{_describe(chain)}: chain {chain.chain or '_'}: coordinates: non-finite (NaN/inf) at "
                         f"{residues[0]}{more}")


def _span(chain: ProteinChain) -> str:
    if len(chain.author_number) == 0:
        return "none"
    return f"{int(chain.author_number.min())}..{int(chain.author_number.max())}"


def score_pair(
    model_path: str | os.PathLike,
    ref_path: str | os.PathLike,
    chain1: str | None = None,
    chain2: str | None = None,
    model1: int = 1,
    model2: int = 1,
    align: str = "auto",
) -> dict:
    """Read ``model_path`` (chain1, model1) and ``ref_path`` (chain2, model2) and :func:`score_chains` them."""
    return _score_files(model_path, ref_path, chain1, chain2, model1, model2, align, read_chain)


def _score_files(model_path, ref_path, chain1, chain2, model1: int, model2: int, align: str, read: Callable,
                 contacts: ReferenceContacts | None = None) -> dict:
    """:func:`score_pair` with the chain reader as a parameter (``read(path, chain=, model=)``)."""
    model = read(model_path, chain=chain1, model=model1)
    ref = read(ref_path, chain=chain2, model=model2)
    try:
        return score_chains(model, ref, align=align, contacts=contacts)
    except ValueError as exc:
        if "no common residues" in str(exc):
            raise ValueError(f"{model_path} vs {ref_path}: residues: no common residues (align={align!r})") from exc
        raise


def _cached_reader() -> Callable:
    """A :func:`read_chain` that parses each (file, chain, model) once.

    Batch tables score many models against a few references (every method's predictions against the same
    natives), and parsing a PDB file with Biopython costs about as much as scoring the pair. The key holds
    the resolved path and the file's mtime and size, so a file rewritten during the run is read again.
    Chains are shared between rows: scoring only reads them.
    """
    cache: dict[tuple, ProteinChain] = {}

    def read(path, chain: str | None = None, model: int = 1) -> ProteinChain:
        try:
            resolved = Path(path).resolve()
            stat = resolved.stat()
        except OSError:
            return read_chain(path, chain=chain, model=model)  # raises read_chain's own error
        key = (str(resolved), stat.st_mtime_ns, stat.st_size, chain, model)
        if key not in cache:
            cache[key] = read_chain(path, chain=chain, model=model)  # the path as given: messages name it
        return cache[key]

    return read


def _progress(total: int, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        transient=False,
    )
    return progress, progress.add_task(description, total=total)


ERROR_COLUMN = "error"  # batch tables: "" for a scored row, else why it could not be scored

# Seconds to import numba and load the cached kernels (~0.5-0.9 s on a 2-core machine), and the share of a
# row's time they save on ~300-residue pairs (about half: the TM search and lDDT, not parsing).
COMPILED_LOAD_S, COMPILED_SAVING = 1.0, 0.5


def worth_compiling(rows_done: int, rows_left: int, seconds_so_far: float) -> bool:
    """Whether the rows left, at this call's pace so far, save more than loading the compiled kernels costs."""
    return rows_done > 0 and rows_left * (seconds_so_far / rows_done) * COMPILED_SAVING > COMPILED_LOAD_S


def _run_rows(rows: Iterable, n_rows: int, score_row: Callable, description: str, show_progress: bool,
              key: Callable) -> list[dict]:
    """score_row(row) for every row; a row that cannot be scored (bad file, NaN coordinates, no common
    residues) becomes `key(row)` + its error message, so the others are still scored. Switches to the
    compiled kernels (same values) once they are worth their load time (:func:`worth_compiling`): a table
    of a few small pairs stays on NumPy."""
    import time

    records: list[dict] = []
    start, compiled = time.perf_counter(), False

    def guarded(row) -> dict:
        try:
            return {**score_row(row), ERROR_COLUMN: ""}
        except (ValueError, OSError, np.linalg.LinAlgError) as exc:
            return {**key(row), ERROR_COLUMN: str(exc) or type(exc).__name__}

    def one(row) -> None:
        nonlocal compiled
        records.append(guarded(row))
        if not compiled and worth_compiling(len(records), n_rows - len(records), time.perf_counter() - start):
            compiled = True
            metrics.use_compiled_kernels()

    if show_progress:
        progress, task = _progress(n_rows, description)
        with progress:
            for row in rows:
                one(row)
                progress.advance(task)
    else:
        for row in rows:
            one(row)
    return records


def _cell(row, name: str):
    value = row.get(name) if hasattr(row, "get") else None
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    return str(value).strip()


def score_table(
    pairs_csv: str | os.PathLike,
    out_csv: str | os.PathLike,
    align: str = "auto",
    show_progress: bool = True,
):
    """Batch mode: score every row ``id,model,ref[,chain1,chain2]`` of ``pairs_csv`` into ``out_csv``.

    Relative paths are resolved against the CSV's folder; each structure file is parsed once per call
    (:func:`_cached_reader`). The output (columns ``id`` + metric keys) is written atomically; returns the
    DataFrame.
    """
    import pandas as pd

    from data.io import atomic_path

    pairs_csv = Path(pairs_csv)
    table = pd.read_csv(pairs_csv, dtype=str, keep_default_na=False)
    missing = {"id", "model", "ref"} - set(table.columns)
    if missing:
        raise ValueError(f"{pairs_csv}: columns: missing {sorted(missing)} (need id,model,ref[,chain1,chain2])")
    base = pairs_csv.parent

    def resolve(path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else base / p

    read = _cached_reader()  # for this call only: files may change between calls
    contacts = ReferenceContacts()  # keyed by the cached chains: one pair search per reference

    def score_row(row) -> dict:
        result = _score_files(
            resolve(row["model"]), resolve(row["ref"]), _cell(row, "chain1"), _cell(row, "chain2"), 1, 1, align, read,
            contacts,
        )
        return {"id": row["id"], **result}

    rows = [row for _, row in table.iterrows()]
    records = _run_rows(rows, len(rows), score_row, "scoring", show_progress, key=lambda row: {"id": row["id"]})
    frame = pd.DataFrame(records, columns=["id", *METRIC_KEYS, ERROR_COLUMN])
    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def _load_native(npz_path: Path) -> ProteinChain:
    """Native chain of a dataset (``data.chains.load_chain``; an old-format dataset gets its one-line error)."""
    from data.chains import load_chain

    return load_chain(npz_path)


def score_predictions(
    predictions_csv: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    out_csv: str | os.PathLike,
    align: str = "auto",
    show_progress: bool = True,
):
    """Workflow mode: score ``PRED_DIR/predictions.csv`` rows against the dataset natives.

    Each row's ``pdb`` (relative to the CSV's folder unless absolute) is scored against
    ``DATASET/chains/<chain_id>.npz`` (path from ``manifest.csv``'s ``npz`` column when present). Output
    columns: ``chain_id`` + metric keys + ``mean_plddt``; written atomically. Returns the DataFrame.
    """
    import pandas as pd

    from data.io import atomic_path

    predictions_csv, dataset_dir = Path(predictions_csv), Path(dataset_dir)
    table = pd.read_csv(predictions_csv, dtype={"chain_id": str, "pdb": str}, keep_default_na=False)
    for column in ("chain_id", "pdb"):
        if column not in table.columns:
            raise ValueError(f"{predictions_csv}: {column}: missing column (need chain_id,pdb[,mean_plddt])")
    manifest_path = dataset_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path}: file: dataset manifest not found")
    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False).set_index("chain_id", drop=False)

    def native_path(chain_id: str) -> Path:
        if chain_id not in manifest.index:
            raise ValueError(f"{manifest_path}: chain_id: {chain_id!r} (from {predictions_csv}) not in the dataset")
        npz = manifest.loc[chain_id].get("npz", "") if "npz" in manifest.columns else ""
        path = Path(npz) if npz else Path("chains") / f"{chain_id}.npz"
        return path if path.is_absolute() else dataset_dir / path

    natives: dict[Path, ProteinChain] = {}  # several runs' predictions of one chain share its native
    contacts = ReferenceContacts()

    def score_row(row) -> dict:
        pdb = Path(row["pdb"])
        pdb = pdb if pdb.is_absolute() else predictions_csv.parent / pdb
        model = read_chain(pdb)
        path = native_path(row["chain_id"])
        if path not in natives:
            natives[path] = _load_native(path)
        native = natives[path]
        try:
            result = score_chains(model, native, align=align, contacts=contacts)
        except ValueError as exc:
            raise ValueError(f"{pdb} vs {native.source_file}: {exc}") from exc
        plddt = row.get("mean_plddt", np.nan)
        return {"chain_id": row["chain_id"], **result, "mean_plddt": float(plddt) if str(plddt) != "" else np.nan}

    rows = [row for _, row in table.iterrows()]
    records = _run_rows(rows, len(rows), score_row, "scoring predictions", show_progress,
                        key=lambda row: {"chain_id": row["chain_id"]})
    frame = pd.DataFrame(records, columns=["chain_id", *METRIC_KEYS, "mean_plddt", ERROR_COLUMN])
    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False)
    return frame
