"""`foldtune export --merged`: plain transformers loads the merged model and folds as foldtune's unmerged run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pipeline.cli import main
from pipeline.predict import Target, chain_from_sequence, fold, load_run_model
from tests._adapter_runs import make_run

SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLEERLG"

# Runs in a fresh interpreter that imports transformers only (asserted): upstream is the oracle.
UPSTREAM = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from transformers import EsmForProteinFolding
    from transformers.models.esm.openfold_utils import atom14_to_atom37
    model = EsmForProteinFolding.from_pretrained(sys.argv[1]).eval()
    with torch.no_grad():
        out = model.infer(sys.argv[2])
    features = {"residx_atom37_to_atom14": out["residx_atom37_to_atom14"], "atom37_atom_exists": out["atom37_atom_exists"]}
    atom37 = atom14_to_atom37(out["positions"][-1], features)[0].numpy()
    np.save(sys.argv[3], atom37 * out["atom37_atom_exists"][0, ..., None].numpy())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    assert not any(name.split(".")[0] in ("adapters", "pipeline", "data") for name in sys.modules), "foldtune imported"
    print("dtypes", dtypes)
""")


def upstream_positions(directory, tmp_path) -> np.ndarray:
    out = tmp_path / "upstream.npy"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-I", "-c", UPSTREAM, str(directory), SEQUENCE, str(out)], check=True,
                   cwd=tmp_path, env=env, timeout=300)
    return np.load(out)


def foldtune_positions(run) -> np.ndarray:
    """foldtune's unmerged prediction with the trunk passes of upstream's `infer`: with num_recycles None
    upstream runs max_recycles passes, while an explicit n runs n + 1, so n = max_recycles - 1 here."""
    from pipeline.models import max_recycles

    model = load_run_model(run)
    chain = fold(model, [Target("x", chain_from_sequence("x", SEQUENCE))], num_recycles=max_recycles(model) - 1)[0][0]
    return chain.atom37_positions * chain.atom37_mask[..., None]


@pytest.mark.parametrize("adapter", [
    {"method": "lorta", "rank": 2, "targets": ["attn", "mlp"], "part": "all"},
    {"method": "lora", "rank": 2, "targets": ["qv"], "part": "trunk"},  # partial fused rows: merge only
])
def test_merged_export_folds_like_the_unmerged_run_in_plain_transformers(tmp_path, adapter, capsys):
    run = make_run(tmp_path, adapter["method"], adapter, model={"train_heads": True})
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    loss = float(capsys.readouterr().out.split("update loss ")[1].split()[0])
    assert loss < 1e-6  # fp32 base: only fp32 rounding of W + dW
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == ["EsmForProteinFolding"]
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
        assert not any("adapter" in key or "lorta" in key for key in handle.keys())
    want = foldtune_positions(run)
    got = upstream_positions(tmp_path / "merged", tmp_path)
    assert float(np.abs(got - want).max()) <= 1e-3
    base = make_run(tmp_path, "none", {"method": "none", "part": "all"})
    assert float(np.abs(foldtune_positions(base) - want).max()) > 1e-2  # the adapter changed the fold


def test_merged_export_into_a_bf16_base_warns_with_the_measured_loss(tmp_path, capsys):
    from pipeline.models import build_folding_model

    base_dir = tmp_path / "esmfold_bf16"
    build_folding_model({"source": "random"}).to(torch.bfloat16).save_pretrained(str(base_dir))
    run = make_run(tmp_path, "lora", {"method": "lora", "rank": 2, "targets": ["attn"], "part": "trunk"},
                   model={"source": "esmfold_pretrained", "path": str(base_dir)}, scale=1e-3)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    captured = capsys.readouterr()
    assert "lose" in captured.err and "of the adapter update" in captured.err
    loss = float(captured.out.split("update loss ")[1].split()[0])
    assert 1e-3 < loss <= 1.5
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
        assert handle.get_slice("trunk.blocks.0.seq_attention.proj.weight").get_dtype() == "BF16"
