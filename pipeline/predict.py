"""Prediction: fold chains with a (fine-tuned) folding model and write PDB files + predictions.csv.

    PRED_DIR/<chain_id>.pdb     pLDDT (0-100) in the B-factor column, the native's residue numbering
    PRED_DIR/predictions.csv    chain_id,pdb,mean_plddt,ptm,length   (pdb = absolute path of the file)

The model is rebuilt from a run directory (`RUN/config.yaml` model section + `RUN/adapter/`), or from a
training config for the untuned base. Chains are folded whole (no crop), in length-sorted batches under a
token budget, with upstream `EsmForProteinFolding`'s default recycling unless `num_recycles` is given:
`max_recycles` trunk passes (num_recycles = max_recycles - 1; an explicit n runs n + 1 passes, as upstream).

Precision (`precision=`): "fp32", or "bf16": the ESM-2 stem, the trunk and the heads under bf16 autocast,
the structure module in fp32 (frames and IPA point distances are where bf16 loses Å). Chunking
(`chunk_size=`, the trunk's `set_chunk_size`: axial attention over chunks of that many rows, memory ~O(L)
instead of O(L^2), same values up to fp rounding): default the model config's `trunk.chunk_size` when set
(none in esmfold_v1 and foldtune's configs), else `DEFAULT_CHUNK_SIZE` for a batch holding a chain longer
than `LONG_CHAIN` residues, none otherwise.

Which sequence is folded (`sequence=`): "full" (default) folds the deposited sequence of each chain, with
position ids 0..N-1 along it, as ESMFold does; the PDB gets SEQRES records and the native's author numbering
(unobserved positions numbered as `data.structure` assigns them, or every residue by its deposited index
1..N when that numbering is not unique), so `foldtune score` and the TMscore program match each predicted
residue to its native one. "observed" folds only the residues with coordinates, with author numbers as
position ids (the behaviour before full-length chains).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import yaml
from transformers.models.esm.openfold_utils import atom14_to_atom37, compute_tm

from data.io import atomic_path, atomic_write_text
from data.structure import ProteinChain, chain_to_pdb, numbering_is_unique
from data.tokenize import af2_indices

PREDICTION_COLUMNS = ["chain_id", "pdb", "mean_plddt", "ptm", "length"]
SEQUENCE_MODES = ("full", "observed")
PRECISIONS = ("fp32", "bf16")
LONG_CHAIN = 512          # residues: above this, unchunked axial attention is a memory (and accuracy) risk
DEFAULT_CHUNK_SIZE = 128  # rows per chunk of the trunk's axial attention for such batches


@dataclass
class Target:
    """One chain to fold: its id, sequence and the numbering the output must carry."""
    chain_id: str
    template: ProteinChain   # native chain (or a coordinate-free stand-in for FASTA input)
    position_ids: np.ndarray | None = None  # (L,) the model's position ids; default template.residue_index

    @property
    def length(self) -> int:
        return len(self.template.aatype)

    @property
    def positions(self) -> np.ndarray:
        return self.template.residue_index if self.position_ids is None else self.position_ids


def select_sequence(targets: Sequence[Target], sequence: str = "full") -> list[Target]:
    """Targets folding the full deposited sequence ("full") or only the observed residues ("observed", with
    author numbers as position ids, as before full-length chains)."""
    if sequence not in SEQUENCE_MODES:
        raise ValueError(f"--sequence: must be one of {SEQUENCE_MODES}, got {sequence!r}")
    if sequence == "full":
        return list(targets)
    selected = []
    for target in targets:
        observed = target.template.observed_residues()
        selected.append(Target(target.chain_id, observed, position_ids=observed.author_number.copy()))
    return selected


# --------------------------------------------------------------------------------- targets

def targets_from_dataset(dataset_dir: str | Path, splits_csv: str | Path | None = None,
                         split: str | None = None, chain_ids: Sequence[str] | None = None) -> list[Target]:
    """Chains of a prepared dataset, optionally those of one split."""
    from data.dataset import chain_path, load_chain, read_manifest

    manifest = read_manifest(dataset_dir)
    ids = list(manifest["chain_id"]) if chain_ids is None else list(chain_ids)
    if split is not None:
        if splits_csv is None:
            raise ValueError("--splits: needed with --split")
        from pipeline.train import read_split

        wanted = set(read_split(splits_csv, split))
        if not wanted:
            raise ValueError(f"{splits_csv}: split: no chains with split {split!r}")
        ids = [c for c in ids if c in wanted]
        missing = wanted - set(manifest["chain_id"])
        if missing:
            raise ValueError(f"{splits_csv}: chain_id: not in {dataset_dir}/manifest.csv: {sorted(missing)[:5]}")
    return [Target(c, load_chain(chain_path(dataset_dir, c))) for c in ids]


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "seq"


def chain_from_sequence(chain_id: str, sequence: str) -> ProteinChain:
    """A coordinate-free chain numbered 1..L (for FASTA input)."""
    aatype = af2_indices(sequence).numpy()
    length = len(aatype)
    return ProteinChain(
        pdb_id=chain_id, chain="A", model=1, sequence=sequence.upper(), aatype=aatype,
        residue_index=np.arange(length, dtype=np.int64), insertion_code=np.full(length, "", dtype="<U1"),
        author_number=np.arange(1, length + 1, dtype=np.int64),
        atom37_positions=np.zeros((length, 37, 3), np.float32), atom37_mask=np.zeros((length, 37), np.float32),
        b_factors=np.zeros((length, 37), np.float32), method=None, resolution=None, release_date=None,
        source_file="",
    )


def targets_from_fasta(path: str | Path) -> list[Target]:
    from Bio import SeqIO

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: fasta: file not found")
    first = next((line for line in path.read_text(errors="replace").splitlines() if line.strip()), "")
    if first and not first.startswith(">"):  # Biopython would drop the lines before the first header
        raise ValueError(f"{path}: fasta: no '>' header line before the sequence (starts with {first[:20]!r})")
    targets, seen = [], set()
    for record in SeqIO.parse(str(path), "fasta"):
        chain_id = _safe_id(record.id)
        sequence = str(record.seq).strip()
        sequence = sequence[:-1] if sequence.endswith("*") else sequence  # a trailing stop codon
        if not sequence:
            raise ValueError(f"{path}: {record.id}: empty sequence")
        if ":" in sequence:
            raise ValueError(f"{path}: {record.id}: multimers (':') are not supported")
        # Anything but letters would silently become X (unknown): a gap, a digit, an inner stop is a bad file.
        odd = next((i for i, c in enumerate(sequence) if not c.isalpha()), None)
        if odd is not None:
            found = "".join(sorted({c for c in sequence if not c.isalpha()}))
            raise ValueError(f"{path}: {record.id}: {found!r} are not residue letters (first at position "
                             f"{odd + 1}; '*' is a stop only at the end)")
        if chain_id in seen:
            raise ValueError(f"{path}: {record.id}: duplicate id")
        seen.add(chain_id)
        targets.append(Target(chain_id, chain_from_sequence(chain_id, sequence)))
    if not targets:
        raise ValueError(f"{path}: fasta: no records")
    return targets


# --------------------------------------------------------------------------------- models

def read_run_config(run_dir: Path) -> dict:
    from pipeline.train import read_recorded_config  # names the file (and line) when it is not YAML

    path = run_dir / "config.yaml"
    cfg = read_recorded_config(run_dir)
    if cfg.get("kind", "fold") != "fold":
        raise ValueError(f"{path}: kind: {cfg.get('kind')!r} runs cannot fold structures")
    return cfg


def load_base_model(cfg: dict):
    """The base folding model of a (training) config: `model:` section, plus `model.base_run` weights."""
    from pipeline.models import build_folding_model
    from pipeline.train import load_base_run

    model = build_folding_model(cfg["model"])
    if cfg["model"].get("base_run"):
        load_base_run(model, cfg["model"]["base_run"])
    return model


def load_run_model(run_dir: str | Path, merged: bool = False, force: bool = False):
    """Rebuild a run's base model from RUN/config.yaml and load RUN/adapter (+ trained heads)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    model = load_base_model(cfg)
    load_run_adapter(model, run_dir, cfg, merged=merged, force=force)
    return model.eval()


