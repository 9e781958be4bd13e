"""Bad arguments and files get one line naming the argument / file and a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.cli import main
from tests._adapter_runs import make_run
from tests.shared_data import SHARED_STRUCTURES

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples" / "structures"


@pytest.mark.parametrize("args, message", [
    (["--retries", "-1"], "--retries -1: must be >= 0"),
    (["--backoff", "-5"], "--backoff -5.0: must be >= 0 seconds"),
    (["--timeout", "0"], "--timeout 0.0: must be > 0 seconds"),
    (["--timeout", "nan"], "--timeout nan: must be > 0 seconds"),
    (["--max", "-3"], "--max -3: must be >= 1"),
    (["--max-resolution", "0"], "--max-resolution 0.0: must be > 0"),
])
def test_fetch_arguments_are_checked_before_anything_runs(tmp_path, capsys, args, message):
    assert main(["fetch", "1ubi", "--offline", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c"),
                 *args]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"foldtune fetch: {message}") and out.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_fetch_out_or_cache_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["fetch", "1ubi", "--offline", "--out", str(tmp_path / "file"), "--cache", str(tmp_path / "c")]) == 2
    assert f"--out {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a directory" in capsys.readouterr().out
    assert main(["fetch", "1ubi", "--offline", "--cache", str(tmp_path / "file" / "sub")]) == 2
    assert f"{tmp_path / 'file'} is a file, not a directory" in capsys.readouterr().out


def test_fetch_query_file_that_is_not_json(tmp_path, capsys):
    query = tmp_path / "q.json"
    query.write_text("{not json")
    assert main(["fetch", "--query", str(query), "--cache", str(tmp_path / "c")]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"foldtune fetch: {query}: --query: not a JSON search query") and out.count("\n") == 1
    assert main(["fetch", "--query", str(tmp_path / "none.json"), "--cache", str(tmp_path / "c")]) == 2
    assert f"{tmp_path / 'none.json'}: --query: No such file" in capsys.readouterr().out


def test_predict_names_a_run_config_that_is_not_yaml(tmp_path, capsys):
    run = make_run(tmp_path, "run", {"method": "lora", "rank": 2, "targets": ["attn"], "part": "trunk"})
    (run / "config.yaml").write_text("adapter: {method: lora\nmodel: [\n")
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">x\nMKTAYIAKQR\n")
    assert main(["predict", "--run", str(run), "--fasta", str(fasta), "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.yaml'}: not valid YAML (line" in err and "Traceback" not in err


def _cut_mmcif(path, at_line_boundary: bool):
    """1a7g.cif cut inside its _atom_site loop: after a whole row, or in the middle of one."""
    text = (SAMPLES / "1a7g.cif").read_text()
    start = text.index("\nATOM ", text.index("_atom_site.")) + 1
    cut = text.index("\n", start + len(text[start:]) // 2)
    path.write_text(text[:cut + 1] if at_line_boundary else text[:cut - 20])
    return path


@pytest.mark.parametrize("at_line_boundary, message", [(True, "truncated (_atom_site loop not closed"),
                                                       (False, "truncated _atom_site loop")])
def test_a_cut_mmcif_is_truncated_in_prepare_and_source_dir(tmp_path, capsys, at_line_boundary, message):
    local = tmp_path / "local"
    local.mkdir()
    cut = _cut_mmcif(local / "1a7g.cif", at_line_boundary)
    assert main(["prepare", "--in", str(cut), str(SAMPLES / "1a8o.pdb"), "--out", str(tmp_path / "ds"),
                 "--no-progress"]) == 0
    errors = pd.read_csv(tmp_path / "ds" / "errors.csv", keep_default_na=False)
    assert errors.stage.tolist() == ["parse"] and f"{cut}: mmCIF: {message}" in errors.reason[0]
    assert pd.read_csv(tmp_path / "ds" / "manifest.csv").chain_id.tolist() == ["1a8o_A"]
    assert main(["fetch", "1a7g", "--offline", "--source-dir", str(local), "--out", str(tmp_path / "out"),
                 "--cache", str(tmp_path / "c"), "--no-progress"]) == 1
    report = pd.read_csv(tmp_path / "out" / "fetch_report.csv", keep_default_na=False)
    assert report.status.tolist() == ["failed"] and f"{cut}: {message}" in report.reason[0]
    assert not (tmp_path / "out" / "1a7g.cif").exists()


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device cuda:99: "),
])
def test_predict_device_is_checked_first(tmp_path, capsys, args, message):
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">x\nMKTAYIAKQR\n")
    assert main(["predict", "--baseline", "ideal-helix", "--fasta", str(fasta), "--out", str(tmp_path / "p"),
                 *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"foldtune predict: {message}") and err.count("\n") == 1
    assert not (tmp_path / "p").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine has cuda")
def test_predict_device_cuda_without_cuda(tmp_path, capsys):
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">x\nMKTAYIAKQR\n")
    assert main(["predict", "--baseline", "ideal-helix", "--fasta", str(fasta), "--out", str(tmp_path / "p"),
                 "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_ctrl_c_in_any_command_is_one_line(tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt anywhere in a command (here: while prepare reads its first file) -> exit 130."""
    import data.prepare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.prepare, "read_chains", interrupted)
    assert main(["prepare", "--in", str(SAMPLES / "1a8o.pdb"), "--out", str(tmp_path / "ds"), "--no-progress"]) == 130
    assert capsys.readouterr().err.startswith("foldtune prepare: interrupted (Ctrl-C)")


