"""Training on full-length chains (issue 11): unobserved residues are seen by the model but contribute nothing
to the losses; crops of a gapped chain feed the tiny ESMFold with deposited-sequence position ids."""

from __future__ import annotations

import pytest
import torch
from transformers.models.esm.openfold_utils import Rigid, Rotation

from data.dataset import FoldingDataset, collate
from pipeline.features import make_ground_truth
from pipeline.losses import DEFAULT_WEIGHTS, folding_loss
from tests._train_helpers import make_dataset

N_SM = 3


def _random_frames(generator: torch.Generator, shape: tuple[int, ...]) -> Rigid:
    quats = torch.randn(*shape, 4, generator=generator, dtype=torch.float64)
    quats = quats / quats.norm(dim=-1, keepdim=True)
    return Rigid(Rotation(quats=quats, normalize_quats=False), 5.0 * torch.randn(*shape, 3, generator=generator,
                                                                                   dtype=torch.float64))


def _outputs_near_truth(batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """ESMFold-shaped outputs: the true structure plus noise where observed, random elsewhere."""
    truth = make_ground_truth(batch["aatype"], batch["atom37_positions"].double(), batch["atom37_mask"],
                              residue_mask=batch["mask"])
    b, n = batch["aatype"].shape
    noise = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    frames = Rigid.from_tensor_4x4(truth["backbone_frames"]).to_tensor_7()
    frames = frames[None].repeat(N_SM, 1, 1, 1)
    frames[..., 4:] += noise(N_SM, b, n, 3)
    sidechain = truth["rigidgroups_gt_frames"][None].repeat(N_SM, 1, 1, 1, 1, 1)
    sidechain[..., :3, 3] += noise(N_SM, b, n, 8, 3)
    positions = truth["atom14_gt_positions"][None].repeat(N_SM, 1, 1, 1, 1) + noise(N_SM, b, n, 14, 3)
    angles = noise(N_SM, b, n, 7, 2)
    return {
        "frames": frames, "sidechain_frames": sidechain, "positions": positions,
        "unnormalized_angles": angles, "angles": angles / angles.norm(dim=-1, keepdim=True),
        "distogram_logits": noise(b, n, n, 64), "lddt_head": noise(N_SM, b, n, 37, 50),
    }


def _perturb_unobserved(outputs: dict, unobserved: torch.Tensor, generator: torch.Generator) -> dict:
    """The same outputs with the predicted coordinates / frames of unobserved positions moved far away."""
    moved = {key: value.clone() for key, value in outputs.items()}
    where = unobserved[None]  # (1, B, L) over the structure-module layers
    far = _random_frames(generator, moved["frames"].shape[:-1]).to_tensor_7()
    far[..., 4:] += 80.0
    moved["frames"] = torch.where(where[..., None], far, moved["frames"])
    far_sc = _random_frames(generator, moved["sidechain_frames"].shape[:-2]).to_tensor_4x4()
    moved["sidechain_frames"] = torch.where(where[..., None, None, None], far_sc, moved["sidechain_frames"])
    shift = 60.0 + 20.0 * torch.randn(moved["positions"].shape, generator=generator, dtype=torch.float64)
    moved["positions"] = torch.where(where[..., None, None], moved["positions"] + shift, moved["positions"])
    return moved


def _loss_and_grads(outputs: dict, batch: dict) -> tuple[torch.Tensor, dict, dict]:
    leaves = {key: value.detach().clone().requires_grad_(True) for key, value in outputs.items()}
    total, terms = folding_loss(leaves, batch, weights={**DEFAULT_WEIGHTS, "plddt": 1.0})
    total.backward()
    return total.detach(), terms, {key: leaf.grad for key, leaf in leaves.items()}


@pytest.fixture(scope="module")
def gapped_batch(tmp_path_factory) -> dict:
    """Two full-length crops with unobserved positions: 1orc A (71, termini missing) and 5zng C (77, 62 seen)."""
    dataset, _ = make_dataset(tmp_path_factory.mktemp("gapped"), [("1orc.pdb", "train"), ("5zng.pdb", "train")])
    ds = FoldingDataset(dataset, crop_size=60, seed=0)
    batch = collate([ds[i] for i in range(len(ds))])
    assert (batch["mask"] - batch["observed"]).sum() > 0  # real unobserved positions inside the crops
    return batch


def test_unobserved_positions_contribute_nothing_to_any_loss(gapped_batch):
    generator = torch.Generator().manual_seed(0)
    outputs = _outputs_near_truth(gapped_batch, generator)
    unobserved = (gapped_batch["mask"] > 0) & (gapped_batch["observed"] == 0)
    moved = _perturb_unobserved(outputs, unobserved, generator)
    assert (moved["positions"] - outputs["positions"]).abs().amax() > 10.0
    base_total, base_terms, base_grads = _loss_and_grads(outputs, gapped_batch)
    moved_total, moved_terms, moved_grads = _loss_and_grads(moved, gapped_batch)
    for name in base_terms:
        torch.testing.assert_close(moved_terms[name], base_terms[name], rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(moved_total, base_total, rtol=1e-12, atol=1e-12)
    seen = gapped_batch["observed"].bool()[None]
    for key in ("frames", "sidechain_frames", "positions"):
        base, other = base_grads[key], moved_grads[key]
        torch.testing.assert_close(other[seen.expand(base.shape[: seen.dim()])],
                                   base[seen.expand(base.shape[: seen.dim()])], rtol=1e-10, atol=1e-12, msg=key)
        # and the unobserved coordinates themselves get no gradient
        assert base[unobserved[None].expand(base.shape[:3])].abs().max() == 0.0, key
    # the loss does react to observed coordinates (the test can fail)
    nudged = {**outputs, "positions": outputs["positions"] + 3.0 * seen[..., None, None]}
    assert not torch.isclose(_loss_and_grads(nudged, gapped_batch)[0], base_total)


def test_full_length_crops_train_a_tiny_esmfold(gapped_batch):
    from tests.test_losses_esmfold import TINY
    from transformers import EsmConfig, EsmForProteinFolding

    torch.manual_seed(0)
    model = EsmForProteinFolding(EsmConfig(**TINY)).eval()
    # Position ids are deposited-sequence indices: consecutive across the unobserved positions.
    for row in range(len(gapped_batch["chain_id"])):
        n = int(gapped_batch["mask"][row].sum())
        ids = gapped_batch["residue_index"][row, :n]
        assert torch.equal(ids, torch.arange(int(ids[0]), int(ids[0]) + n))
    out = model(gapped_batch["aatype"], attention_mask=gapped_batch["mask"].long(),
                position_ids=gapped_batch["residue_index"], num_recycles=0)
    total, terms = folding_loss(out, gapped_batch)
    assert torch.isfinite(total) and set(terms) == set(DEFAULT_WEIGHTS)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
