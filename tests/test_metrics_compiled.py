"""The numba kernels of pipeline/kernels.py give the NumPy code's results (lDDT: identical counts)."""

from __future__ import annotations

import numpy as np
import pytest

from data.structure import read_chain
from pipeline import metrics, scoring
from tests.shared_data import SHARED_STRUCTURES
from tests.test_metrics_lddt import model_on_reference

pytest.importorskip("numba")


@pytest.fixture
def numpy_then_compiled():
    """Runs a function with the kernels off, then on; restores the off state (the default) afterwards."""
    def both(fn):
        metrics.use_compiled_kernels(False)
        plain = fn()
        assert metrics.use_compiled_kernels(True)
        try:
            compiled = fn()
        finally:
            metrics.use_compiled_kernels(False)
        return plain, compiled
    return both


def test_lddt_kernels_equal_numpy(numpy_then_compiled):
    ref, pred, pmask = model_on_reference("7w1f_B_model.pdb", "7w1f_B_target.pdb")
    pmask[::7] = 0  # some missing model atoms and residues
    rng = np.random.default_rng(0)
    pred = pred + rng.normal(scale=0.7, size=pred.shape)  # shifts around every threshold

    def scores():
        return (metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask, aatype=ref.aatype),
                metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask, aatype=ref.aatype, per_residue=True),
                metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask, ca_only=True),
                metrics.lddt(pred, ref.atom37_positions, pmask, ref.atom37_mask))

    plain, compiled = numpy_then_compiled(scores)
    for a, b in zip(plain, compiled):
        np.testing.assert_array_equal(a, b)
    assert 0.3 < plain[0] < 0.99


def test_lddt_counts_and_symmetry_flips_identical(numpy_then_compiled):
    """Per-atom counts and the residues renamed by the symmetry test are the same numbers on both paths, and
    the compiled rows of a pair list in any order count the same pairs."""
    ref, pred, pmask = model_on_reference("7w1f_B_model.pdb", "7w1f_B_target.pdb")
    pmask[::5] = 0
    pred = pred + np.random.default_rng(1).normal(scale=0.7, size=pred.shape)
    contacts = metrics.lddt_contacts(ref.atom37_positions, ref.atom37_mask, aatype=ref.aatype)
    _, _, atom_res, atom_type, pairs, total, _, symmetric, ref_atoms, _ = contacts
    pred64, present = pred.astype(np.float64), pmask > 0
    order = np.random.default_rng(2).permutation(pairs[0].size)
    shuffled = tuple(p[order] for p in pairs)

    def counts():
        flip = metrics._resolve_symmetry(pred64, present, symmetric, metrics.LDDT_THRESHOLDS)
        args = (pred64[atom_res, atom_type], ref_atoms, present[atom_res, atom_type], np.ones(atom_res.size, bool),
                atom_res, metrics.LDDT_INCLUSION_RADIUS, metrics.LDDT_THRESHOLDS)
        return (flip, metrics._lddt_counts(*args, pairs=pairs, total=total)[0],
                metrics._lddt_counts(*args, pairs=shuffled, total=total)[0],
                metrics._lddt_counts(*args, pairs=pairs, total=total, per_atom=False)[0])

    (flip, preserved, preserved_shuffled, summed), (flip_c, preserved_c, preserved_shuffled_c, summed_c) = \
        numpy_then_compiled(counts)
    np.testing.assert_array_equal(summed, [preserved.sum()])
    np.testing.assert_array_equal(summed_c, summed)
    assert flip is not None and 0 < flip.sum() < flip.size  # noisy side chains: some residues renamed
    np.testing.assert_array_equal(flip, flip_c)
    np.testing.assert_array_equal(preserved, preserved_c)
    np.testing.assert_array_equal(preserved_shuffled_c, preserved)
    np.testing.assert_array_equal(preserved_shuffled, preserved)
    assert 0 < preserved.sum() < 4 * total.sum()


