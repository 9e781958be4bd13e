"""Upstream oracle: a tiny ESMFold saved by transformers' own `save_pretrained` with the fields of the published
`facebook/esmfold_v1` config.json (only the sizes shrunk), folded by `foldtune predict` and trained through our
forward, against transformers' `EsmForProteinFolding` (`infer`, `infer_pdb`, `forward`) on the same files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import EsmConfig
from transformers.models.esm.modeling_esmfold import EsmForProteinFolding

from pipeline.cli import main
from pipeline.config import resolve
from pipeline.models import build_folding_model
from pipeline.predict import Target, chain_from_sequence, fold
from pipeline.train import FoldingTask, attach_method

# facebook/esmfold_v1 config.json: every field as published, only sizes shrunk (hidden_size 2560 -> 32, 36 -> 2
# layers, 40 -> 4 heads, 48 -> 2 trunk blocks, trunk/structure-module widths, 8 -> 3 structure-module blocks,
# lddt_head_hid_dim 128 -> 16).
ESMFOLD_V1_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "D", "Q", "K", "I",
                    "P", "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>"]
ESMFOLD_V1_FIELDS = {
    "attention_probs_dropout_prob": 0.0, "classifier_dropout": None, "emb_layer_norm_before": False,
    "esmfold_config": {
        "bypass_lm": False, "embed_aa": True, "esm_ablate_pairwise": False, "esm_ablate_sequence": False,
        "esm_input_dropout": 0, "esm_type": "esm2_3B", "fp16_esm": True, "lddt_head_hid_dim": 16,
        "trunk": {
            "chunk_size": None, "cpu_grad_checkpoint": False, "dropout": 0, "layer_drop": 0, "max_recycles": 4,
            "num_blocks": 2, "pairwise_head_width": 8, "pairwise_state_dim": 16, "position_bins": 32,
            "sequence_head_width": 8, "sequence_state_dim": 32,
            "structure_module": {
                "dropout_rate": 0.1, "epsilon": 1e-08, "inf": 100000.0, "ipa_dim": 8, "num_angles": 7,
                "num_blocks": 3, "num_heads_ipa": 2, "num_qk_points": 4, "num_resnet_blocks": 2,
                "num_transition_layers": 1, "num_v_points": 8, "pairwise_dim": 16, "resnet_dim": 16,
                "sequence_dim": 32, "trans_scale_factor": 10,
            },
        },
        "use_esm_attn_map": False,
    },
    "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 32, "initializer_range": 0.02,
    "intermediate_size": 64, "is_folding_model": True, "layer_norm_eps": 1e-05, "mask_token_id": 32,
    "max_position_embeddings": 1026, "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 1,
    "position_embedding_type": "rotary", "token_dropout": True, "use_cache": True, "vocab_list": ESMFOLD_V1_VOCAB,
    "vocab_size": 33,
}
SEQUENCES = {"alpha": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "beta": "GSHMLEDPVKWTYCNR"}


@pytest.fixture(scope="module")
def esmfold_dir(tmp_path_factory):
    """The directory as the hub holds it: config.json with fp16_esm true, fp32 weights (seeded, random, scaled
    like trained ones so that folds, distograms and recycling bins are far from the identity-frame start)."""
    directory = tmp_path_factory.mktemp("esmfold_v1_tiny") / "model"
    torch.manual_seed(0)
    model = EsmForProteinFolding(EsmConfig(**ESMFOLD_V1_FIELDS)).float()  # fp16_esm halves the stem: hub files are fp32
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
            else:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory)
    return directory


def upstream(directory, fp32_stem: bool = True) -> EsmForProteinFolding:
    """transformers' own model from the directory. As published (`fp32_stem=False`) it honours fp16_esm: its
    __init__ halves the stem, so the fp32 weights load rounded to fp16. `fp32_stem`: the same code with
    fp16_esm off in the config it is given, so the stem holds the file's fp32 weights (the fp32 oracle)."""
    if not fp32_stem:
        return EsmForProteinFolding.from_pretrained(directory).eval()
    config = EsmConfig.from_pretrained(directory)
    config.esmfold_config.fp16_esm = False
    return EsmForProteinFolding.from_pretrained(directory, config=config, dtype=torch.float32).eval()


