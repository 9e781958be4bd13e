"""Structure scoring speed: foldtune vs the `TMscore` binary, plus all-atom lDDT on a 473-residue target.

    .venv/bin/python benchmarks/bench_metrics.py --out /tmp/bench_metrics.md [--pairs 100] [--rounds 3]

Pairs: real chains of ~300 residues from shared/data/structures (5ugo A, 3mht A, 7gsa A, 1pwc A, 5h73 A),
each copied 20 times with a random rigid motion, a hinge rotation of a random segment and Gaussian
coordinate noise (0.3-3 A), written as clean single-chain PDB files. Every pair is scored by:

- `TMscore model ref` as a subprocess per pair (how users script it), output parsed;
- foldtune metric core: `pipeline.metrics.tm_score` per pair on the matched CA arrays (TM, GDT-TS/HA, RMSD:
  the numbers TMscore reports), arrays already in memory; once with the NumPy search, once with the
  compiled (numba) kernels that batch scoring uses;
- foldtune batch path: `pipeline.scoring.score_table` on a pairs CSV (reads the PDB files, each once per call:
  the 5 references are shared by the 100 models; TM/GDT/RMSD + all-atom lDDT + CA-lDDT, writes the CSV).

Then one `foldtune score model ref` and one `TMscore model ref` process each (fresh processes, interleaved):
the wall time a user pays for a single comparison, imports included.

All foldtune rows run in this one process (the search's GEMMs on one BLAS thread), the TMscore binary one
process per pair, sequentially. Timing: variants interleaved in rounds (benchmarks.common.time_interleaved);
ratio = median over rounds. A note splits score_table's time per pair into parsing, the metric core and lDDT
(timed separately, once). The script also runs on a checkout without the compiled kernels (older code): the
rows it cannot measure are left out, so before/after runs use the same pairs.
"""

from __future__ import annotations

