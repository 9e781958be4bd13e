"""`foldtune report` on a synthetic results directory: values equal hand-computed aggregates, files exist,
the HTML is self-contained (plots embedded), bad input fails with the file named."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main as cli_main
from pipeline.report import ReportOptions, build_report

CHAINS = ["1abc_A", "2xyz_B", "3pqr_C"]
# run -> (method, rank, seed, trainable params, {split: TM per chain})
RUNS = {
    "none": ("none", 0, 0, 0, {"val": [0.20, 0.30, 0.25], "test": [0.18, 0.22, 0.20]}),
    "lora_r4_s0": ("lora", 4, 0, 1000, {"val": [0.30, 0.28, 0.35], "test": [0.18, 0.23, 0.19]}),
    "lora_r4_s1": ("lora", 4, 1, 1000, {"val": [0.26, 0.34, 0.33], "test": [0.20, 0.21, 0.21]}),
    "lora_r8_s0": ("lora", 8, 0, 2000, {"val": [0.40, 0.41, 0.30], "test": [0.19, 0.20, 0.22]}),
    "full_s0": ("full", 0, 0, 500000, {"val": [0.50, 0.45, 0.40], "test": [0.17, 0.21, 0.20]}),
}
HELIX = {"val": [0.21, 0.19, 0.20], "test": [0.20, 0.20, 0.20]}


def _scores(tms, offset: float) -> pd.DataFrame:
    tms = np.asarray(tms)
    return pd.DataFrame({
        "chain_id": CHAINS, "tm_score": tms, "gdt_ts": tms * 0.9, "gdt_ha": tms * 0.6, "rmsd": 10 - 10 * tms,
        "lddt": tms + 0.1, "lddt_ca": tms + 0.15, "n_aligned": 50, "l_ref": 60, "mean_plddt": 100 * tms + offset,
    })


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results" / "exp"
    for name, (method, rank, seed, params, tms) in RUNS.items():
        run = root / "runs" / name
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({
            "method": method, "rank": rank, "targets": ["attn", "mlp"], "part": "trunk",
            "trainable_params": params, "total_params": 600000, "train_seconds": 60.0 + seed,
            "steps": 300, "peak_memory_mb": 512.0, "final_train_loss": 1.5, "best_val_tm_score": None}))
        (run / "config.yaml").write_text(f"trainer:\n  seed: {seed}\n")
        steps = np.arange(0, 300, 10)
        pd.DataFrame({"step": steps, "epoch": 0, "train_loss": 3.0 * np.exp(-steps / 200) + 1}).to_csv(
            run / "metrics.csv", index=False)
        for split, values in tms.items():
            (root / "scores" / name).mkdir(parents=True, exist_ok=True)
            _scores(values, 5.0).to_csv(root / "scores" / name / f"{split}.csv", index=False)
    (root / "scores" / "ideal_helix").mkdir(parents=True)
    for split, values in HELIX.items():
        _scores(values, 0.0).assign(mean_plddt=0.0).to_csv(root / "scores" / "ideal_helix" / f"{split}.csv",
                                                          index=False)
    return root


def test_summary_values_equal_hand_computed_aggregates(results: Path):
    written = build_report(results, results, ReportOptions(title="t", gain_split="val"))
    summary = pd.read_csv(written["summary"]).fillna({"targets": "", "part": ""})
    row = summary[(summary.split == "val") & (summary.method == "lora") & (summary["rank"] == 4)].iloc[0]
    # Seeds averaged per chain first: (0.30+0.26)/2, (0.28+0.34)/2, (0.35+0.33)/2 = 0.28, 0.31, 0.34.
    per_chain = np.array([0.28, 0.31, 0.34])
    assert row.tm_mean == pytest.approx(per_chain.mean(), abs=1e-6)
    assert row.tm_sd == pytest.approx(per_chain.std(ddof=1), abs=1e-6)
    assert row.tm_median == pytest.approx(0.31, abs=1e-6)
    assert row.n_seeds == 2 and row.n_targets == 3 and row.trainable_params == 1000
    # Seed means 0.31 and 0.31 -> no spread between seeds.
    assert row.tm_seed_sd == pytest.approx(0.0, abs=1e-6)
    gain = per_chain - np.array([0.20, 0.30, 0.25])  # +0.08, +0.01, +0.09
    assert row.tm_gain == pytest.approx(gain.mean(), abs=1e-6)
    assert row.frac_improved == pytest.approx(1.0)
    assert row.tm_gain_per_mparam == pytest.approx(gain.mean() / 1e-3, rel=1e-5)
    assert row.lddt == pytest.approx(per_chain.mean() + 0.1, abs=1e-6)
    assert row.rmsd == pytest.approx(10 - 10 * per_chain.mean(), abs=1e-5)
    assert "train_seconds" not in summary.columns  # wall-clock costs live in costs.csv: reruns reproduce summary.csv
    costs = pd.read_csv(written["costs"]).fillna({"targets": "", "part": ""})
    cost = costs[(costs.method == "lora") & (costs["rank"] == 4)].iloc[0]
    assert cost.train_seconds == pytest.approx(60.5) and cost.steps == 300

    test_r8 = summary[(summary.split == "test") & (summary.method == "lora") & (summary["rank"] == 8)].iloc[0]
    assert test_r8.tm_gain == pytest.approx(np.mean([0.01, -0.02, 0.02]), abs=1e-6)
    assert test_r8.frac_improved == pytest.approx(2 / 3)
    helix = summary[(summary.split == "val") & (summary.method == "ideal-helix")].iloc[0]
    assert helix.trainable_params == 0 and helix.tm_mean == pytest.approx(0.20, abs=1e-6)
    base = summary[(summary.split == "val") & (summary.method == "none")].iloc[0]
    assert np.isnan(base.tm_gain)  # the reference has no gain over itself
    # Every split x variant once: (none, helix, lora r4, lora r8, full) x (val, test).
    assert len(summary) == 10

    per_target = pd.read_csv(written["per_target"])
    lora4 = per_target[(per_target.split == "val") & (per_target.method == "lora") & (per_target["rank"] == 4)]
    np.testing.assert_allclose(lora4.sort_values("chain_id").tm_score, per_chain, atol=1e-6)


def test_report_files_plots_and_self_contained_html(results: Path, tmp_path: Path):
    out = tmp_path / "report_out"
    written = build_report(results, out, ReportOptions(title="Synthetic", disclaimer="Tiny random models.",
                                                       gain_split="val"))
    pngs = ["tm_vs_params", "per_target_vs_base", "training_curves", "plddt_calibration"]
    for name in pngs:
        data = (out / "plots" / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    html = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) == 4
    assert base64.b64decode(embedded[0])[:4] == b"\x89PNG"
    assert "plots/" not in html  # nothing linked: a single shareable file
    assert "Tiny random models." in html and "Synthetic" in html
    md = (out / "report.md").read_text()
    assert md.startswith("# Synthetic") and "> **Note.** Tiny random models." in md
    for name in pngs:
        assert f"(plots/{name}.png)" in md
    # The headline table is the fine-tuned split and shows the hand-computed gain of lora r4: +0.060, 100%.
    headline = md.split("## Fine-tuned chains (split `val`)")[1].split("##")[0]
    lora_line = next(line for line in headline.splitlines() if line.startswith("| lora") and "| 4 " in line)
    assert "+0.060" in lora_line and "100%" in lora_line and "0.310 ± 0.030" in lora_line
    assert "held out" in md


def test_cli_reads_report_section_and_restricts_runs(results: Path, tmp_path: Path, capsys):
    config = tmp_path / "workflow_config.yaml"
    config.write_text("experiment: x\nreport:\n  title: From config\n  gain_split: val\n  disclaimer: null\n")
    code = cli_main(["report", "--results", str(results), "--config", str(config),
                     "--runs", "none", "lora_r8_s0", "ideal_helix"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "From config" in (results / "report.md").read_text()
    summary = pd.read_csv(results / "summary.csv")
    assert set(summary.method) == {"none", "lora", "ideal-helix"} and set(summary["rank"]) == {0, 8}
    assert "+0.120" in printed  # lora r8 on val: mean(0.20, 0.11, 0.05)


def test_bad_inputs_name_the_file(results: Path, tmp_path: Path, capsys):
    (results / "scores" / "none" / "val.csv").write_text("chain,score\nx,1\n")
    assert cli_main(["report", "--results", str(results)]) == 2
    assert "scores/none/val.csv: columns" in capsys.readouterr().out
    config = tmp_path / "bad.yaml"
    config.write_text("report:\n  colour: red\n")
    assert cli_main(["report", "--results", str(results), "--config", str(config)]) == 2
    assert "report.colour: unknown key" in capsys.readouterr().out
    assert cli_main(["report", "--results", str(tmp_path / "nothing")]) == 2
    assert "no runs" in capsys.readouterr().out


def test_groups_head_only_control_and_own_params(results: Path, tmp_path: Path):
    """A head-training group: its `none` run (head only, trained) is the control, each adapter's share is its
    gain over it, and the Pareto x axis is the adapter's own count (hand-computed on synthetic scores)."""
    head_tms = {"val": [0.25, 0.33, 0.30], "test": [0.18, 0.22, 0.21]}
    adapter_tms = {"val": [0.29, 0.36, 0.30], "test": [0.18, 0.22, 0.21]}
    for name, method, rank, own, tms in (("heads-none_s0", "none", 0, 0, head_tms),
                                         ("heads-lora_r4_s0", "lora", 4, 1000, adapter_tms)):
        run = results / "runs" / name
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({
            "method": method, "rank": rank, "targets": ["attn", "mlp"], "part": "trunk", "train_heads": True,
            "trainable_params": own + 300000, "adapter_params": own, "head_params": 300000, "steps": 40,
            "train_seconds": 5.0, "seed": 0}))
        for split, values in tms.items():
            (results / "scores" / name).mkdir(parents=True, exist_ok=True)
            _scores(values, 5.0).to_csv(results / "scores" / name / f"{split}.csv", index=False)
    groups = {name: "adapter only" for name in RUNS} | {"none": "", "heads-none_s0": "adapter + head",
                                                        "heads-lora_r4_s0": "adapter + head"}
    out = tmp_path / "grouped"
    written = build_report(results, out, ReportOptions(gain_split="val"), groups=groups)
    summary = pd.read_csv(written["summary"]).fillna({"targets": "", "part": "", "group": ""})
    val = summary[summary.split == "val"]
    head = val[val.method == "head"].iloc[0]
    assert head.group == "adapter + head" and head.adapter_params == 0 and head.trainable_params == 300000
    assert head.tm_gain == pytest.approx(np.mean([0.05, 0.03, 0.05]), abs=1e-6)  # over the untuned base
    lora = val[(val.method == "lora") & (val.group == "adapter + head")].iloc[0]
    assert lora.adapter_params == 1000 and lora.head_params == 300000
    assert lora.tm_gain_vs_head == pytest.approx(np.mean([0.04, 0.03, 0.0]), abs=1e-6)
    alone = val[(val.method == "lora") & (val.group == "adapter only") & (val["rank"] == 4)].iloc[0]
    assert np.isnan(alone.tm_gain_vs_head)  # trains no head: nothing to compare with
    md = (out / "report.md").read_text()
    assert "head only (control)" in md and "gain vs head only" in md and "Chains: 1abc_A, 2xyz_B, 3pqr_C." in md
