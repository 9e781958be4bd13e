"""Structure scoring speed: foldtune vs the `TMscore` binary, plus all-atom lDDT on a 473-residue target.

    .venv/bin/python benchmarks/bench_metrics.py --out /tmp/bench_metrics.md [--pairs 100] [--rounds 3]

Pairs: real chains of ~300 residues from shared/data/structures (5ugo A, 3mht A, 7gsa A, 1pwc A, 5h73 A),
each copied 20 times with a random rigid motion, a hinge rotation of a random segment and Gaussian
coordinate noise (0.3-3 A), written as clean single-chain PDB files. Every pair is scored by:

- `TMscore model ref` as a subprocess per pair (how users script it), output parsed;
- foldtune metric core: `pipeline.metrics.tm_score_batch` on the CA arrays (TM, GDT-TS/HA, RMSD: the
  numbers TMscore reports), arrays already in memory;
- foldtune batch path: `pipeline.scoring.score_table` on a pairs CSV (parses the PDB files with Biopython,
  each file once per call: the 5 references are shared by the 100 models; TM/GDT/RMSD + all-atom lDDT +
  CA-lDDT, writes the CSV).

All foldtune rows run in this one process (torch's default thread count; the TM-score search itself runs
single-threaded), the TMscore binary one process per pair, sequentially. Timing: variants interleaved in
rounds (benchmarks.common.time_interleaved); ratio = median over rounds. A note splits score_table's time
per pair into parsing, the metric core and lDDT (timed separately, once).
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import info_block, load_average, log, machine_info, make_section, time_interleaved  # noqa: E402
from data.io import atomic_write_text  # noqa: E402
from data.structure import chain_to_pdb, read_chain  # noqa: E402
from pipeline import metrics, scoring  # noqa: E402

STRUCTURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "structures"
if not STRUCTURES.is_dir():  # a checkout without shared/ beside it: the workplace's copy
    STRUCTURES = Path("/work/shared/data/structures")
SOURCES = [("5ugo.pdb", "A"), ("3mht.pdb", "A"), ("7gsa.cif", "A"), ("1pwc.pdb", "A"), ("5h73.pdb", "A")]
GOAL = 10.0


def _rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def perturb(chain, rng: np.random.Generator):
    """A model-like copy: hinge motion of a tail segment, coordinate noise, then a global rigid motion."""
    model = scoring.ProteinChain(**{**chain.__dict__})
    pos = chain.atom37_positions.astype(np.float64).copy()
    n = len(chain)
    hinge = int(rng.integers(n // 4, 3 * n // 4))
    pivot = pos[hinge, metrics.CA_INDEX]
    pos[hinge:] = (pos[hinge:] - pivot) @ _rotation(rng, np.deg2rad(35)).T + pivot
    pos += rng.normal(scale=rng.uniform(0.3, 3.0), size=pos.shape)
    pos = pos @ _rotation(rng, np.pi).T + rng.normal(scale=20.0, size=3)
    model.atom37_positions = (pos * chain.atom37_mask[..., None]).astype(np.float32)
    return model


def build_pairs(workdir: Path, n_pairs: int, seed: int = 0) -> list[tuple[Path, Path]]:
    rng = np.random.default_rng(seed)
    refs = []
    for name, chain_id in SOURCES:
        chain = read_chain(STRUCTURES / name, chain=chain_id)
        path = workdir / f"{Path(name).stem}_{chain_id}_ref.pdb"
        atomic_write_text(path, chain_to_pdb(chain))
        refs.append((chain, path))
    pairs = []
    for i in range(n_pairs):
        chain, ref_path = refs[i % len(refs)]
        model_path = workdir / f"pair{i:03d}_model.pdb"
        atomic_write_text(model_path, chain_to_pdb(perturb(chain, rng)))
        pairs.append((model_path, ref_path))
    return pairs


_TM = re.compile(r"TM-score\s+=\s+([\d.]+)")
_GDT_TS = re.compile(r"GDT-TS-score=\s+([\d.]+)")
_GDT_HA = re.compile(r"GDT-HA-score=\s+([\d.]+)")
_RMSD = re.compile(r"RMSD of  the common residues=\s+([\d.]+)")


def run_tmscore(model: Path, ref: Path) -> dict:
    out = subprocess.run(["TMscore", str(model), str(ref)], capture_output=True, text=True, check=True).stdout
    return {
        "tm_score": float(_TM.search(out).group(1)),
        "gdt_ts": float(_GDT_TS.search(out).group(1)),
        "gdt_ha": float(_GDT_HA.search(out).group(1)),
        "rmsd": float(_RMSD.search(out).group(1)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if shutil.which("TMscore") is None:
        print("TMscore binary not found (apt-get install tm-align)", file=sys.stderr)
        return 2
    load_before = load_average()
    workdir = Path(tempfile.mkdtemp(prefix="bench_metrics_"))
    try:
        log(f"building {args.pairs} pairs in {workdir}")
        pairs = build_pairs(workdir, args.pairs)
        csv = workdir / "pairs.csv"
        atomic_write_text(csv, "id,model,ref\n" + "".join(f"{i},{m},{r}\n" for i, (m, r) in enumerate(pairs)))
        chains = [(read_chain(m), read_chain(r)) for m, r in pairs]
        arrays = []
        ca = metrics.CA_INDEX
        for model, ref in chains:
            # What score_chains hands the core: matched residues observed in both, L_ref = observed reference
            # residues (chains are full length: unobserved positions have no coordinates).
            mi, ri = scoring.match_residues(model, ref)
            both = (model.atom37_mask[mi, ca] > 0) & (ref.atom37_mask[ri, ca] > 0)
            mi, ri = mi[both], ri[both]
            l_ref = int((ref.atom37_mask[:, ca] > 0).sum())
            arrays.append((model.atom37_positions[mi, ca], ref.atom37_positions[ri, ca], l_ref))

        def foldtune_core():
            return [metrics.tm_score(x, y, l_ref=l) for x, y, l in arrays]

        def foldtune_batch():
            return scoring.score_table(csv, workdir / "scores.csv", show_progress=False)

        def tmscore_cli():
            return [run_tmscore(m, r) for m, r in pairs]

        # Agreement on every pair.
        ours = foldtune_core()
        theirs = tmscore_cli()
        diffs = {key: max(abs(a[key] - b[key]) for a, b in zip(ours, theirs)) for key in theirs[0]}
        lengths = [l_ref for _, _, l_ref in arrays]

        log("timing")
        timings = time_interleaved(
            {"TMscore binary (subprocess per pair)": tmscore_cli, "foldtune metric core (arrays)": foldtune_core,
             "foldtune score_table (files, + lDDT)": foldtune_batch},
            warmup=args.warmup, repeats=args.rounds, progress=log,
        )
        base = "TMscore binary (subprocess per pair)"
        rows = []
        for name in timings.seconds:
            seconds = timings.median(name)
            rows.append([name, f"{seconds:.2f}", f"{args.pairs / seconds:.1f}", f"{timings.ratio(base, name):.1f}x"])

        # Where score_table's time goes, per pair (each part timed once over all pairs).
        start = time.perf_counter()
        for model_path, _ in pairs:
            read_chain(model_path)
        parse_ms = (time.perf_counter() - start) / len(pairs) * 1e3
        start = time.perf_counter()
        for model, ref in chains:
            mi, ri = scoring.match_residues(model, ref)
            pred = np.zeros_like(ref.atom37_positions)
            pmask = np.zeros_like(ref.atom37_mask)
            pred[ri], pmask[ri] = model.atom37_positions[mi], model.atom37_mask[mi]
            metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask, aatype=ref.aatype)
            metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask, ca_only=True)
        lddt_ms = (time.perf_counter() - start) / len(pairs) * 1e3

        # All-atom lDDT on 7W1F_B (473 residues).
        model = read_chain(STRUCTURES / "7w1f_B_model.pdb")
        ref = read_chain(STRUCTURES / "7w1f_B_target.pdb")
        mi, ri = scoring.match_residues(model, ref)
        pred = np.zeros_like(ref.atom37_positions)
        pmask = np.zeros_like(ref.atom37_mask)
        pred[ri], pmask[ri] = model.atom37_positions[mi], model.atom37_mask[mi] * ref.atom37_mask[ri]
        lddt_t = time_interleaved(
            {"lddt": lambda: metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask, aatype=ref.aatype)},
            warmup=1, repeats=5,
        )
        ratio = timings.ratio(base, "foldtune metric core (arrays)")

        def per_pair_ms(name: str) -> float:
            return timings.median(name) / args.pairs * 1e3

        notes = [
            f"{args.pairs} pairs, L_ref {min(lengths)}-{max(lengths)} (median {int(np.median(lengths))}); "
            f"max |foldtune - TMscore| over all pairs: TM {diffs['tm_score']:.4f}, GDT-TS {diffs['gdt_ts']:.4f}, "
            f"GDT-HA {diffs['gdt_ha']:.4f}, RMSD {diffs['rmsd']:.4f} (TMscore prints 4 / 3 decimals).",
            f"goal: metric core >= {GOAL:.0f}x the TMscore binary -> {ratio:.1f}x "
            f"({'met' if ratio >= GOAL else 'missed'}).",
            "score_table also parses the PDB files with Biopython and computes all-atom lDDT and CA-lDDT, "
            f"which TMscore does not; per pair: parsing a model file {parse_ms:.0f} ms, metric core "
            f"{per_pair_ms('foldtune metric core (arrays)'):.0f} ms, lDDT all-atom + CA {lddt_ms:.0f} ms "
            f"(TMscore binary: {per_pair_ms(base):.0f} ms per pair in all).",
            f"all-atom lDDT (symmetry resolved) on 7W1F_B, 473 residues / {int(ref.atom37_mask.sum())} atoms: "
            f"{lddt_t.median('lddt') * 1e3:.0f} ms per call.",
        ]
        section = make_section(
            "Structure scoring vs TMscore", ["variant", "seconds / 100 pairs" if args.pairs == 100 else "seconds",
                                             "pairs / s", "speed-up vs TMscore"], rows, notes,
        )
        text = section.markdown() + "\n" + info_block(
            machine_info(), "benchmarks/bench_metrics.py " + " ".join(argv or sys.argv[1:]), load_before, load_average()
        ) + "\n"
        print(text)
        atomic_write_text(args.out, text)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