def load_run_adapter(model, run_dir: Path, cfg: dict, merged: bool = False, force: bool = False,
                     keep_base: bool = False) -> dict:
    """Check RUN/adapter against RUN/config.yaml and load it into `model` (a base without adapters).

    Refuses an adapter whose method / part / rank / alpha / targets differ from the run's config, NaN/inf
    weights, and (unless `force`) an adapter recorded on another base. `keep_base`: `adapters.detach`
    can then restore the base (many runs on one base). Returns the adapter config.
    """
    import adapters
    from pipeline.train import base_source, load_trained

    adapter_dir = run_dir / "adapter"
    check_adapter_matches_run(adapter_dir, cfg, run_dir / "config.yaml")
    adapter_cfg = load_trained(model, adapter_dir, base=base_source(cfg["model"], cfg.get("kind", "fold")),
                               force=force, keep_base=keep_base)
    if merged and adapter_cfg["method"] not in ("none", "full"):
        adapters.merge(model)
    return adapter_cfg


def check_adapter_matches_run(adapter_dir: Path, cfg: dict, config_file: Path) -> None:
    """ValueError naming both files when RUN/adapter was not trained with RUN/config.yaml's adapter section."""
    import adapters

    saved = adapters.read_config(adapter_dir)
    if "peft_type" in saved and "method" not in saved:
        return  # an imported peft adapter: its config was derived from the file itself
    wanted = cfg.get("adapter") or {}
    keys = ["method", "part"]
    if saved["method"] not in ("full", "none"):
        keys += ["rank", "alpha", "targets"]
    for key in keys:
        have, want = saved.get(key), wanted.get(key)
        if key == "targets":
            have, want = sorted(have or []), sorted(want or [])
        elif key == "alpha" and have is not None and want is not None:
            have, want = float(have), float(want)
        if have != want:
            raise ValueError(f"{adapter_dir / adapters.CONFIG_NAME}: {key}: {saved.get(key)!r}, but {config_file} "
                             f"says adapter.{key}={wanted.get(key)!r}; this adapter does not belong to the run")


