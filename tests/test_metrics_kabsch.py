"""The closed-form (quaternion) Kabsch solver against the SVD solution it replaces in the fast path.

``metrics.best_rotation`` is the one rotation core of ``kabsch`` and of the TM-score search. Its closed form
must give a proper rotation with the same RMSD as the SVD on every input, flag the inputs where the
optimum is (nearly) not unique, and hand those to the SVD.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import metrics


def _random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    q = np.linalg.qr(rng.normal(size=(n, 3, 3)))[0]
    return q * np.sign(np.linalg.det(q))[:, None, None]


def _centred_covariance(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = x - x.mean(-2, keepdims=True)
    y = y - y.mean(-2, keepdims=True)
    return x, y, np.swapaxes(x, -1, -2) @ y


def _rmsd(rot: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(C,) RMSD of centred x (C, N, 3) rotated by rot (C, 3, 3) against centred y."""
    return np.sqrt((((x @ np.swapaxes(rot, -1, -2)) - y) ** 2).sum(-1).mean(-1))


def _svd_rotation(cov: np.ndarray) -> np.ndarray:
    """The SVD solution best_rotation falls back to for NumPy input (LAPACK through NumPy)."""
    return metrics._rotation_svd(cov)


def test_numpy_and_torch_svd_agree():
    """The NumPy SVD fallback and the torch one (differentiable path) give the same rotation where it is unique."""
    rng = np.random.default_rng(9)
    x, y, cov = _centred_covariance(rng.normal(size=(30, 12, 3)), rng.normal(size=(30, 12, 3)))
    np.testing.assert_allclose(metrics._rotation_svd(torch.from_numpy(cov)).numpy(), _svd_rotation(cov), atol=1e-10)


