"""`foldtune params`: every named model on the meta device, JSON keys, counts equal the formulas."""

from __future__ import annotations

import json

import pytest

from adapters.zoo import FAIR_ESM2, MODEL_NAMES, build_meta_model
from pipeline.cli import main


def params_json(capsys, *argv: str):
    assert main(["params", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_name_builds_on_meta_and_counts_lorta(capsys, name):
    model = build_meta_model(name)
    assert all(p.is_meta for p in model.parameters())  # no weights allocated, nothing downloaded
    base = sum(p.numel() for p in model.parameters())
    out = params_json(capsys, "--model", name, "--method", "lorta", "--rank", "4", "--targets", "attn,mlp",
                      "--part", "stem")
    assert {"trainable_params", "total_params", "base_params", "stacks"} <= out.keys()
    layers, d, heads = FAIR_ESM2.get(name, (36, 2560, 40))
    assert out["trainable_params"] == 4 * (d + d // heads + heads + layers + 12)
    assert out["base_params"] == base and out["total_params"] == base + out["trainable_params"]
    assert out["stacks"]["stem"] == {"dim": d, "heads": heads, "head_dim": d // heads, "layers": layers,
                                     "types": 12, "sites": 6 * layers, "trainable": out["trainable_params"]}


def test_known_totals():
    # fair-esm ESM-2 parameter counts (tied LM head counted once), ESMFold v1 ~ 3.5 B
    totals = {name: sum(p.numel() for p in build_meta_model(name).parameters()) for name in
              ("esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D", "esm2_t33_650M_UR50D")}
    assert totals == {"esm2_t6_8M_UR50D": 7_512_474, "esm2_t12_35M_UR50D": 33_501_394,
                      "esm2_t33_650M_UR50D": 651_043_254}


def test_esmfold_trunk_per_stack_and_table(capsys):
    out = params_json(capsys, "--model", "esmfold_v1", "--method", "lora", "--rank", "2", "--targets", "qv",
                      "--part", "trunk")
    assert out["stacks"]["trunk_seq"]["trainable"] == 48 * 2 * (1024 + 2 * 1024)
    assert out["stacks"]["trunk_pair"]["trainable"] == 48 * 2 * 2 * 2 * (128 + 128)
    assert "stem" not in out["stacks"]
    rows = params_json(capsys, "--model", "esm2_t12_35M_UR50D", "--rank", "8", "--targets", "attn", "--table")
    by_method = {row["method"]: row["trainable_params"] for row in rows}
    assert by_method == {"none": 0, "full": 33_501_394, "lora": 12 * 4 * 8 * 960, "lorta": 540 * 8,
                         "tlora": 48 * 65}
    assert main(["params", "--model", "esm2_t12_35M_UR50D", "--table"]) == 0
    text = capsys.readouterr().out
    assert "lorta" in text and "4,320" in text


def test_bad_part_is_a_clear_error(capsys):
    assert main(["params", "--model", "esm2_t6_8M_UR50D", "--part", "trunk"]) == 2
    assert "has no trunk" in capsys.readouterr().out