def base_key(cfg: dict) -> str:
    """Runs with equal keys build the same base model (train_heads only changes what is trained)."""
    import json

    from pipeline.train import base_source

    return json.dumps(base_source(cfg["model"], cfg.get("kind", "fold")), sort_keys=True)


FRESH_HEAD_SOURCES = ("random", "esm2_stem")  # model sources whose folding head starts untrained


def trained_recycles(cfg: dict, trained: bool = True) -> int | None:
    """Most recycles a fresh folding head was trained with: the `trainer.recycles` maximum of the run
    (`trained`: `cfg` is a run's config, not an untuned base) and of its `model.base_run`. None when the head
    comes pretrained (esmfold_pretrained) or was never trained."""
    model = cfg.get("model") or {}
    if model.get("source", "random") not in FRESH_HEAD_SOURCES:
        return None
    seen: list[int] = []
    if trained:
        seen.append(int(((cfg.get("trainer") or {}).get("recycles") or [0, 0])[1]))
    if model.get("base_run"):
        base_config = Path(model["base_run"]) / "config.yaml"
        if base_config.is_file():
            base = yaml.safe_load(base_config.read_text()) or {}
            seen.append(int(((base.get("trainer") or {}).get("recycles") or [0, 0])[1]))
    return max(seen) if seen else None


def recycles_warning(cfg: dict, model, num_recycles: int | None, where: str, trained: bool = True) -> str | None:
    """One line when prediction recycles more often than a fresh folding head was trained to (its recycling
    layers never learned those passes), else None."""
    from pipeline.models import default_recycles

    most = trained_recycles(cfg, trained)
    if most is None:
        return None
    used = default_recycles(model) if num_recycles is None else num_recycles
    if used <= most:
        return None
    return (f"warning: {where}: predicting with {used} recycles, but its fresh folding head was trained with at "
            f"most {most} (trainer.recycles); pass --num-recycles {most} or set "
            f"model.size.trunk.max_recycles: {most + 1}")


