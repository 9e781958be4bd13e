"""Bad arguments and files get one line naming the argument / file and a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from tests._adapter_runs import make_run


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