def upstream_inputs(sequences: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(aatype, mask, position_ids) exactly as `EsmForProteinFolding.infer` builds them."""
    from transformers.models.esm.openfold_utils import residue_constants as rc

    width = max(map(len, sequences))
    aatype = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        aatype[row, :len(seq)] = torch.tensor([rc.restype_order_with_x.get(a, 20) for a in seq])
        mask[row, :len(seq)] = 1
    return aatype, mask, torch.arange(width).expand(len(sequences), -1)


def targets() -> list[Target]:
    return [Target(name, chain_from_sequence(name, seq)) for name, seq in SEQUENCES.items()]


def pdb_atoms(text: str) -> dict[tuple[int, str], tuple[np.ndarray, float]]:
    """(residue number, atom name) -> (xyz, B-factor) of the ATOM records of a PDB string."""
    atoms = {}
    for line in text.splitlines():
        if line.startswith("ATOM"):
            xyz = np.array([float(line[30:38]), float(line[38:46]), float(line[46:54])])
            atoms[(int(line[22:26]), line[12:16].strip())] = (xyz, float(line[60:66]))
    return atoms


def count_trunk_passes(model, call) -> int:
    """Structure-module calls (one per trunk pass) made by `call()`."""
    calls = []
    handle = model.trunk.structure_module.register_forward_hook(lambda *_: calls.append(1))
    try:
        call()
    finally:
        handle.remove()
    return len(calls)


def test_fixture_is_the_published_format(esmfold_dir):
    saved = json.loads((esmfold_dir / "config.json").read_text())
    assert saved["architectures"] == ["EsmForProteinFolding"]
    for key in ("fp16_esm", "esm_type", "embed_aa", "lddt_head_hid_dim"):
        assert saved["esmfold_config"][key] == ESMFOLD_V1_FIELDS["esmfold_config"][key]
    for key in ("position_embedding_type", "emb_layer_norm_before", "token_dropout", "vocab_list", "layer_norm_eps"):
        assert saved[key] == ESMFOLD_V1_FIELDS[key]
    assert next(upstream(esmfold_dir, fp32_stem=False).esm.parameters()).dtype == torch.float16  # fp16_esm honoured
    ours = build_folding_model({"source": "esmfold_pretrained", "path": str(esmfold_dir)})
    assert next(ours.esm.parameters()).dtype == torch.float32  # ours keeps fp32 weights (autocast picks compute)
    # ... and exactly the file's: fp16_esm must not round them through fp16 on the way in
    from safetensors.torch import load_file

    on_disk = load_file(str(esmfold_dir / "model.safetensors"))
    state = ours.state_dict()
    assert on_disk["esm.encoder.layer.0.attention.self.query.weight"].dtype == torch.float32
    params = dict(ours.named_parameters())
    common = sorted(set(params) & set(on_disk))  # (transformers writes LayerNorm weights as gamma / beta)
    assert sum(name.startswith("esm.encoder.layer.") and name.endswith("dense.weight") for name in common) == 6
    assert all(torch.equal(params[name], on_disk[name]) for name in common), "weights differ from the file"
    assert ours.config.esmfold_config.fp16_esm is True  # the directory's flag survives (save_pretrained, export)


def test_predict_cli_matches_upstream_infer_pdb(esmfold_dir, tmp_path):
    """`foldtune predict` with its default recycles writes the atoms and pLDDT of upstream `infer_pdb`
    (upstream's PDB: pLDDT 0-1 in the B-factors, ours 0-100; both PDBs print 3 decimals, 2 for B)."""
    fasta = tmp_path / "seqs.fasta"
    fasta.write_text("".join(f">{name}\n{seq}\n" for name, seq in SEQUENCES.items()))
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({"model": {"source": "esmfold_pretrained", "path": str(esmfold_dir)}}))
    out = tmp_path / "pred"
    assert main(["predict", "--base-config", str(config), "--fasta", str(fasta), "--out", str(out),
                 "--no-progress"]) == 0
    reference = upstream(esmfold_dir)
    for name, seq in SEQUENCES.items():
        theirs = pdb_atoms(reference.infer_pdb(seq))
        ours = pdb_atoms((out / f"{name}.pdb").read_text())
        assert ours.keys() == theirs.keys() and len(ours) > 5 * len(seq)
        xyz_error = max(np.abs(ours[k][0] - theirs[k][0]).max() for k in ours)
        plddt_error = max(abs(ours[k][1] / 100.0 - theirs[k][1]) for k in ours)
        assert xyz_error <= 0.0015, f"{name}: max |xyz ours - upstream| = {xyz_error} Å"  # PDB rounding only
        assert plddt_error <= 0.0051, f"{name}: max |pLDDT/100 ours - upstream B| = {plddt_error}"


@pytest.mark.parametrize("num_recycles", [None, 0, 2])
def test_fold_matches_upstream_forward_within_1e4(esmfold_dir, num_recycles):
    """Atom positions ≤ 1e-4 Å and pLDDT of our predict path vs upstream (`infer` when no recycles are given,
    else `forward(num_recycles=n)`, the call `infer` makes), and the same number of trunk passes."""
    ours = build_folding_model({"source": "esmfold_pretrained", "path": str(esmfold_dir)}).eval()
    reference = upstream(esmfold_dir)
    seqs = list(SEQUENCES.values())
    results = {}
    passes_ours = count_trunk_passes(ours, lambda: results.update(ours=fold(ours, targets(), num_recycles)))
    aatype, mask, position_ids = upstream_inputs(seqs)

    def call() -> None:
        if num_recycles is None:
            results["up"] = reference.infer(seqs)
        else:
            results["up"] = reference(aatype, mask, position_ids=position_ids, num_recycles=num_recycles)
    with torch.no_grad():
        passes_up = count_trunk_passes(reference, call)
    assert passes_ours == passes_up == (4 if num_recycles is None else num_recycles + 1)
    from transformers.models.esm.openfold_utils import atom14_to_atom37

    up = results["up"]
    features = {k: up[k] for k in ("residx_atom37_to_atom14", "atom37_atom_exists")}
    atom37 = atom14_to_atom37(up["positions"][-1], features)
    for row, (chain, _) in enumerate(results["ours"]):
        n = len(chain.aatype)
        exists = up["atom37_atom_exists"][row, :n].numpy() > 0
        error = np.abs(chain.atom37_positions - atom37[row, :n].numpy())[exists].max()
        assert error <= 1e-4, f"row {row}: max |positions ours - upstream| = {error} Å"
        plddt = np.abs(chain.b_factors / 100.0 - up["plddt"][row, :n].numpy())[exists].max()
        assert plddt <= 1e-5, f"row {row}: max |pLDDT ours - upstream| = {plddt}"


def _training_batch(sequences: list[str], reference: EsmForProteinFolding) -> dict:
    """A training batch whose ground truth is upstream's own fold (so every loss term is defined)."""
    from transformers.models.esm.openfold_utils import atom14_to_atom37

    aatype, mask, position_ids = upstream_inputs(sequences)
    with torch.no_grad():
        out = reference(aatype, attention_mask=mask, position_ids=position_ids, num_recycles=0)
    features = {k: out[k] for k in ("residx_atom37_to_atom14", "atom37_atom_exists")}
    truth = atom14_to_atom37(out["positions"][-1], features)
    return {"aatype": aatype, "mask": mask.float(), "residue_index": position_ids, "atom37_positions": truth,
            "atom37_mask": out["atom37_atom_exists"].float(), "resolution": torch.tensor([1.5, 2.5]),
            "chain_id": list(SEQUENCES)}


@pytest.mark.parametrize("adapter", [
    {"method": "lora", "rank": 2, "alpha": 4, "targets": ["attn", "mlp"], "part": "trunk"},  # frozen stem
    {"method": "lora", "rank": 2, "alpha": 4, "targets": ["attn", "mlp"], "part": "stem"},   # zero-init stem adapters
])
def test_training_forward_equals_upstream_forward(esmfold_dir, adapter):
    """Our training forward (FoldingTask.compute_loss's model call) with a frozen stem, and with zero-initialised
    stem adapters (ours keeps the stem in the graph, upstream `.detach()`es it: values must not change), gives
    upstream's positions, distogram logits and pLDDT logits."""
    cfg = resolve({"model": {"source": "esmfold_pretrained", "path": str(esmfold_dir)}, "adapter": adapter})
    model = build_folding_model(cfg["model"])
    attach_method(model, cfg["adapter"], cfg["model"]["train_heads"], seed=0)
    assert model.stem_trainable == (adapter["part"] == "stem")
    task = FoldingTask(model, cfg, set())
    # Upstream with the base frozen as ours is (the adapters are zero): with trainable base parameters autograd
    # picks other kernels, which alone moves upstream's positions by 4e-5 Å (eval) / 1e-3 Å (dropout on).
    reference = upstream(esmfold_dir).requires_grad_(False)
    batch = _training_batch(list(SEQUENCES.values()), reference)
    for train_mode in (False, True):  # dropout (structure module 0.1) under one seed draws the same masks
        model.train(train_mode)
        reference.train(train_mode)
        torch.manual_seed(7)
        _, _, out = task.compute_loss(batch, 1)
        torch.manual_seed(7)
        ref = reference(batch["aatype"], attention_mask=batch["mask"].long(), position_ids=batch["residue_index"],
                        num_recycles=1)
        for key in ("positions", "distogram_logits", "lddt_head"):
            torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-4, msg=f"{key} (train={train_mode})")