def predict_runs(run_dirs: Sequence[str | Path], targets: Sequence[Target], out_dirs: Sequence[str | Path],
                 device: str = "cpu", merged: bool = False, force: bool = False,
                 log: Callable[[str], None] = print, warn: Callable[[str], None] | None = None,
                 **fold_options) -> list[pd.DataFrame]:
    """Predict `targets` with several runs, building each distinct base once and switching adapters on it.

    Runs are grouped by `base_key`; in a group the base is built and moved to `device` once, then for each
    run its adapter is attached and loaded (keep_base), the targets folded into its out dir, and the adapter
    detached again, which restores every base value the run overwrote (trained heads, method=full weights).
    `warn` (default: stderr) gets `recycles_warning`'s line for a run whose fresh head was trained with fewer
    recycles than the prediction runs. Returns one predictions table per run, in the order given.
    """
    import sys

    import adapters

    if warn is None:
        def warn(message: str) -> None:
            print(message, file=sys.stderr)

    configs = [read_run_config(Path(run)) for run in run_dirs]
    groups: dict[str, list[int]] = {}
    for index, cfg in enumerate(configs):
        groups.setdefault(base_key(cfg), []).append(index)
    tables: dict[int, pd.DataFrame] = {}
    for members in groups.values():
        model = load_base_model(configs[members[0]]).eval().to(device)
        for index in members:
            run_dir = Path(run_dirs[index])
            warning = recycles_warning(configs[index], model, fold_options.get("num_recycles"), str(run_dir))
            if warning:
                warn(warning)
            load_run_adapter(model, run_dir, configs[index], merged=merged, force=force, keep_base=True)
            tables[index] = predict_targets(model.eval(), targets, out_dirs[index], **fold_options)
            adapters.detach(model)
            log(f"predict: {run_dir} -> {out_dirs[index]} ({len(targets)} chains)")
        del model
    return [tables[i] for i in range(len(run_dirs))]


# --------------------------------------------------------------------------------- folding