import argparse
import re
import resource
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
GOAL = 10.0  # metric core vs the TMscore binary
TABLE_GOAL = 3.0  # score_table from files (with lDDT) vs the TMscore binary
SINGLE_GOAL_S = 0.5  # one `foldtune score A B` process


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
        references = {r: read_chain(r) for r in dict.fromkeys(r for _, r in pairs)}  # each read once, as score_table
        chains = [(read_chain(m), references[r]) for m, r in pairs]
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

        compiled = hasattr(metrics, "use_compiled_kernels") and metrics.use_compiled_kernels(True)

        def core(use_kernels: bool):
            def run():
                if compiled:
                    metrics.use_compiled_kernels(use_kernels)
                return [metrics.tm_score(x, y, l_ref=l) for x, y, l in arrays]
            return run

        def foldtune_batch():
            return scoring.score_table(csv, workdir / "scores.csv", show_progress=False)

        def tmscore_cli():
            return [run_tmscore(m, r) for m, r in pairs]

        base = "TMscore binary (subprocess per pair)"
        core_numpy, core_compiled = "foldtune metric core, NumPy (arrays)", "foldtune metric core, compiled (arrays)"
        table = "foldtune score_table (files, + lDDT)"
        calls = {base: tmscore_cli, core_numpy: core(False)}
        if compiled:
            calls[core_compiled] = core(True)
        calls[table] = foldtune_batch
        core_name = core_compiled if compiled else core_numpy

        # Agreement on every pair (both cores).
        theirs = tmscore_cli()
        diffs = {}
        for name in (core_numpy, core_compiled) if compiled else (core_numpy,):
            ours = calls[name]()
            diffs[name] = {key: max(abs(a[key] - b[key]) for a, b in zip(ours, theirs)) for key in theirs[0]}
        table_rows = foldtune_batch()
        diffs[table] = {key: float(np.max(np.abs(table_rows[key].to_numpy() - [t[key] for t in theirs])))
                        for key in theirs[0]}
        lengths = [l_ref for _, _, l_ref in arrays]

        # CPU time next to wall time: this process's for foldtune, the children's for TMscore. On a shared
        # machine CPU-time ratios move much less with other processes' load than wall-time ratios.
        cpu_seconds: dict[str, list[float]] = {name: [] for name in calls}

        def with_cpu(name: str, fn):
            def call():
                before_self, before_children = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
                fn()
                after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu_seconds[name].append(time.process_time() - before_self + after_children.ru_utime
                                         - before_children.ru_utime + after_children.ru_stime - before_children.ru_stime)
            return call

        log("timing")
        timings = time_interleaved({name: with_cpu(name, fn) for name, fn in calls.items()}, warmup=args.warmup,
                                   repeats=args.rounds, progress=log)
        timed = args.rounds
        cpu = {name: float(np.median(values[-timed:])) for name, values in cpu_seconds.items()}
        rows = []
        for name in timings.seconds:
            seconds = timings.median(name)
            rows.append([name, f"{seconds:.2f}", f"{seconds / args.pairs * 1e3:.1f}", f"{args.pairs / seconds:.1f}",
                         f"{timings.ratio(base, name):.1f}x", f"{cpu[name] / args.pairs * 1e3:.1f}",
                         f"{cpu[base] / cpu[name]:.1f}x"])

        # One call of each command line, a fresh process each (what a user's script pays per pair).
        foldtune_cmd = shutil.which("foldtune", path=str(Path(sys.executable).parent)) or "foldtune"
        one_pair = [str(pairs[0][0]), str(pairs[0][1])]
        child_cpu: dict[str, list[float]] = {"TMscore model ref": [], "foldtune score model ref": []}

        def one_call(name: str, command: list[str]):
            def call():
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(command, capture_output=True, check=True)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                child_cpu[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            return call

        single = time_interleaved(
            {"TMscore model ref": one_call("TMscore model ref", ["TMscore", *one_pair]),
             "foldtune score model ref": one_call("foldtune score model ref", [foldtune_cmd, "score", *one_pair])},
            warmup=1, repeats=max(5, args.rounds),
        )
        single_cpu = {name: float(np.median(times)) for name, times in child_cpu.items()}

        # Where score_table's time goes, per pair (each part timed once over all pairs, as score_table runs
        # them: compiled kernels when available, the reference's lDDT pair lists once per reference).
        if compiled:
            metrics.use_compiled_kernels(True)
        start = time.perf_counter()
        for model_path, _ in pairs:
            read_chain(model_path)
        parse_ms = (time.perf_counter() - start) / len(pairs) * 1e3
        contacts = scoring.ReferenceContacts() if hasattr(scoring, "ReferenceContacts") else None
        start = time.perf_counter()
        for model, ref in chains:
            mi, ri = scoring.match_residues(model, ref)
            pred = np.zeros_like(ref.atom37_positions)
            pmask = np.zeros_like(ref.atom37_mask)
            pred[ri], pmask[ri] = model.atom37_positions[mi], model.atom37_mask[mi]
            extra = {}
            if contacts is not None:
                all_atom, ca_pairs = contacts.get(ref)
                extra = ({"contacts": all_atom}, {"contacts": ca_pairs})
            metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask, aatype=ref.aatype, **(extra[0] if extra else {}))
            metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask, ca_only=True, **(extra[1] if extra else {}))
        lddt_ms = (time.perf_counter() - start) / len(pairs) * 1e3

        # All-atom lDDT on 7W1F_B (473 residues), reference pairs included (one model, one reference).
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

        def per_pair_ms(name: str) -> float:
            return timings.median(name) / args.pairs * 1e3

        core_ratio, table_ratio = timings.ratio(base, core_name), timings.ratio(base, table)
        core_cpu_ratio, table_cpu_ratio = cpu[base] / cpu[core_name], cpu[base] / cpu[table]
        single_s = single.median("foldtune score model ref")
        verdict = lambda ok: "met" if ok else "missed"  # noqa: E731
        goals = [
            ["metric core ≥ 10× the TMscore binary (per pair)",
             f"{core_ratio:.1f}× wall ({core_cpu_ratio:.1f}× CPU time)", verdict(core_ratio >= GOAL)],
            ["score_table from files, with lDDT, ≥ 3× the TMscore binary",
             f"{table_ratio:.1f}× wall ({table_cpu_ratio:.1f}× CPU time)", verdict(table_ratio >= TABLE_GOAL)],
            ["one `foldtune score A B` ≤ 0.5 s wall",
             f"{single_s:.2f} s wall, {single_cpu['foldtune score model ref']:.2f} s CPU (TMscore: "
             f"{single.median('TMscore model ref'):.3f} s wall, {single_cpu['TMscore model ref']:.3f} s CPU)",
             verdict(single_s <= SINGLE_GOAL_S)],
        ]
        agreement = "; ".join(
            f"{name.replace('foldtune ', '')}: TM {d['tm_score']:.4f}, GDT-TS {d['gdt_ts']:.4f}, GDT-HA {d['gdt_ha']:.4f}, "
            f"RMSD {d['rmsd']:.4f}" for name, d in diffs.items()
        )
        notes = [
            f"{args.pairs} pairs, L_ref {min(lengths)}-{max(lengths)} (observed reference residues, median "
            f"{int(np.median(lengths))}); max |foldtune - TMscore| over all pairs: {agreement} (TMscore prints "
            "4 / 3 decimals).",
            "score_table parses the model files (the 5 references once each), computes all-atom lDDT and CA-lDDT, "
            f"which TMscore does not, and writes the CSV; per pair: parsing a model file {parse_ms:.1f} ms, metric "
            f"core {per_pair_ms(core_name):.1f} ms, lDDT all-atom + CA {lddt_ms:.1f} ms (reference pairs reused) "
            f"- TMscore binary: {per_pair_ms(base):.1f} ms per pair in all.",
            f"all-atom lDDT (symmetry resolved) on 7W1F_B, 473 residues / {int(ref.atom37_mask.sum())} atoms, "
            f"reference pair search included: {lddt_t.median('lddt') * 1e3:.0f} ms per call.",
            f"single calls: median of {len(single.seconds['TMscore model ref'])} fresh processes each, interleaved.",
            "compiled kernels (numba) " + ("on for the compiled core and score_table" if compiled else "not available"),
        ]
        section = make_section(
            "Structure scoring vs TMscore", ["variant", "seconds" + (" / 100 pairs" if args.pairs == 100 else ""),
                                             "ms / pair", "pairs / s", "speed-up vs TMscore", "CPU ms / pair",
                                             "CPU-time speed-up"], rows, notes,
        )
        goal_section = make_section("Scoring goals (issue 17)", ["goal", "measured", "verdict"], goals, [])
        text = section.markdown() + "\n" + goal_section.markdown() + "\n" + info_block(
            machine_info(), "benchmarks/bench_metrics.py " + " ".join(argv or sys.argv[1:]), load_before, load_average()
        ) + "\n"
        print(text)
        atomic_write_text(args.out, text)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
