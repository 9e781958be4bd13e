"""The numba kernels of pipeline/kernels.py give the NumPy code's results (lDDT: identical counts)."""

from __future__ import annotations

import numpy as np
import pytest

from data.structure import read_chain
from pipeline import metrics, scoring
from tests.shared_data import SHARED_STRUCTURES

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
    model = read_chain(SHARED_STRUCTURES / "7w1f_B_model.pdb")
    ref = read_chain(SHARED_STRUCTURES / "7w1f_B_target.pdb")
    mi, ri = scoring.match_residues(model, ref)
    pred = np.zeros_like(ref.atom37_positions)
    pmask = np.zeros_like(ref.atom37_mask)
    pred[ri], pmask[ri] = model.atom37_positions[mi], model.atom37_mask[mi]
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