# ------------------------------------------------------------------ recycles of shipped configs, the warning

def _fold_sections():
    from pathlib import Path

    from pipeline.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        for section in ("base_training", "training"):
            if isinstance(document.get(section), dict) and document[section].get("kind", "fold") == "fold":
                yield path.name, section, load_config(path, section=section)


def test_every_shipped_fold_config_predicts_with_the_recycles_it_trains_with():
    """A fresh head's default prediction (max_recycles passes) recycles as often as training at most did;
    esmfold_v1 (pretrained head, max_recycles 4 in its config.json) trains with [0, 3]: 4 passes either way."""
    from pipeline.models import default_recycles

    checked = []
    for name, section, cfg in _fold_sections():
        most = cfg["trainer"]["recycles"][1]
        if cfg["model"]["source"] == "esmfold_pretrained":
            assert most == 3, f"{name}: {section}: esmfold_v1 predicts with 3 recycles, trains with up to {most}"
            continue
        with torch.device("meta"):
            model = build_folding_model(cfg["model"])
        assert default_recycles(model) == most, (f"{name}: {section}: predicts with {default_recycles(model)} "
                                                 f"recycles, trains with up to {most}")
        checked.append(name)
    assert "esm2_35M_fold.yaml" in checked and "demo.yaml" in checked


