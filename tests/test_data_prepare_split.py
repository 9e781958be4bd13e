"""foldtune prepare (bad inputs -> errors.csv, filters, chains file) and foldtune split (no leakage, tiny sets)."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.dataset import read_manifest
from data.prepare import ChainFilters, prepare_dataset
from data.split import assign_splits, make_splits, max_cross_split_identity, read_clusters, sequence_identity
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"


def test_prepare_reports_bad_inputs_and_keeps_good_ones(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "empty.pdb").write_bytes(b"")
    text = (SAMPLES / "structures" / "1ubi.pdb").read_text()
    (inputs / "trunc.pdb").write_text(text[: text.index("ATOM     40")] + "ATOM     40  CA  GLY A   5      1.2")
    (inputs / "random.cif").write_bytes(np.random.default_rng(0).bytes(4000))
    (inputs / "halfgz.cif.gz").write_bytes(gzip.compress((SAMPLES / "structures" / "1a7g.cif").read_bytes())[:3000])
    shutil.copy(SAMPLES / "structures" / "1a8o.pdb", inputs)
    shutil.copy(SAMPLES / "structures" / "4zey.cif", inputs / "4zey.cif")
    (inputs / "notes.txt").write_text("not a structure")  # not collected from a directory
    out = tmp_path / "ds"
    code = main(["prepare", "--in", str(inputs), str(tmp_path / "missing.pdb"), "--out", str(out), "--no-progress"])
    assert code == 0
    errors = pd.read_csv(out / "errors.csv", keep_default_na=False).set_index("file")
    reasons = {Path(f).name: r for f, r in errors.reason.items()}
    assert set(reasons) == {"empty.pdb", "trunc.pdb", "random.cif", "halfgz.cif.gz", "missing.pdb"}
    assert "empty" in reasons["empty.pdb"] and "truncated" in reasons["trunc.pdb"]
    assert "binary" in reasons["random.cif"] and "gzip" in reasons["halfgz.cif.gz"]
    assert "not found" in reasons["missing.pdb"]
    assert all(errors.stage == "parse")
    manifest = read_manifest(out)
    assert manifest.chain_id.tolist() == ["1a8o_A", "4zey_A"]
    assert manifest.length.tolist() == [70, 84]
    assert sorted(os.listdir(out / "chains")) == ["1a8o_A.npz", "4zey_A.npz"]  # no temp files left


def test_prepare_filters_and_chains_file(tmp_path):
    structures = SAMPLES / "structures"
    files = [structures / n for n in ("1tii.pdb", "1a8o.pdb", "3zee.cif", "2ofg.cif")]
    chains_csv = tmp_path / "chains.csv"
    chains_csv.write_text("file,chain\nsome/where/1tii.pdb,D\n1tii.pdb,C\n1tii.pdb,Q\n1a8o.pdb,A\n3zee.cif,A\n2ofg.cif,X\n")
    summary_rows = main(["prepare", "--in", *map(str, files), "--out", str(tmp_path / "ds"), "--chains-file",
                         str(chains_csv), "--min-len", "40", "--max-len", "100", "--max-resolution", "3.0",
                         "--no-progress"])
    assert summary_rows == 0
    manifest = read_manifest(tmp_path / "ds")
    # Length filters see the full (deposited) length: 1tii C has 53 residues, 36 observed -> kept;
    # 2ofg: 111 (106 observed) > 100; 3zee: 6.1 Å.
    assert manifest.chain_id.tolist() == ["1tii_D", "1tii_C", "1a8o_A"]
    assert manifest.length.tolist() == [99, 53, 70] and manifest.n_observed.tolist() == [98, 36, 70]
    assert manifest.sequence_source.tolist() == ["seqres"] * 3
    errors = pd.read_csv(tmp_path / "ds" / "errors.csv", keep_default_na=False)
    got = {(Path(f).name, c, s) for f, c, s in zip(errors.file, errors.chain, errors.stage)}
    assert got == {("1tii.pdb", "Q", "select"), ("3zee.cif", "A", "filter"), ("2ofg.cif", "X", "filter")}
    assert "length 111 > max_len 100" in errors.reason[errors.chain == "X"].iloc[0]
    assert ChainFilters(max_unknown=0.0).reason(__import__("data.structure").structure.read_chain(files[1])) is None


def test_duplicate_chain_ids_are_rejected_not_overwritten(tmp_path):
    a = tmp_path / "a" / "1a8o.pdb"
    b = tmp_path / "b" / "1a8o.pdb.gz"
    a.parent.mkdir(), b.parent.mkdir()
    shutil.copy(SAMPLES / "structures" / "1a8o.pdb", a)
    b.write_bytes(gzip.compress(a.read_bytes()))
    summary = prepare_dataset([a, b], tmp_path / "ds", progress=False)
    assert summary.chains_written == 1 and summary.errors[0]["stage"] == "dedupe"


def test_identity_convention():
    assert sequence_identity("ACDEFGHIKL", "ACDEFGHIKL") == 1.0
    # a fragment inside its parent: identity over the shorter length (end gaps free)
    assert sequence_identity("MKTAYIAKQRQISFVKSHFSRQ", "AKQRQISFVK") == 1.0
    assert sequence_identity("ACDEFGHIKL", "ACDEFGHIKW") == pytest.approx(0.9)
    assert sequence_identity("", "ACD") == 0.0


@pytest.fixture(scope="module")
def all_samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    prepare_dataset([SAMPLES / "structures"], out, progress=False)
    return read_manifest(out)


def test_split_has_no_cross_split_pair_above_threshold(all_samples):
    splits = make_splits(all_samples, threshold=0.4, seed=0)
    assert set(splits.split) == {"train", "val", "test"}
    assert max_cross_split_identity(all_samples, splits) < 0.4
    # identical copies (1tii D-H, 1k6p A/B, 2rbg A/B, 3u8v A/B, 2q2k A/B) share a cluster
    cluster = dict(zip(splits.chain_id, splits.cluster))
    assert len({cluster[f"1tii_{c}"] for c in "DEFGH"}) == 1 and cluster["2q2k_A"] == cluster["2q2k_B"]
    assert cluster["1tii_A"] != cluster["1tii_D"]
    assert splits.equals(make_splits(all_samples, threshold=0.4, seed=0))
    assert not splits.equals(make_splits(all_samples, threshold=0.4, seed=1))
    counts = splits.split.value_counts()
    assert counts["train"] > counts["val"] and counts["train"] > counts["test"]


def test_split_date_cutoff_and_external_clusters(all_samples, tmp_path):
    splits = make_splits(all_samples, seed=0, date_cutoff="2012-01-01")
    late = all_samples.release_date.replace("", None).dropna()
    late_ids = set(all_samples.loc[late[pd.to_datetime(late) > "2012-01-01"].index, "chain_id"])
    assert late_ids and set(splits[splits.chain_id.isin(late_ids)].split) == {"test"}
    assert max_cross_split_identity(all_samples, splits) < 0.4
    tsv = tmp_path / "mmseqs_cluster.tsv"  # MMseqs2 easy-cluster layout: representative<TAB>member
    ids = all_samples.chain_id.tolist()
    tsv.write_text("".join(f"{ids[0]}\t{m}\n" for m in ids[:10]))
    clusters = read_clusters(tsv, ids)
    assert len({clusters[c] for c in ids[:10]}) == 1 and len(set(clusters.values())) == len(ids) - 9
    csv = tmp_path / "clusters.csv"
    pd.DataFrame({"chain_id": ids, "cluster": [i % 4 for i in range(len(ids))]}).to_csv(csv, index=False)
    external = make_splits(all_samples, clusters_file=csv, seed=0)
    assert external.cluster.nunique() == 4
    assert external.groupby("cluster").split.nunique().max() == 1


@pytest.mark.parametrize("n_clusters", [1, 2, 3, 4, 7])
def test_tiny_datasets_keep_train_and_give_val_test_a_cluster(n_clusters):
    clusters = {f"c{i}_{j}": f"c{i}" for i in range(n_clusters) for j in range(i + 1)}
    for seed in range(5):
        split = assign_splits(clusters, (0.8, 0.1, 0.1), seed=seed)
        used = set(split.values())
        assert "train" in used
        if n_clusters >= 3:
            assert used == {"train", "val", "test"}
        by_cluster = {}
        for chain, s in split.items():
            by_cluster.setdefault(clusters[chain], set()).add(s)
        assert all(len(s) == 1 for s in by_cluster.values())


def test_offline_demo_pipeline_end_to_end(tmp_path):
    """The issue's done-criterion: fetch --offline + prepare + split on the bundled samples."""
    work = tmp_path
    assert main(["fetch", "--offline", "--source-dir", str(SAMPLES / "structures"), "--ids-file",
                 str(SAMPLES / "demo_chains.csv"), "--out", str(work / "structures"), "--cache",
                 str(work / "cache"), "--no-progress"]) == 0
    assert main(["prepare", "--in", str(work / "structures"), "--chains-file", str(SAMPLES / "demo_chains.csv"),
                 "--out", str(work / "dataset"), "--no-progress"]) == 0
    assert main(["split", "--dataset", str(work / "dataset"), "--out", str(work / "splits.csv"), "--no-progress"]) == 0
    demo = pd.read_csv(SAMPLES / "demo_chains.csv", keep_default_na=False)
    manifest = read_manifest(work / "dataset")
    assert len(manifest) == len(demo)
    assert manifest.sequence.nunique() == len(manifest)  # one chain per identical sequence
    splits = pd.read_csv(work / "splits.csv", keep_default_na=False)
    assert sorted(splits.chain_id) == sorted(manifest.chain_id)
    assert splits.split.value_counts().to_dict().keys() == {"train", "val", "test"}


