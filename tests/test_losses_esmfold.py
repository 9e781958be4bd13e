"""folding_loss on a tiny random HF EsmForProteinFolding: real 30-residue chains, padding, backward."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import EsmConfig, EsmForProteinFolding

from data.structure import read_chain
from pipeline.losses import DEFAULT_WEIGHTS, folding_loss
from tests.shared_data import SHARED_STRUCTURES

SHARED = SHARED_STRUCTURES
TINY = dict(
    vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    pad_token_id=1, mask_token_id=32, position_embedding_type="rotary", is_folding_model=True,
    esmfold_config={
        "fp16_esm": False,
        "trunk": {
            "num_blocks": 2, "sequence_state_dim": 64, "pairwise_state_dim": 32, "sequence_head_width": 16,
            "pairwise_head_width": 16, "max_recycles": 1, "chunk_size": None,
            "structure_module": {
                "sequence_dim": 64, "pairwise_dim": 32, "ipa_dim": 8, "resnet_dim": 16, "num_heads_ipa": 2,
                "num_qk_points": 2, "num_v_points": 2, "num_blocks": 2,
            },
        },
    },
)


@pytest.fixture(scope="module")
def model() -> EsmForProteinFolding:
    torch.manual_seed(0)
    return EsmForProteinFolding(EsmConfig(**TINY)).eval()  # no dropout: deterministic values


def real_batch(length: int = 30) -> dict[str, torch.Tensor]:
    """1ubi residues 1-30 and 1a8o residues 1-22 (padded to 30)."""
    batch = {
        "aatype": torch.zeros(2, length, dtype=torch.long),
        "residue_index": torch.zeros(2, length, dtype=torch.long),
        "mask": torch.zeros(2, length),
        "atom37_positions": torch.zeros(2, length, 37, 3),
        "atom37_mask": torch.zeros(2, length, 37),
    }
    for b, (name, n) in enumerate([("1ubi.pdb", length), ("1a8o.pdb", length - 8)]):
        chain = read_chain(SHARED / name)
        batch["aatype"][b, :n] = torch.as_tensor(chain.aatype[:n])
        batch["residue_index"][b, :n] = torch.as_tensor(chain.residue_index[:n])
        batch["mask"][b, :n] = 1.0
        batch["atom37_positions"][b, :n] = torch.as_tensor(chain.atom37_positions[:n])
        batch["atom37_mask"][b, :n] = torch.as_tensor(chain.atom37_mask[:n])
    return batch


def test_folding_loss_on_a_tiny_esmfold_is_finite_and_trains_trunk_and_structure_module(model):
    batch = real_batch()
    model.zero_grad()
    out = model(
        input_ids=batch["aatype"], attention_mask=batch["mask"].long(),
        position_ids=batch["residue_index"] - batch["residue_index"][:, :1], num_recycles=0,
    )
    total, terms = folding_loss(out, batch)
    assert torch.isfinite(total)
    assert set(terms) == set(DEFAULT_WEIGHTS)
    assert total.item() == pytest.approx(sum(DEFAULT_WEIGHTS[k] * v.item() for k, v in terms.items()), rel=1e-6)
    # A random model: FAPE is a fraction of its 1.0 ceiling, the heads start near uniform.
    assert 0.2 < terms["fape_bb"].item() < 1.0 and 0.2 < terms["fape_sc"].item() < 1.0
    assert terms["distogram"].item() == pytest.approx(math.log(64), abs=0.5)
    assert terms["plddt"].item() == pytest.approx(math.log(50), abs=0.5)
    assert 0.0 < terms["chi"].item() < 0.5 * 4 + 0.01 * 10

    total.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("trunk.blocks.") for n in with_grad)
    assert any(n.startswith("trunk.structure_module.ipa.") for n in with_grad)
    assert any(n.startswith("trunk.structure_module.angle_resnet.") for n in with_grad)  # chi + side chains
    assert any(n.startswith("distogram_head.") for n in with_grad)
    assert any(n.startswith("lddt_head.") for n in with_grad)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)


def test_padding_does_not_change_the_loss_of_the_tiny_model(model):
    """The padded second chain scores the same as the same chain alone."""
    batch = real_batch()
    with torch.no_grad():
        out = model(input_ids=batch["aatype"], attention_mask=batch["mask"].long(), num_recycles=0)
        _, batch_terms = folding_loss(out, batch)
        alone = {k: v[1:, :22] for k, v in batch.items()}
        out_alone = model(input_ids=alone["aatype"], num_recycles=0)
        _, alone_terms = folding_loss(out_alone, alone)
        first = {k: v[:1] for k, v in batch.items()}
        _, first_terms = folding_loss(model(input_ids=first["aatype"], num_recycles=0), first)
    for name in batch_terms:
        expected = (first_terms[name] + alone_terms[name]).item() / 2
        assert batch_terms[name].item() == pytest.approx(expected, rel=2e-3, abs=1e-4), name
