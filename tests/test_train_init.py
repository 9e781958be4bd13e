"""Fresh folding heads get ESMFold's (AF2 supplement 1.11.4) initialisers, not upstream's BERT N(0, 0.02)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.esm.modeling_esmfold import EsmFoldLinear

from pipeline.config import ConfigError
from pipeline.models import build_folding_model, check_size_overrides


@pytest.fixture(scope="module")
def model():
    return build_folding_model({"source": "random"})


def test_structure_module_starts_at_identity_frames(model):
    sm = model.trunk.structure_module
    assert torch.count_nonzero(sm.bb_update.linear.weight) == 0  # init="final": every frame starts at the identity
    assert torch.count_nonzero(sm.bb_update.linear.bias) == 0
    torch.testing.assert_close(torch.nn.functional.softplus(sm.ipa.head_weights),
                               torch.ones_like(sm.ipa.head_weights))
    model.eval()
    with torch.no_grad():
        out = model(torch.randint(0, 20, (1, 9)), num_recycles=0)
    # identity quaternion (1, 0, 0, 0) and zero translation in the first layer: one collapsed point
    torch.testing.assert_close(out.frames[0, 0, :, :4], torch.tensor([[1.0, 0, 0, 0]]).expand(9, 4))
    assert out.frames[0, 0, :, 4:].abs().max() == 0


def test_esmfold_linear_layers_follow_their_init_tag(model):
    seen = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, EsmFoldLinear) or layer.init_fn is not None:
            continue
        seen.add(layer.init)
        fan_in = layer.weight.shape[1]
        if layer.init == "final":
            assert torch.count_nonzero(layer.weight) == 0, name
        elif layer.init == "gating":
            assert torch.count_nonzero(layer.weight) == 0 and torch.all(layer.bias == 1), name
        elif layer.init in ("default", "relu") and layer.weight.numel() >= 256:
            expected = math.sqrt((1.0 if layer.init == "default" else 2.0) / fan_in)
            assert abs(layer.weight.std().item() / expected - 1) < 0.25, (name, layer.weight.std().item(), expected)
    assert {"final", "default", "relu"} <= seen


def test_trunk_blocks_start_as_identity_residuals(model):
    for block in model.trunk.blocks:
        for layer in (block.seq_attention.o_proj, block.mlp_seq.mlp[-2], block.mlp_pair.mlp[-2],
                      block.tri_mul_in.linear_z, block.tri_att_start.mha.linear_o, block.sequence_to_pair.o_proj):
            assert torch.count_nonzero(layer.weight) == 0
    assert torch.count_nonzero(model.trunk.recycle_disto.weight[0]) == 0
    # a plain Linear of the trunk gets PyTorch's default (std 1/sqrt(3 fan_in)), not BERT's 0.02
    proj = model.trunk.blocks[0].seq_attention.proj.weight
    assert proj.std().item() > 2 * 0.02


def test_same_config_same_weights_and_stem_untouched():
    a, b = build_folding_model({"source": "random"}), build_folding_model({"source": "random"})
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name
    # the stem keeps the EsmModel initialisation (BERT std 0.02)
    assert abs(a.esm.encoder.layer[0].attention.self.query.weight.std().item() - 0.02) < 0.005


def test_max_recycles_zero_is_a_valid_size():
    check_size_overrides({"trunk": {"max_recycles": 0}})
    with pytest.raises(ConfigError, match="max_recycles"):
        check_size_overrides({"trunk": {"max_recycles": -1}})
    model = build_folding_model({"source": "random", "size": {"trunk": {"max_recycles": 0}}})
    model.eval()
    with torch.no_grad():
        out = model(torch.randint(0, 20, (1, 7)))  # num_recycles=None: one trunk pass, not zero
    assert out.positions.shape == (2, 1, 7, 14, 3)
