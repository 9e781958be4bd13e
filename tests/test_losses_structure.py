"""pipeline.losses: values at the truth on real chains, hand-computed cases, invariances, renaming, masks, gradients."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers.models.esm.openfold_utils import Rigid, Rotation
from transformers.models.esm.openfold_utils import residue_constants as rc

from data.structure import read_chain
from pipeline import losses
from pipeline.features import make_ground_truth
from tests.shared_data import SHARED_STRUCTURES

SHARED = SHARED_STRUCTURES
N_SM = 3
FAPE_AT_TRUTH = math.sqrt(1e-4) / 10.0  # sqrt(eps)/length_scale


@functools.lru_cache(maxsize=None)
def padded_batch(names: tuple[str, ...] = ("1ubi.pdb", "1a8o.pdb"), length: int = 48) -> dict[str, torch.Tensor]:
    """Real chains cropped to <= `length`, the second one shortened by 12 so the batch has padding."""
    batch = {
        "aatype": torch.zeros(len(names), length, dtype=torch.long),
        "mask": torch.zeros(len(names), length),
        "atom37_positions": torch.zeros(len(names), length, 37, 3),
        "atom37_mask": torch.zeros(len(names), length, 37),
    }
    for b, name in enumerate(names):
        chain = read_chain(SHARED / name)
        n = length - 12 * b
        batch["aatype"][b, :n] = torch.as_tensor(chain.aatype[:n])
        batch["mask"][b, :n] = 1.0
        batch["atom37_positions"][b, :n] = torch.as_tensor(chain.atom37_positions[:n])
        batch["atom37_mask"][b, :n] = torch.as_tensor(chain.atom37_mask[:n])
    return batch


def ground_truth(batch):
    return make_ground_truth(batch["aatype"], batch["atom37_positions"], batch["atom37_mask"], residue_mask=batch["mask"])


def true_distogram_bins(gt) -> torch.Tensor:
    dist = torch.cdist(gt["pseudo_beta"], gt["pseudo_beta"])
    return (dist[..., None] > torch.linspace(2.3125, 21.6875, 63)).sum(-1)


def outputs_from_truth(gt, n_sm: int = N_SM, garbage_in_padding: bool = True) -> dict[str, torch.Tensor]:
    """An ESMFold-shaped 'prediction' that is the ground truth itself (padding filled with noise)."""
    gen = torch.Generator().manual_seed(0)
    pad = (gt["seq_mask"] == 0) if garbage_in_padding else torch.zeros_like(gt["seq_mask"], dtype=torch.bool)

    def noisy(x: torch.Tensor, lead: int) -> torch.Tensor:
        where = pad.view(*pad.shape, *([1] * (x.dim() - lead)))
        return torch.where(where, torch.randn(x.shape, generator=gen) * 10, x)

    frames7 = Rigid.from_tensor_4x4(gt["backbone_frames"]).to_tensor_7()
    frames7 = torch.where(pad[..., None], Rigid.identity(pad.shape, requires_grad=False, fmt="quat").to_tensor_7(), frames7)
    unit = torch.tensor([0.0, 1.0])
    angles = torch.where(gt["torsion_angles_mask"][..., None].bool(), gt["torsion_angles_sin_cos"], unit)
    repeat = lambda x: x[None].repeat(n_sm, *([1] * x.dim()))  # noqa: E731
    lddt_logits = torch.zeros(*gt["seq_mask"].shape, 37, 50)
    lddt_logits[..., 49] = 100.0  # lDDT of the truth is 1 -> top bin
    return {
        "frames": repeat(frames7),
        "sidechain_frames": repeat(gt["rigidgroups_gt_frames"]),
        "positions": repeat(noisy(gt["atom14_gt_positions"], 2)),
        "angles": repeat(angles),
        "unnormalized_angles": repeat(angles),
        "distogram_logits": torch.nn.functional.one_hot(true_distogram_bins(gt), 64).float() * 100.0,
        "lddt_head": repeat(lddt_logits),
    }


def perturbed_outputs(gt, scale: float = 1.5, seed: int = 1) -> dict[str, torch.Tensor]:
    """The truth with noise on every output, so losses are well above their minimum."""
    gen = torch.Generator().manual_seed(seed)
    out = outputs_from_truth(gt)
    noise = lambda x: torch.randn(x.shape, generator=gen) * scale  # noqa: E731
    rot = Rotation(quats=torch.nn.functional.normalize(torch.tensor([1.0, 0, 0, 0]) + noise(out["frames"][..., :4]) * 0.2, dim=-1))
    out["frames"] = Rigid(rot, out["frames"][..., 4:] + noise(out["frames"][..., 4:])).to_tensor_7()
    out["positions"] = out["positions"] + noise(out["positions"])
    out["sidechain_frames"] = out["sidechain_frames"].clone()
    out["sidechain_frames"][..., :3, 3] += noise(out["sidechain_frames"][..., :3, 3])
    out["unnormalized_angles"] = out["angles"] + noise(out["angles"]) * 0.3
    out["angles"] = torch.nn.functional.normalize(out["unnormalized_angles"], dim=-1)
    out["distogram_logits"] = noise(out["distogram_logits"])
    out["lddt_head"] = noise(out["lddt_head"])
    return out


def random_rigid_motion(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen))
    q = q * torch.linalg.det(q)  # proper rotation
    return q, torch.randn(3, generator=gen) * 20


def move_outputs(out, rot, shift):
    moved = dict(out)
    global_frame = Rigid(Rotation(rot_mats=rot), shift)
    moved["frames"] = global_frame.compose(Rigid.from_tensor_7(out["frames"])).to_tensor_7()
    as4 = torch.eye(4)
    as4[:3, :3], as4[:3, 3] = rot, shift
    moved["sidechain_frames"] = as4 @ out["sidechain_frames"]
    moved["positions"] = out["positions"] @ rot.T + shift
    return moved


# ---------------------------------------------------------------- values at the truth (real chains, B=2, padding)


def test_every_loss_is_at_its_minimum_for_the_truth():
    batch = padded_batch()
    gt = ground_truth(batch)
    out = outputs_from_truth(gt)
    assert losses.backbone_fape(out["frames"], gt["backbone_frames"], gt["backbone_rigid_mask"]).item() == pytest.approx(FAPE_AT_TRUTH, abs=2e-6)
    assert losses.sidechain_fape(out["sidechain_frames"], out["positions"], gt).item() == pytest.approx(FAPE_AT_TRUTH, abs=2e-6)
    assert losses.distogram_loss(out["distogram_logits"], gt["pseudo_beta"], gt["pseudo_beta_mask"]).item() < 1e-6
    ca = batch["atom37_positions"][..., 1, :]
    plddt = losses.plddt_loss(out["lddt_head"][-1][..., 1, :], out["positions"][-1][..., 1, :], ca, gt["atom14_gt_exists"][..., 1])
    assert plddt.item() < 1e-6
    chi = losses.chi_loss(out["angles"], out["unnormalized_angles"], batch["aatype"], gt["seq_mask"], gt["chi_mask"], gt["chi_angles_sin_cos"])
    assert chi.item() == pytest.approx(0.01 * (math.sqrt(1 + 1e-6) - 1), abs=1e-7)
    total, terms = losses.folding_loss(out, batch)
    expected = 0.5 * FAPE_AT_TRUTH + 0.5 * FAPE_AT_TRUTH + 1.0 * chi.item()
    assert total.item() == pytest.approx(expected, abs=5e-6)
    assert set(terms) == {"fape_bb", "fape_sc", "distogram", "plddt", "chi"}


def test_losses_are_large_away_from_the_truth():
    gt = ground_truth(padded_batch())
    at_truth = losses.folding_loss(outputs_from_truth(gt), padded_batch())[1]
    away = losses.folding_loss(perturbed_outputs(gt), padded_batch())[1]
    for name in at_truth:
        assert away[name] > at_truth[name] + 0.05, name


# ---------------------------------------------------------------- hand-computed cases


def two_residue_frames(second_origin: tuple[float, float, float]) -> torch.Tensor:
    frames = torch.eye(4).repeat(1, 2, 1, 1)
    frames[0, 1, :3, 3] = torch.tensor(second_origin)
    return frames


def test_backbone_fape_two_residues_by_hand():
    truth = two_residue_frames((3.8, 0.0, 0.0))
    mask = torch.ones(1, 2)
    pred = two_residue_frames((3.8, 1.0, 0.0))  # residue 2 displaced 1 Å along y, rotations identity
    # pairs (frame i, point j): (1,1) 0, (1,2) 1 Å, (2,1) 1 Å, (2,2) 0  -> each sqrt(d^2 + eps), mean, / 10 Å
    expected = (2 * math.sqrt(1.0 + 1e-4) + 2 * math.sqrt(1e-4)) / 4 / 10
    assert losses.backbone_fape(pred, truth, mask).item() == pytest.approx(expected, rel=1e-6)
    far = two_residue_frames((3.8, 30.0, 0.0))  # 30 Å error is clamped at 10 Å
    assert losses.backbone_fape(far, truth, mask).item() == pytest.approx((2 * 10 + 2 * math.sqrt(1e-4)) / 4 / 10, rel=1e-6)
    assert losses.backbone_fape(far, truth, mask, clamp_distance=None).item() == pytest.approx(
        (2 * math.sqrt(900 + 1e-4) + 2 * math.sqrt(1e-4)) / 4 / 10, rel=1e-6
    )
    # A frame rotated by 90° about z at residue 1 sees residue 2 at (0, 3.8, 0) instead of (3.8, 0, 0).
    turned = truth.clone()
    turned[0, 0, :3, :3] = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    err = math.sqrt(2 * 3.8**2 + 1e-4)
    assert losses.backbone_fape(turned, truth, mask).item() == pytest.approx((err + 3 * math.sqrt(1e-4)) / 4 / 10, rel=1e-6)
    # A masked frame/point drops out: only the (1,1) pair is left.
    assert losses.backbone_fape(pred, truth, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.sqrt(1e-4) / 10, rel=1e-6)


def test_distogram_two_residues_by_hand():
    pseudo_beta = torch.tensor([[[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])
    mask = torch.ones(1, 2)
    # boundaries 2.3125 + 0.3125 k (k = 0..62): 9 of them lie below 5 Å -> bin 9; the diagonal is bin 0.
    logits = torch.zeros(1, 2, 2, 64)
    assert losses.distogram_loss(logits, pseudo_beta, mask).item() == pytest.approx(math.log(64), rel=1e-6)
    v = 3.0
    logits[0, 0, 0, 0] = logits[0, 1, 1, 0] = logits[0, 0, 1, 9] = logits[0, 1, 0, 9] = v
    expected = -math.log(math.exp(v) / (math.exp(v) + 63))
    assert losses.distogram_loss(logits, pseudo_beta, mask).item() == pytest.approx(expected, rel=1e-6)
    logits[0, 0, 1, 9] = logits[0, 1, 0, 9] = 0.0
    logits[0, 0, 1, 10] = logits[0, 1, 0, 10] = v  # one bin off for the off-diagonal pairs
    wrong = -math.log(1 / (math.exp(v) + 63))
    assert losses.distogram_loss(logits, pseudo_beta, mask).item() == pytest.approx((expected + wrong) / 2, rel=1e-6)
    far = torch.tensor([[[0.0, 0.0, 0.0], [40.0, 0.0, 0.0]]])  # beyond 21.6875 Å -> last bin 63
    logits = torch.zeros(1, 2, 2, 64)
    logits[..., 0] = 50.0
    logits[0, 0, 1] = logits[0, 1, 0] = torch.nn.functional.one_hot(torch.tensor(63), 64) * 50.0
    assert losses.distogram_loss(logits, far, mask).item() < 1e-6


def test_plddt_target_bins_by_hand():
    true_ca = torch.tensor([[[0.0, 0, 0], [3.8, 0, 0], [7.6, 0, 0]]])
    pred_ca = torch.tensor([[[0.0, 0, 0], [3.8, 0, 0], [9.1, 0, 0]]])  # residue 3 off by 1.5 Å
    mask = torch.ones(1, 3)
    # |Δd| = 1.5 Å passes the 2 and 4 Å thresholds (1/2), 0 passes all: lDDT = (0.75, 0.75, 0.5)
    logits = torch.nn.functional.one_hot(torch.tensor([[37, 37, 25]]), 50).float() * 100.0  # floor(50·lDDT)
    assert losses.plddt_loss(logits, pred_ca, true_ca, mask).item() < 1e-6
    shifted = torch.nn.functional.one_hot(torch.tensor([[38, 37, 25]]), 50).float() * 100.0
    assert losses.plddt_loss(shifted, pred_ca, true_ca, mask).item() == pytest.approx(100.0 / 3, rel=1e-4)
    assert losses.plddt_loss(torch.zeros(1, 3, 50), pred_ca, true_ca, mask).item() == pytest.approx(math.log(50), rel=1e-6)
    # Residue 3 missing in the truth: it is neither scored nor a partner; residues 1-2 then score 1.0 -> bin 49.
    part = torch.tensor([[1.0, 1.0, 0.0]])
    top = torch.nn.functional.one_hot(torch.tensor([[49, 49, 0]]), 50).float() * 100.0
    assert losses.plddt_loss(top, pred_ca, true_ca, part).item() < 1e-6
    # With no pair inside the 15 Å inclusion radius a residue's target is lDDT 1 (top bin), as in AF2/openfold.
    spread = true_ca * 10
    top = torch.nn.functional.one_hot(torch.full((1, 3), 49), 50).float() * 100.0
    assert losses.plddt_loss(top, spread + 5.0 * torch.rand(1, 3, 3), spread, mask).item() < 1e-6


def test_chi_loss_by_hand_and_pi_periodic_chis():
    # one PHE (chi2 pi-periodic) and one LYS (no symmetric chi); chi angles in (sin, cos)
    aatype = torch.tensor([[rc.restype_order["F"], rc.restype_order["K"]]])
    chi_mask = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])
    true_chi = torch.nn.functional.normalize(torch.randn(1, 2, 4, 2, generator=torch.Generator().manual_seed(0)), dim=-1)
    seq_mask = torch.ones(1, 2)

    def angles(chi):
        a = torch.zeros(1, 2, 7, 2)
        a[..., 1] = 1.0
        a[:, :, 3:] = chi
        return a

    def loss(chi):
        a = angles(chi)
        return losses.chi_loss(a, a, aatype, seq_mask, chi_mask, true_chi, angle_norm_weight=0.0).item()

    assert loss(true_chi) == pytest.approx(0.0, abs=1e-7)
    flipped = true_chi.clone()
    flipped[0, 0, 1] *= -1  # PHE chi2 + pi: same side chain
    assert loss(flipped) == pytest.approx(0.0, abs=1e-7)
    flipped[0, 1, 1] *= -1  # LYS chi2 + pi: chord length 2 -> squared error 4, 1 of 6 observed chis
    assert loss(flipped) == pytest.approx(0.5 * 4 / 6, rel=1e-5)
    # angle-norm term: |norm - 1| averaged over the 7 torsions of real residues
    a = angles(true_chi)
    assert losses.chi_loss(a, 2 * a, aatype, seq_mask, chi_mask, true_chi, chi_weight=0.0).item() == pytest.approx(0.01, rel=1e-4)


# ---------------------------------------------------------------- invariances


def test_fape_and_plddt_are_invariant_to_a_global_rigid_motion_of_the_prediction():
    batch = padded_batch()
    gt = ground_truth(batch)
    out = perturbed_outputs(gt)
    moved = move_outputs(out, *random_rigid_motion())
    ca = batch["atom37_positions"][..., 1, :]
    ca_mask = gt["atom14_gt_exists"][..., 1]
    for a, b in [
        (losses.backbone_fape(out["frames"], gt["backbone_frames"], gt["backbone_rigid_mask"]),
         losses.backbone_fape(moved["frames"], gt["backbone_frames"], gt["backbone_rigid_mask"])),
        (losses.sidechain_fape(out["sidechain_frames"], out["positions"], gt),
         losses.sidechain_fape(moved["sidechain_frames"], moved["positions"], gt)),
        (losses.plddt_loss(out["lddt_head"][-1][..., 1, :], out["positions"][-1][..., 1, :], ca, ca_mask),
         losses.plddt_loss(out["lddt_head"][-1][..., 1, :], moved["positions"][-1][..., 1, :], ca, ca_mask)),
    ]:
        assert a.item() > 0.05
        assert a.item() == pytest.approx(b.item(), rel=1e-4)


def test_losses_are_invariant_to_a_global_rigid_motion_of_the_truth():
    batch = padded_batch()
    gt = ground_truth(batch)
    out = perturbed_outputs(gt)
    rot, shift = random_rigid_motion(seed=7)
    moved_batch = dict(batch, atom37_positions=(batch["atom37_positions"] @ rot.T + shift) * batch["atom37_mask"][..., None])
    _, terms = losses.folding_loss(out, batch)
    _, moved_terms = losses.folding_loss(out, moved_batch)
    for name in terms:
        assert terms[name].item() == pytest.approx(moved_terms[name].item(), rel=1e-4), name


# ---------------------------------------------------------------- symmetric renaming (Alg. 26)


def test_swapped_symmetric_atoms_in_the_prediction_keep_sidechain_fape_at_the_truth_value():
    batch = padded_batch()
    gt = ground_truth(batch)
    # A prediction with PHE/TYR CD1<->CD2, CE1<->CE2, ASP OD1<->OD2, GLU OE1<->OE2 swapped (and so the last
    # chi frame turned by pi) is as correct as the truth.
    positions, frames = gt["atom14_alt_gt_positions"], gt["rigidgroups_alt_gt_frames"]
    renamed = losses.rename_symmetric_ground_truth(positions, gt)
    ambiguous_residues = (gt["atom14_atom_is_ambiguous"] * gt["atom14_gt_exists"]).sum(-1) > 0
    assert ambiguous_residues.sum() >= 4
    assert torch.equal(renamed["alt_naming_is_better"].bool(), ambiguous_residues)
    assert losses.sidechain_fape(frames, positions, gt).item() == pytest.approx(FAPE_AT_TRUTH, abs=2e-6)
    # Without renaming the same prediction is penalised.
    no_alt = dict(gt, atom14_alt_gt_positions=gt["atom14_gt_positions"], rigidgroups_alt_gt_frames=gt["rigidgroups_gt_frames"])
    assert losses.sidechain_fape(frames, positions, no_alt).item() > FAPE_AT_TRUTH + 5e-3
    # The truth's own naming is kept when it is the closer one.
    assert losses.rename_symmetric_ground_truth(gt["atom14_gt_positions"], gt)["alt_naming_is_better"].sum() == 0


def test_renaming_follows_each_residue_of_a_noisy_prediction():
    batch = padded_batch()
    gt = ground_truth(batch)
    ambiguous_residues = ((gt["atom14_atom_is_ambiguous"] * gt["atom14_gt_exists"]).sum(-1) > 0).nonzero().tolist()
    swap = {tuple(r) for r in ambiguous_residues[::2]}  # swap every other ambiguous residue
    pred = gt["atom14_gt_positions"].clone()
    for b, i in swap:
        pred[b, i] = gt["atom14_alt_gt_positions"][b, i]
    pred = pred + torch.randn(pred.shape, generator=torch.Generator().manual_seed(5)) * 0.1
    chosen = losses.rename_symmetric_ground_truth(pred, gt)["alt_naming_is_better"]
    assert {tuple(r) for r in chosen.nonzero().tolist()} == swap


# ---------------------------------------------------------------- padding, batching, gradients, weights


def test_batch_loss_is_the_mean_of_per_chain_losses_and_ignores_padding():
    batch = padded_batch()
    out = perturbed_outputs(ground_truth(batch))
    _, terms = losses.folding_loss(out, batch)
    per_chain = []
    for b, n in enumerate([48, 36]):
        single_batch = {k: v[b : b + 1, :n] for k, v in batch.items()}
        single_out = {
            k: (v[b : b + 1, :n, :n] if k == "distogram_logits" else v[:, b : b + 1, :n]) for k, v in out.items()
        }
        per_chain.append(losses.folding_loss(single_out, single_batch)[1])
    for name in terms:
        assert terms[name].item() == pytest.approx((per_chain[0][name] + per_chain[1][name]).item() / 2, rel=1e-4), name


def test_gradients_reach_every_prediction_input_and_not_the_padding():
    batch = padded_batch()
    out = {k: v.clone().requires_grad_(True) for k, v in perturbed_outputs(ground_truth(batch)).items()}
    total, _ = losses.folding_loss(out, batch)
    total.backward()
    pad = batch["mask"] == 0
    for name, tensor in out.items():
        grad = tensor.grad
        assert grad is not None and torch.isfinite(grad).all(), name
        real = grad[:, ~pad] if name != "distogram_logits" else grad[~pad]
        assert real.abs().sum() > 0, name
        padded = grad[:, pad] if name != "distogram_logits" else grad[pad]
        assert padded.abs().sum() == 0, name
    assert out["frames"].grad[:-1].abs().sum() > 0  # backbone FAPE trains every structure-module layer


def test_weights_override_defaults_and_reject_unknown_keys():
    batch = padded_batch()
    out = perturbed_outputs(ground_truth(batch))
    total, terms = losses.folding_loss(out, batch)
    assert total.item() == pytest.approx(sum(losses.DEFAULT_WEIGHTS[k] * v.item() for k, v in terms.items()), rel=1e-6)
    total2, terms2 = losses.folding_loss(out, batch, weights={"fape_sc": 0.0, "distogram": 1.0})
    assert "fape_sc" not in terms2
    assert total2.item() == pytest.approx(total.item() - 0.5 * terms["fape_sc"].item() + 0.7 * terms["distogram"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="fape_backbone"):
        losses.folding_loss(out, batch, weights={"fape_backbone": 1.0})
    with pytest.raises(ValueError, match="lddt_head"):
        losses.folding_loss({k: v for k, v in out.items() if k != "lddt_head"}, batch)


def test_plddt_resolution_filter_drops_chains_outside_the_range():
    batch = dict(padded_batch(), resolution=torch.tensor([1.8, float("nan")]))
    out = perturbed_outputs(ground_truth(batch))
    _, all_terms = losses.folding_loss(out, batch)
    _, filtered = losses.folding_loss(out, batch, plddt_resolution_range=(0.1, 3.0))
    first = {k: v[:1] for k, v in padded_batch().items()}
    first_out = {k: (v[:1] if k == "distogram_logits" else v[:, :1]) for k, v in out.items()}
    _, first_terms = losses.folding_loss(first_out, first)
    assert filtered["plddt"].item() == pytest.approx(first_terms["plddt"].item() / 2, rel=1e-5)
    assert filtered["fape_bb"].item() == pytest.approx(all_terms["fape_bb"].item(), rel=1e-6)