def test_predict_warns_when_a_fresh_head_recycles_more_than_it_trained(tmp_path, capsys):
    from tests._train_helpers import make_dataset

    ds, splits = make_dataset(tmp_path / "ds", [("1l2y.pdb", "train+test")])
    runs = {}
    for name, max_recycles in (("over", 3), ("even", 1)):
        cfg = resolve({"adapter": {"method": "none"}, "model": {"size": {"trunk": {"max_recycles": max_recycles}}},
                       "data": {"dataset": str(ds), "splits": str(splits), "val_split": None},
                       "trainer": {"recycles": [0, 0], "max_steps": 0, "threads": 1},
                       "output_dir": str(tmp_path / name)})
        from pipeline.train import train

        runs[name] = train(cfg).run_dir
    capsys.readouterr()
    common = ["--dataset", str(ds), "--splits", str(splits), "--split", "test", "--no-progress"]
    assert main(["predict", "--run", str(runs["over"]), "--out", str(tmp_path / "p1"), *common]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predicting with 2 recycles" in err[0] and "at most 0" in err[0], err
    assert main(["predict", "--run", str(runs["over"]), "--out", str(tmp_path / "p2"), "--num-recycles", "0",
                 *common]) == 0
    assert main(["predict", "--run", str(runs["even"]), "--out", str(tmp_path / "p3"), *common]) == 0
    assert "warning" not in capsys.readouterr().err