def test_contact_pairs_identical(numpy_then_compiled):
    """The compiled pair search returns the GEMM-preselected search's pairs, order and distances: all-atom
    on 7W1F_B, and a CA batch with masked atoms (pairs only within each batch element)."""
    ref, _, _ = model_on_reference("7w1f_B_model.pdb", "7w1f_B_target.pdb")
    atom_res, atom_type = np.nonzero(ref.atom37_mask)
    atoms = ref.atom37_positions[atom_res, atom_type].astype(np.float64)
    ca = ref.atom37_positions[:, metrics.CA_INDEX].astype(np.float64)
    batch = np.stack([ca, ca[::-1] + 1.0])
    batch_mask = np.ones(batch.shape[:2], dtype=bool)
    batch_mask[0, ::3] = batch_mask[1, 1::4] = False
    groups = np.broadcast_to(np.arange(batch.shape[1]), batch.shape[:2])

    def search():
        return (metrics._contact_pairs(atoms[None], np.ones((1, atoms.shape[0]), bool), atom_res[None], 15.0),
                metrics._contact_pairs(batch, batch_mask, groups, 15.0))

    plain, compiled = numpy_then_compiled(search)
    for ours, theirs in zip(compiled, plain):
        assert theirs[0].size > 1000
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_tm_search_kernels_agree_with_numpy(numpy_then_compiled):
    """TM-score / GDT / RMSD of the compiled search equal the NumPy search's on real and perturbed pairs."""
    rng = np.random.default_rng(1)
    cases = []
    for model_name, ref_name, chain in (("7w1f_B_model.pdb", "7w1f_B_target.pdb", None),
                                        ("7sgn_C_model.pdb", "7sgn_C_target.pdb", None),
                                        ("1tii.pdb", "1tii.pdb", ("D", "E")),
                                        ("1l2y.pdb", "1l2y.pdb", None)):
        model = read_chain(SHARED_STRUCTURES / model_name, chain=chain[0] if chain else None)
        ref = read_chain(SHARED_STRUCTURES / ref_name, chain=chain[1] if chain else None,
                         model=2 if model_name == "1l2y.pdb" else 1)
        mi, ri = scoring.match_residues(model, ref, "number")
        both = (model.atom37_mask[mi, 1] > 0) & (ref.atom37_mask[ri, 1] > 0)
        x, y = model.atom37_positions[mi[both], 1].astype(np.float64), ref.atom37_positions[ri[both], 1]
        cases.append((x, y, int((ref.atom37_mask[:, 1] > 0).sum())))
        for scale in (0.5, 2.0, 5.0):  # noisier copies: other trajectories, more rounds
            cases.append((x + rng.normal(scale=scale, size=x.shape), y, cases[-1][2]))

    def scores():
        return [metrics.tm_score(x, y, l_ref=l_ref) for x, y, l_ref in cases]

    plain, compiled = numpy_then_compiled(scores)
    for a, b in zip(plain, compiled):
        assert a["n_aligned"] == b["n_aligned"] and a["l_ref"] == b["l_ref"]
        for key in ("tm_score", "gdt_ts", "gdt_ha", "rmsd"):
            assert abs(a[key] - b[key]) <= 1e-9, (key, a, b)


def test_tm_search_kernels_agree_on_degenerate_pairs(numpy_then_compiled):
    """Collinear points (the closed form flags the fit: SVD inside the kernel), 1 and 3 pairs (no widening),
    a mirror image (no proper rotation fits): the compiled search gives the NumPy search's values."""
    rng = np.random.default_rng(3)
    line = np.outer(np.arange(30), [1.0, 0.5, 0.2]) * 3.8 / np.linalg.norm([1.0, 0.5, 0.2])
    chain = np.cumsum(rng.normal(size=(12, 3)) * 2.0, 0)
    cases = [(line + rng.normal(scale=1e-9, size=line.shape), line), (line[:3] + 1.0, line[:3]),
             (line[:1], line[:1] + 2.0), (chain * [1.0, 1.0, -1.0], chain)]

    plain, compiled = numpy_then_compiled(lambda: [metrics.tm_score(x, y) for x, y in cases])
    for a, b in zip(plain, compiled):
        for key in ("tm_score", "gdt_ts", "gdt_ha", "rmsd"):
            assert abs(a[key] - b[key]) <= 1e-9, (key, a, b)
    assert plain[0]["tm_score"] > 0.999 and plain[3]["tm_score"] < 0.8  # a line fits; a mirror image does not
    assert metrics.use_compiled_kernels(True)
    try:  # the collinear pair really takes the kernel's SVD path; a well-spread chain never does
        collinear = metrics._tm_search(*cases[0], l_ref=30.0)["svd_fits"]
        spread = metrics._tm_search(chain + rng.normal(scale=0.5, size=chain.shape), chain, l_ref=12.0)["svd_fits"]
    finally:
        metrics.use_compiled_kernels(False)
    assert collinear > 0 and spread == 0, (collinear, spread)


def test_batch_scoring_switches_kernels_on_only_when_worth_it():
    """Kernels load (~1 s) only when the rows left are expected to save more than that."""
    assert not scoring.worth_compiling(0, 100, 0.0)
    assert not scoring.worth_compiling(5, 15, 0.05)  # 20 small pairs: 0.15 s left in all
    assert scoring.worth_compiling(1, 99, 0.04)  # 100 pairs of ~40 ms: ~4 s left