def test_prepare_from_a_fetch_report_takes_exactly_what_this_fetch_delivered(tmp_path, capsys):
    """A second fetch into the same directory leaves the first one's files there; the dataset follows the
    report (delivered rows only: a failed or filtered id's old file stays out)."""
    fetch = ["fetch", "--offline", "--source-dir", str(SAMPLES / "structures"), "--out", str(tmp_path / "structures"),
             "--cache", str(tmp_path / "cache"), "--no-progress"]
    assert main([*fetch, "1a8o", "4zey", "1ubi"]) == 0
    assert main([*fetch, "1a8o", "9zzz"]) == 1  # 9zzz fails: nothing to serve it from
    report = tmp_path / "structures" / "fetch_report.csv"
    frame = pd.read_csv(report, keep_default_na=False)
    frame.loc[len(frame)] = {"id": "4ZEY", "chain": "", "status": "filtered", "path": "",
                             "reason": "resolution 3.5 > 3.0"}  # as a fetch with --max-resolution reports it
    frame.to_csv(report, index=False)
    assert sorted(p.name for p in (tmp_path / "structures").glob("*.pdb")) == ["1a8o.pdb", "1ubi.pdb"]
    assert main(["prepare", "--fetch-report", str(report), "--out", str(tmp_path / "ds"), "--no-progress"]) == 0
    assert read_manifest(tmp_path / "ds").chain_id.tolist() == ["1a8o_A"]
    # Reading the directory instead takes the stale files too (what the workflow did).
    assert main(["prepare", "--in", str(tmp_path / "structures"), "--out", str(tmp_path / "all"), "--no-progress"]) == 0
    assert sorted(read_manifest(tmp_path / "all").chain_id) == ["1a8o_A", "1ubi_A", "4zey_A"]
    capsys.readouterr()
    assert main(["prepare", "--fetch-report", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x")]) == 2
    assert f"{tmp_path / 'nope.csv'}: fetch report: not found" in capsys.readouterr().out


def test_a_fetch_report_gives_the_dataset_order_of_its_directory(tmp_path):
    """Training draws chains in manifest order: the ids' fetch order must not change it."""
    fetch = ["fetch", "--offline", "--source-dir", str(SAMPLES / "structures"), "--out", str(tmp_path / "structures"),
             "--cache", str(tmp_path / "cache"), "--no-progress"]
    assert main([*fetch, "4zey", "1ubi", "1a8o"]) == 0
    report = tmp_path / "structures" / "fetch_report.csv"
    assert main(["prepare", "--fetch-report", str(report), "--out", str(tmp_path / "ds"), "--no-progress"]) == 0
    assert main(["prepare", "--in", str(tmp_path / "structures"), "--out", str(tmp_path / "dir"), "--no-progress"]) == 0
    order = read_manifest(tmp_path / "ds").chain_id.tolist()
    assert order == read_manifest(tmp_path / "dir").chain_id.tolist() == ["1a8o_A", "1ubi_A", "4zey_A"]


def test_workflow_prepare_reads_the_fetch_report():
    rule = (ROOT / "snakemake" / "rules" / "data.smk").read_text()
    prepare = rule[rule.index("rule prepare:"):rule.index("rule split:")]
    assert "--fetch-report {input.fetched}" in prepare and "--in" not in prepare


def test_a_chains_file_row_naming_no_input_is_reported(tmp_path):
    chains_csv = tmp_path / "chains.csv"
    chains_csv.write_text("file,chain\n1a8o.pdb,A\n1a8p.pdb,A\nelsewhere/9xyz.cif,B\n9xyz.cif,C\n")
    assert main(["prepare", "--in", str(SAMPLES / "structures" / "1a8o.pdb"), "--out", str(tmp_path / "ds"),
                 "--chains-file", str(chains_csv), "--no-progress"]) == 0
    errors = pd.read_csv(tmp_path / "ds" / "errors.csv", keep_default_na=False)
    assert list(zip(errors.file, errors.chain, errors.stage)) == [("1a8p.pdb", "A", "select"),
                                                                  ("9xyz.cif", "B,C", "select")]
    assert all("named by the chains file but not among the inputs" in r for r in errors.reason)
    assert read_manifest(tmp_path / "ds").chain_id.tolist() == ["1a8o_A"]