def _check_against_svd(x: np.ndarray, y: np.ndarray, same_rotation: bool) -> np.ndarray:
    """best_rotation is a proper rotation with the SVD's RMSD (and, if well-posed, the SVD's rotation)."""
    x, y, cov = _centred_covariance(x, y)
    rot, reference = metrics.best_rotation(cov), _svd_rotation(cov)
    np.testing.assert_allclose(rot @ np.swapaxes(rot, -1, -2), np.broadcast_to(np.eye(3), rot.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-12)
    np.testing.assert_allclose(_rmsd(rot, x, y), _rmsd(reference, x, y), rtol=0, atol=1e-9)
    if same_rotation:
        np.testing.assert_allclose(rot, reference, atol=1e-9)
    return rot


def _flags(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ok flags of the closed form for a batch of point sets (False = handed to the SVD)."""
    _, _, cov = _centred_covariance(x, y)
    return metrics._rotation_closed_form(np.ascontiguousarray(cov.reshape(-1, 9).T))[1]


def test_random_superpositions_match_svd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 40, 3)) * rng.uniform(1, 30, size=(500, 1, 3))  # flattened, elongated clouds
    noise = rng.uniform(0, 20, size=(500, 1, 1))  # up to noise far larger than the cloud: near-random fits
    y = x @ np.swapaxes(_random_rotations(rng, 500), -1, -2) + rng.normal(size=x.shape) * noise
    y += rng.normal(size=(500, 1, 3)) * 10  # translations
    assert _flags(x, y).all()
    _check_against_svd(x, y, same_rotation=True)


def _axis_rotation(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    i, j = [k for k in range(3) if k != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def test_exact_rotations_with_zero_quaternion_components_are_recovered():
    """Identity, 180° turns and axis rotations: quaternions with zero components, where the eigenvector
    must come from the right adjugate column (the others are ~0)."""
    rng = np.random.default_rng(7)
    rotations = [np.eye(3)] + [_axis_rotation(axis, angle) for axis in range(3) for angle in (np.pi / 2, np.pi)]
    rotations.append(_axis_rotation(0, np.pi) @ _axis_rotation(1, np.pi / 2))
    x = rng.normal(size=(1, 30, 3)) * 10
    x = np.repeat(x, len(rotations), axis=0)
    y = x @ np.swapaxes(np.array(rotations), -1, -2)
    x, y, cov = _centred_covariance(x, y)
    rot, ok = metrics._rotation_closed_form(np.ascontiguousarray(cov.reshape(-1, 9).T))
    assert ok.all()
    np.testing.assert_allclose(rot.T.reshape(-1, 3, 3), np.array(rotations), atol=1e-12)


def test_reflected_targets_get_the_best_proper_rotation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 25, 3)) * 8
    mirrored = x * np.array([1.0, 1.0, -1.0]) @ np.swapaxes(_random_rotations(rng, 200), -1, -2)
    y = mirrored + rng.normal(size=x.shape) * rng.uniform(0, 2, size=(200, 1, 1))
    _, _, cov = _centred_covariance(x, y)
    assert (np.linalg.det(cov) < 0).all()  # the unconstrained optimum would be a reflection
    _check_against_svd(x, y, same_rotation=False)
    well_posed = _flags(x, y)
    assert well_posed.mean() > 0.9
    _check_against_svd(x[well_posed], y[well_posed], same_rotation=True)


def test_planar_points_are_solved_in_closed_form():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 12, 3)) * 5
    x[..., 2] = 0.0  # coplanar: s3 = 0, the rotation is still unique
    y = x @ np.swapaxes(_random_rotations(rng, 100), -1, -2) + rng.normal(size=x.shape) * 0.3
    assert _flags(x, y).all()
    _check_against_svd(x, y, same_rotation=True)


@pytest.mark.parametrize("case", ["collinear", "two_points", "one_point", "identical_points", "zero"])
def test_degenerate_inputs_go_to_svd(case):
    """Where the rotation is not unique the closed form flags the row and the SVD's choice is returned."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 10, 3)) * 5
    if case == "collinear":
        x = rng.normal(size=(20, 10, 1)) * 5 * rng.normal(size=(20, 1, 3))
    elif case == "two_points":
        x = np.repeat(rng.normal(size=(20, 2, 3)) * 5, 5, axis=1)
    elif case == "one_point":
        x = x[:, :1]
    elif case == "identical_points":
        x = np.repeat(x[:, :1], 10, axis=1)
    elif case == "zero":
        x = np.zeros_like(x)
    y = x @ np.swapaxes(_random_rotations(rng, 20), -1, -2) + rng.normal(size=x.shape) * 0.1
    assert not _flags(x, y).any()
    rot = _check_against_svd(x, y, same_rotation=False)
    _, _, cov = _centred_covariance(x, y)
    np.testing.assert_allclose(rot, _svd_rotation(cov), atol=1e-12)  # exactly the SVD's choice


@pytest.mark.parametrize("thickness", [1e-2, 1e-4, 1e-6, 1e-9])
def test_nearly_collinear_and_nearly_symmetric_inputs(thickness):
    """Near the degenerate cases the solver either stays accurate or hands the row to the SVD."""
    rng = np.random.default_rng(4)
    line = rng.normal(size=(50, 15, 1)) * 10 * np.array([1.0, 0.0, 0.0])
    x = line + rng.normal(size=(50, 15, 3)) * thickness
    y = x @ np.swapaxes(_random_rotations(rng, 50), -1, -2) + rng.normal(size=x.shape) * thickness
    _check_against_svd(x, y, same_rotation=False)
    # s2 ~ s3 with det H < 0 (top eigenvalue of the key matrix nearly double): a mirrored cylinder.
    ring = rng.normal(size=(50, 30, 3)) * np.array([20.0, 5.0, 5.0])
    mirrored = ring * np.array([1.0, 1.0, -1.0]) + rng.normal(size=ring.shape) * thickness
    _check_against_svd(ring, mirrored, same_rotation=False)


def test_kabsch_is_one_implementation_for_numpy_torch_and_the_search():
    """kabsch (NumPy), kabsch (torch with grad: SVD) and the search's fit from prefix sums agree."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 3)) * 10
    y = x @ _random_rotations(rng, 1)[0].T + rng.normal(size=x.shape) + 3.0
    rot, trans = metrics.kabsch(x, y)
    xt = torch.tensor(x, requires_grad=True)
    rot_t, trans_t = metrics.kabsch(xt, torch.tensor(y))
    np.testing.assert_allclose(rot_t.detach().numpy(), rot, atol=1e-10)
    np.testing.assert_allclose(trans_t.detach().numpy(), trans, atol=1e-9)
    sums = metrics._pair_features(x, y).sum(0)[:, None]  # (16, 1): every pair in the fit
    fit_rot, fit_trans = metrics._fit_from_sums(sums)
    np.testing.assert_allclose(fit_rot[..., 0], rot, atol=1e-10)
    np.testing.assert_allclose(fit_trans[:, 0], trans, atol=1e-9)
    weights = np.r_[np.zeros(10), np.ones(50)]
    rot_w, _ = metrics.kabsch(x, y, weights)
    fit_w, _ = metrics._fit_from_sums((metrics._pair_features(x, y) * weights[:, None]).sum(0)[:, None])
    np.testing.assert_allclose(fit_w[..., 0], rot_w, atol=1e-10)
    empty_rot, empty_trans = metrics._fit_from_sums(np.zeros((16, 1)))  # zero weight: R = I, t = 0
    np.testing.assert_array_equal(empty_rot[..., 0], np.eye(3))
    np.testing.assert_array_equal(empty_trans[:, 0], np.zeros(3))


def test_batched_torch_input_keeps_dtype_and_device():
    rng = np.random.default_rng(6)
    cov = torch.tensor(rng.normal(size=(4, 7, 3, 3)), dtype=torch.float32)
    rot = metrics.best_rotation(cov)
    assert rot.shape == cov.shape and rot.dtype == torch.float32
    np.testing.assert_allclose(torch.linalg.det(rot.double()).numpy(), 1.0, atol=1e-5)