def batches_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Length-sorted batches with `len(batch) * max(length) <= max_tokens` (a longer chain goes alone)."""
    from data.dataset import TokenBudgetBatchSampler

    return TokenBudgetBatchSampler(lengths, max_tokens, shuffle=False).batches()


def check_fold_options(chunk_size: int | None = None, num_recycles: int | None = None,
                       precision: str = "fp32", max_tokens: int | None = None) -> None:
    """ValueError naming the option when a prediction setting is out of range."""
    for flag, value in (("--chunk-size", chunk_size), ("--max-tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{flag}: must be a positive integer, got {value!r}")
    if num_recycles is not None and (isinstance(num_recycles, bool) or not isinstance(num_recycles, int)
                                     or num_recycles < 0):
        raise ValueError(f"--num-recycles: must be an integer >= 0, got {num_recycles!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def default_chunk_size(lengths: Sequence[int]) -> int | None:
    """`DEFAULT_CHUNK_SIZE` when a chain is longer than `LONG_CHAIN` residues, else None (no chunking)."""
    return DEFAULT_CHUNK_SIZE if max(lengths, default=0) > LONG_CHAIN else None


@torch.no_grad()
def fold(model, targets: Sequence[Target], num_recycles: int | None = None,
         precision: str = "fp32") -> list[tuple[ProteinChain, float]]:
    """Fold one batch; returns (predicted chain, pTM) per target, in order.

    num_recycles: None = upstream's default (`max_recycles` trunk passes), n = n + 1 passes.
    precision: "fp32", or "bf16" (autocast; structure module in fp32).
    The predicted chain keeps the template's residue numbering / insertion codes; B-factors hold
    pLDDT in 0-100 (HF's ESMFold gives 0-1, and its `infer_pdb` writes 0-1 B-factors).
    """
    check_fold_options(num_recycles=num_recycles, precision=precision)
    device = next(model.parameters()).device
    width = max(t.length for t in targets)
    aatype = torch.full((len(targets), width), 20, dtype=torch.long)
    mask = torch.zeros((len(targets), width), dtype=torch.long)
    residx = torch.zeros((len(targets), width), dtype=torch.long)
    for row, target in enumerate(targets):
        n = target.length
        aatype[row, :n] = torch.as_tensor(target.template.aatype)
        mask[row, :n] = 1
        residx[row, :n] = torch.as_tensor(target.positions)
    bf16 = precision == "bf16"
    if hasattr(model, "set_fp32_structure_module"):
        model.set_fp32_structure_module(bf16)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(aatype.to(device), attention_mask=mask.to(device), position_ids=residx.to(device),
                    num_recycles=num_recycles)
    features = {"residx_atom37_to_atom14": out["residx_atom37_to_atom14"].long().cpu(),
                "atom37_atom_exists": out["atom37_atom_exists"].float().cpu()}
    atom37 = atom14_to_atom37(out["positions"][-1].float().cpu(), features).numpy()
    exists = features["atom37_atom_exists"].numpy()
    plddt = out["plddt"].float().cpu().numpy() * 100.0
    # HF's `ptm` takes a max over the whole batch; score each chain on its own (unpadded) logits.
    logits = out["ptm_logits"].float().cpu()
    ptm = [float(compute_tm(logits[row, :t.length, :t.length], max_bin=31, no_bins=logits.shape[-1]))
           for row, t in enumerate(targets)]
    results = []
    for row, target in enumerate(targets):
        n = target.length
        predicted = replace(
            target.template, observed=np.ones(n, dtype=bool),
            atom37_positions=atom37[row, :n].astype(np.float32),
            atom37_mask=exists[row, :n].astype(np.float32),
            b_factors=(plddt[row, :n] * exists[row, :n]).astype(np.float32),
            method="PREDICTED", resolution=None, source_file="foldtune predict",
        )
        results.append((predicted, float(ptm[row])))
    return results


def _mean_plddt(chain: ProteinChain) -> float:
    """Mean CA pLDDT (0-100)."""
    ca = chain.b_factors[:, 1]
    present = chain.atom37_mask[:, 1] > 0
    return float(ca[present].mean()) if present.any() else 0.0


def write_predictions(out_dir: Path, rows: list[dict]) -> Path:
    csv_path = out_dir / "predictions.csv"
    with atomic_path(csv_path) as tmp:
        pd.DataFrame(rows, columns=PREDICTION_COLUMNS).to_csv(tmp, index=False)
    return csv_path


def predict_targets(model, targets: Sequence[Target], out_dir: str | Path, max_tokens: int = 4096,
                    chunk_size: int | None = None, num_recycles: int | None = None,
                    progress: bool = True, precision: str = "fp32") -> pd.DataFrame:
    """Fold `targets` in token-budget batches; write one PDB per chain and predictions.csv.

    chunk_size: None = the model config's `trunk.chunk_size` if set, else `default_chunk_size` of each batch;
    precision / num_recycles: see `fold`.
    """
    from rich.progress import Progress

    check_fold_options(chunk_size, num_recycles, precision, max_tokens)
    # A chunk size in the model's own config (model.size.trunk.chunk_size, config.json) is the model's default.
    esmfold_config = getattr(model.config, "esmfold_config", None)
    configured = getattr(getattr(esmfold_config, "trunk", None), "chunk_size", None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    batches = batches_by_tokens([t.length for t in targets], max_tokens)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("fold", total=len(targets))
        for batch in batches:
            members = [targets[i] for i in batch]
            chunk = chunk_size if chunk_size is not None else (
                configured or default_chunk_size([t.length for t in members]))
            model.trunk.set_chunk_size(chunk)  # set every batch: the model may be shared between calls
            folded = fold(model, members, num_recycles=num_recycles, precision=precision)
            for i, (chain, ptm) in zip(batch, folded):
                rows[targets[i].chain_id] = _write_one(out_dir, targets[i], chain, ptm)
            bar.advance(task, len(batch))
    ordered = [rows[t.chain_id] for t in targets]
    write_predictions(out_dir, ordered)
    return pd.DataFrame(ordered, columns=PREDICTION_COLUMNS)


def _write_one(out_dir: Path, target: Target, chain: ProteinChain, ptm: float) -> dict:
    pdb_path = (out_dir / f"{target.chain_id}.pdb").resolve()
    atomic_write_text(pdb_path, chain_to_pdb(chain, numbering="author" if numbering_is_unique(chain) else "index"))
    return {"chain_id": target.chain_id, "pdb": str(pdb_path), "mean_plddt": round(_mean_plddt(chain), 3),
            "ptm": ptm, "length": target.length}


def predict_baseline(targets: Sequence[Target], out_dir: str | Path,
                     builder: Callable[[ProteinChain], ProteinChain] | None = None) -> pd.DataFrame:
    """`--baseline ideal-helix`: no model; pLDDT 0 and pTM NaN."""
    if builder is None:
        try:
            from pipeline.baselines import ideal_helix_chain as builder
        except ImportError as exc:
            raise RuntimeError("--baseline ideal-helix: pipeline.baselines.ideal_helix_chain is not available") from exc
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for target in targets:
        chain = builder(target.template)
        chain = replace(chain, observed=np.ones(len(chain.aatype), dtype=bool), b_factors=np.zeros_like(chain.atom37_mask, dtype=np.float32))
        rows.append(_write_one(out_dir, target, chain, float("nan")))
    write_predictions(out_dir, rows)
    return pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
