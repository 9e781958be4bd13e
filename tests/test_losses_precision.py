"""Losses under mixed precision (computed in fp32 whatever autocast says), AF2's pLDDT target for residues
without neighbours, and the AF2 loss options of the training config (FAPE clamp fraction, pLDDT resolution)."""

from __future__ import annotations

import pytest
import torch

from pipeline import losses
from tests.test_losses_structure import ground_truth, padded_batch, perturbed_outputs


def test_bf16_autocast_losses_equal_fp32_on_real_frames():
    """Real chains (1ubi, 1a8o) with perturbed predictions: under bf16 autocast every term is within 1e-3
    relative of fp32 (the FAPE einsums, ground-truth frames and pLDDT target stay fp32)."""
    batch = padded_batch()
    out = perturbed_outputs(ground_truth(batch))
    total32, terms32 = losses.folding_loss(out, batch)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        total16, terms16 = losses.folding_loss(out, batch)
    assert total16.dtype == torch.float32
    for name, value in terms32.items():
        rel = abs(terms16[name].item() - value.item()) / abs(value.item())
        assert rel <= 1e-3, f"{name}: bf16-autocast vs fp32 relative difference {rel:.2e}"
    assert abs(total16.item() - total32.item()) / total32.item() <= 1e-3


def test_bf16_predictions_are_cast_up_and_the_truth_never_down():
    """Predictions arriving in bf16 (a bf16 model's outputs) give exactly the loss of the same values in fp32:
    the ground truth (real coordinates, ~50 Å: 0.25 Å steps in bf16) is never rounded to bf16."""
    batch = padded_batch()
    out = perturbed_outputs(ground_truth(batch))
    half = {key: value.bfloat16() for key, value in out.items()}
    up = {key: value.float() for key, value in half.items()}
    _, terms_half = losses.folding_loss(half, batch)
    _, terms_up = losses.folding_loss(up, batch)
    for name in terms_up:
        assert terms_half[name].dtype == torch.float32
        assert terms_half[name].item() == pytest.approx(terms_up[name].item(), rel=1e-6), name


def test_plddt_target_of_a_residue_without_neighbours_is_one_as_in_af2():
    """Residues 1-2 are 3.8 Å apart, residue 3 is 40 Å from both (no observed CA within 15 Å). AF2/openfold give
    it lDDT 1 (eps·(1 + 0)/(eps + 0)), bin 49; residues 1-2 keep theirs (their distance 1.5 Å off: 2 of 4
    thresholds, 0.5 -> bin 25)."""
    true_ca = torch.tensor([[[0.0, 0, 0], [3.8, 0, 0], [43.8, 0, 0]]])
    pred_ca = torch.tensor([[[0.0, 0, 0], [5.3, 0, 0], [13.0, 7.0, 0]]])  # residue 3 placed anywhere
    mask = torch.ones(1, 3)
    want = torch.nn.functional.one_hot(torch.tensor([[25, 25, 49]]), 50).float() * 100.0
    assert losses.plddt_loss(want, pred_ca, true_ca, mask).item() < 1e-6
    old = torch.nn.functional.one_hot(torch.tensor([[25, 25, 0]]), 50).float() * 100.0  # the 0-target of before
    assert losses.plddt_loss(old, pred_ca, true_ca, mask).item() == pytest.approx(100.0 / 3, rel=1e-4)
    # An unobserved neighbour does not count: residue 2 missing leaves residue 1 alone too.
    part = torch.tensor([[1.0, 0.0, 1.0]])
    alone = torch.nn.functional.one_hot(torch.tensor([[49, 0, 49]]), 50).float() * 100.0
    assert losses.plddt_loss(alone, pred_ca, true_ca, part).item() < 1e-6


# ------------------------------------------------------------------ AF2 loss options of the training config

@pytest.fixture(scope="module")
def two_chain_dataset(tmp_path_factory):
    from tests._train_helpers import make_dataset

    # 1l2y: NMR (no resolution); 1ejg: X-ray 0.54 Å; 1ubi: X-ray 1.8 Å
    root = tmp_path_factory.mktemp("af2_options")
    return make_dataset(root / "dataset", [("1l2y.pdb", "train"), ("1ejg.pdb", "train"), ("1ubi.pdb", "val")])


def _task(dataset, out, **loss):
    from pipeline.config import resolve
    from pipeline.models import build_folding_model
    from pipeline.train import FoldingTask

    ds, splits = dataset
    cfg = resolve({"adapter": {"method": "none"}, "loss": loss,
                   "data": {"dataset": str(ds), "splits": str(splits), "crop_size": 24},
                   "output_dir": str(out)})
    return FoldingTask(build_folding_model(cfg["model"]).eval(), cfg, set()), cfg


def _batch(dataset, chain_ids):
    from data.dataset import FoldingDataset, collate

    data = FoldingDataset(dataset[0], chain_ids, crop_size=24)
    return collate([data[i] for i in range(len(data))])