def test_score_says_truncated_for_an_mmcif_cut_in_a_row(tmp_path, capsys):
    cut = _cut_mmcif(tmp_path / "1a7g.cif", at_line_boundary=False)
    assert main(["score", str(cut), str(SAMPLES / "1a7g.cif")]) == 1
    err = capsys.readouterr().err
    assert f"foldtune score: error: {cut}: mmCIF: truncated" in err and "IndexError" not in err
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"id": ["cut"], "model": [str(cut)], "ref": [str(SAMPLES / "1a7g.cif")]}).to_csv(pairs, index=False)
    assert main(["score", "--pairs", str(pairs), "--out", str(tmp_path / "s.csv"), "--no-progress"]) == 1
    assert "mmCIF: truncated" in pd.read_csv(tmp_path / "s.csv").error[0]


@pytest.mark.parametrize("text, message", [
    ("MKTAYIAKQR\n>x\nMKT\n", "fasta: no '>' header line before the sequence"),
    (">x\nMKT1AYI\n", "x: '1' are not residue letters (first at position 4"),
    (">x\nMKT-A.Y#I\n", "x: '#-.' are not residue letters (first at position 4"),
    (">x\nMKT*AYI\n", "x: '*' are not residue letters (first at position 4; '*' is a stop only at the end)"),
])
def test_predict_refuses_a_fasta_it_would_misread(tmp_path, capsys, text, message):
    fasta = tmp_path / "x.fasta"
    fasta.write_text(text)
    assert main(["predict", "--baseline", "ideal-helix", "--fasta", str(fasta), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"foldtune predict: {fasta}: {message}") and err.count("\n") == 1


def test_predict_fasta_with_a_final_stop_is_read(tmp_path):
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">x\nMKTAYIAKQR*\n")
    assert main(["predict", "--baseline", "ideal-helix", "--fasta", str(fasta), "--out", str(tmp_path / "p")]) == 0
    assert pd.read_csv(tmp_path / "p" / "predictions.csv").length.tolist() == [10]


def test_score_warns_when_residues_matched_by_number_are_other_proteins(tmp_path, capsys):
    from pipeline import scoring

    trp, ubiquitin = SHARED_STRUCTURES / "1l2y.pdb", SHARED_STRUCTURES / "1ubi.pdb"  # numbers 1..20 and 1..76
    assert main(["score", str(trp), str(ubiquitin), "--align", "number"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"foldtune score: warning: {trp} vs {ubiquitin}: ") and "--align sequence" in err
    assert err.count("\n") == 1
    assert main(["score", str(trp), str(trp), "--align", "number"]) == 0
    assert main(["score", str(trp), str(ubiquitin), "--align", "sequence"]) == 0
    assert capsys.readouterr().err == ""
    # A one-residue reference has no pair to check: lDDT is undefined, not 0.
    one = tmp_path / "one.pdb"
    one.write_text("".join(line for line in trp.read_text().splitlines(True)
                           if line.startswith("ATOM") and int(line[22:26]) == 1) + "END\n")
    result = scoring.score_pair(trp, one, align="number")
    assert result["n_aligned"] == 1 and result["lddt"] != result["lddt"] and result["lddt_ca"] != result["lddt_ca"]