def test_loss_options_are_in_the_config_with_af2_defaults_and_validated(tmp_path):
    from pipeline.config import ConfigError, resolve

    cfg = resolve({})
    assert cfg["loss"]["fape_clamp_fraction"] == 0.9 and cfg["loss"]["plddt_resolution"] == [0.1, 3.0]
    for loss, key in (({"fape_clamp_fraction": 1.5}, "loss.fape_clamp_fraction"),
                      ({"fape_clamp_fraction": -0.1}, "loss.fape_clamp_fraction"),
                      ({"plddt_resolution": [3.0, 0.1]}, "loss.plddt_resolution"),
                      ({"plddt_resolution": 2.0}, "loss.plddt_resolution")):
        with pytest.raises(ConfigError, match=key):
            resolve({"loss": loss})
    assert resolve({"loss": {"plddt_resolution": None}})["loss"]["plddt_resolution"] is None


def test_fape_is_clamped_in_the_configured_fraction_of_batches_seeded_per_global_batch(two_chain_dataset, tmp_path):
    task, _ = _task(two_chain_dataset, tmp_path / "a")
    again, _ = _task(two_chain_dataset, tmp_path / "b")
    draws = []
    for step in range(2000):
        task.batches_seen = again.batches_seen = step
        draws.append(task.fape_clamped())
        assert again.fape_clamped() == draws[-1]  # a function of (seed, global batch): resume draws alike
    assert 0.88 <= sum(draws) / len(draws) <= 0.92
    never, _ = _task(two_chain_dataset, tmp_path / "c", fape_clamp_fraction=0.0)
    always, _ = _task(two_chain_dataset, tmp_path / "d", fape_clamp_fraction=1.0)
    assert not any(never.fape_clamped() for never.batches_seen in range(50))
    assert all(always.fape_clamped() for always.batches_seen in range(50))


def test_training_loss_applies_the_clamp_choice_and_the_plddt_resolution_window(two_chain_dataset, tmp_path):
    """The training loss unclamps FAPE when told (the untrained model is far from the truth: > 10 Å errors), and
    trains pLDDT only on chains whose resolution is in loss.plddt_resolution (the dataset carries it)."""
    task, _ = _task(two_chain_dataset, tmp_path / "a")
    batch = _batch(two_chain_dataset, ["1l2y_A", "1ejg_A"])
    assert torch.isnan(batch["resolution"][0]) and batch["resolution"][1].item() == pytest.approx(0.54)
    with torch.no_grad():
        _, clamped, _ = task.compute_loss(batch, 0, clamp_fape=True)
        _, unclamped, _ = task.compute_loss(batch, 0, clamp_fape=False)
    assert unclamped["fape_bb"] > clamped["fape_bb"] * 1.05
    nmr = _batch(two_chain_dataset, ["1l2y_A"])
    open_task, _ = _task(two_chain_dataset, tmp_path / "b", plddt_resolution=None)
    with torch.no_grad():
        assert task.compute_loss(nmr, 0)[1]["plddt"].item() == 0.0  # NMR: no resolution, not trained
        assert open_task.compute_loss(nmr, 0)[1]["plddt"].item() > 0.1
        xray = _batch(two_chain_dataset, ["1ejg_A"])
        assert task.compute_loss(xray, 0)[1]["plddt"].item() == pytest.approx(
            open_task.compute_loss(xray, 0)[1]["plddt"].item(), rel=1e-6)
    narrow, _ = _task(two_chain_dataset, tmp_path / "c", plddt_resolution=[1.0, 3.0])
    with torch.no_grad():
        assert narrow.compute_loss(xray, 0)[1]["plddt"].item() == 0.0  # 0.54 Å is outside [1, 3]


def test_bf16_mixed_training_on_cpu_runs(two_chain_dataset, tmp_path):
    """`trainer.precision: bf16-mixed` on CPU: the forward runs under bf16 autocast, the losses (and the pLDDT
    target's lDDT, which crashed on bf16 CAs) in fp32."""
    from pipeline.config import resolve
    from pipeline.train import train

    ds, splits = two_chain_dataset
    cfg = resolve({"adapter": {"method": "lora", "rank": 2, "alpha": 4, "part": "all"},
                   "loss": {"plddt_resolution": None},
                   "data": {"dataset": str(ds), "splits": str(splits), "crop_size": 16, "batch_size": 2,
                            "val_split": None},
                   "trainer": {"max_steps": 2, "precision": "bf16-mixed", "warmup_steps": 0, "threads": 2},
                   "output_dir": str(tmp_path / "run")})
    result = train(cfg)
    assert result.summary["status"] == "finished", result.summary
    assert result.summary["precision"] == "bf16-mixed"
    assert result.summary["final_train_loss"] is not None and result.summary["final_train_loss"] > 0
