"""foldtune fetch against a local fault-injecting HTTP server (127.0.0.1, ephemeral port); no other host."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from data.fetch import FetchConfig, Target, fetch, parse_target, read_ids_file, validate_mmcif
from data.structure import read_chain
from pipeline.cli import main
from tests.shared_data import SHARED_STRUCTURES

SHARED = SHARED_STRUCTURES
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples" / "structures"
TIMEOUT = 0.2

# id -> list of behaviours per attempt (the last one repeats): ok, gzip, 500, slow, truncated, html, 404, clen
PLAN = {
    "1A7G": ["ok"],
    "4ZEY": ["gzip"],
    "3ZEE": ["500", "500", "ok"],
    "2Q2K": ["slow", "ok"],
    "3U8V": ["truncated", "clen", "ok"],
    "4I6P": ["html"],
    "9ZZZ": ["404"],
    "1PSM": ["500"],
    "1B05": ["other"],  # a valid mmCIF of another entry (1GBT)
    "2CRB": ["sigint"],  # the user presses Ctrl-C while this one downloads
    "4AKE": ["drip", "ok"],  # a byte every 50 ms: every read is within the socket timeout
}
FILES = {"1A7G": "1a7g.cif", "4ZEY": "4zey.cif", "3ZEE": "3zee.cif", "2Q2K": "2q2k.cif", "3U8V": "3u8v.cif",
         "4I6P": "4i6p.cif", "1PSM": "1psm.cif"}
SLOW_FILES = {"4AKE": "4ake.cif"}  # served by the drip test only
ENTRIES = {"1A7G": {"rcsb_entry_info": {"resolution_combined": [2.4], "deposited_polymer_monomer_count": 90},
                    "exptl": [{"method": "X-RAY DIFFRACTION"}]},
           "4ZEY": {"rcsb_entry_info": {"resolution_combined": [1.5], "deposited_polymer_monomer_count": 90},
                    "exptl": [{"method": "X-RAY DIFFRACTION"}]},
           "3ZEE": {"rcsb_entry_info": {"resolution_combined": [6.1]}, "exptl": [{"method": "ELECTRON MICROSCOPY"}]},
           "3U8V": {"rcsb_entry_info": {"resolution_combined": ["high"]}},  # malformed
           "2Q2K": {"rcsb_entry_info": "none", "exptl": "X-RAY"}}  # malformed


class Handler(BaseHTTPRequestHandler):
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: bytes, headers: dict | None = None, length: int | None = None):
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        if parts[0] == "entry":
            entry = ENTRIES.get(parts[1].upper())
            return self._send(200, json.dumps(entry).encode()) if entry else self._send(404, b"{}")
        pdb_id = parts[-1].split(".")[0].upper()
        with self.lock:
            attempt = self.attempts.get(pdb_id, 0)
            self.attempts[pdb_id] = attempt + 1
        plan = PLAN.get(pdb_id, ["404"])
        action = plan[min(attempt, len(plan) - 1)]
        served = {**FILES, **SLOW_FILES}
        body = (SHARED / served[pdb_id]).read_bytes() if pdb_id in served else b""
        if action == "ok":
            self._send(200, body)
        elif action == "gzip":
            self._send(200, gzip.compress(body))
        elif action == "500":
            self._send(500, b"server error")
        elif action == "slow":
            time.sleep(TIMEOUT * 3)
            self._send(200, body)
        elif action == "truncated":  # honest Content-Length of a cut file: only validation can tell
            self._send(200, body[: len(body) // 2])
        elif action == "clen":  # connection closes before Content-Length bytes arrive
            self._send(200, body[: len(body) // 2], length=len(body))
        elif action == "drip":
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for index in range(40):
                    self.wfile.write(body[index:index + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif action == "sigint":
            os.kill(os.getpid(), signal.SIGINT)  # the fetch (main thread) gets KeyboardInterrupt, as from Ctrl-C
            time.sleep(0.5)
            self._send(500, b"gone")
        elif action == "other":
            self._send(200, (SHARED / "1gbt.cif").read_bytes())
        elif action == "html":
            self._send(200, b"<html><body>Service unavailable</body></html>")
        else:
            self._send(404, b"not found")

    search_reply: bytes | None = None  # a test's own search answer (malformed ones)

    def do_POST(self):
        query = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.search_reply is not None:
            return self._send(200, self.search_reply)
        rows = query.get("request_options", {}).get("paginate", {}).get("rows", 10)
        ids = [{"identifier": "1A7G", "score": 1.0}, {"identifier": "4ZEY.A", "score": 0.9},
               {"identifier": "3ZEE_1", "score": 0.8}]
        self._send(200, json.dumps({"result_set": ids[:rows], "total_count": 3}).encode())


@pytest.fixture()
def server(monkeypatch):
    Handler.attempts = {}
    Handler.search_reply = None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    real_connect = socket.socket.connect
    outside: list = []

    def loopback_only(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if not str(host).startswith("127.") and host not in ("localhost", "::1"):
            outside.append(address)
            raise ConnectionRefusedError(f"test forbids connecting to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    yield f"http://127.0.0.1:{httpd.server_address[1]}", outside
    httpd.shutdown()
    httpd.server_close()


def _config(tmp_path, base, **kwargs) -> FetchConfig:
    return FetchConfig(cache=tmp_path / "cache", out=tmp_path / "out", files_url=f"{base}/download",
                       entry_url=f"{base}/entry", search_url=f"{base}/search", timeout=TIMEOUT, retries=3,
                       backoff=0.01, progress=False, **kwargs)


def _no_partial_files(*dirs: Path) -> None:
    for directory in dirs:
        for path in directory.rglob("*"):
            assert ".tmp" not in path.name, path
            if path.name.endswith(".cif.gz"):
                validate_mmcif(path.read_bytes())


def test_faults_retried_and_every_id_reported(tmp_path, server):
    base, outside = server
    ids = ["1A7G", "4zey_A", "3ZEE", "2Q2K", "3U8V", "4I6P", "9ZZZ", "1PSM"]
    started = time.perf_counter()
    report = fetch([parse_target(i) for i in ids], _config(tmp_path, base), tmp_path / "out" / "fetch_report.csv")
    assert time.perf_counter() - started < 10
    status = dict(zip(report.id, report.status))
    assert status == {"1A7G": "downloaded", "4ZEY": "downloaded", "3ZEE": "downloaded", "2Q2K": "downloaded",
                      "3U8V": "downloaded", "4I6P": "failed", "9ZZZ": "failed", "1PSM": "failed"}
    reasons = dict(zip(report.id, report.reason))
    assert "not mmCIF" in reasons["4I6P"] and "4 attempts" in reasons["4I6P"]
    assert "HTTP 404" in reasons["9ZZZ"] and "1 attempt)" in reasons["9ZZZ"]  # 4xx: no retry
    assert "HTTP 500" in reasons["1PSM"] and "4 attempts" in reasons["1PSM"]
    assert Handler.attempts == {"1A7G": 1, "4ZEY": 1, "3ZEE": 3, "2Q2K": 2, "3U8V": 3, "4I6P": 4, "9ZZZ": 1, "1PSM": 4}
    assert dict(zip(report.id, report.chain))["4ZEY"] == "A"
    _no_partial_files(tmp_path)
    for pdb_id, name in FILES.items():
        if status[pdb_id] == "downloaded":
            fetched = read_chain(tmp_path / "out" / f"{pdb_id.lower()}.cif.gz")
            assert fetched.sequence == read_chain(SHARED / name).sequence
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"{i.lower()}.cif.gz" for i, s in status.items() if s == "downloaded"] + ["fetch_report.csv"])
    assert pd.read_csv(tmp_path / "out" / "fetch_report.csv").shape == (8, 5)
    assert outside == []


def test_cache_served_without_network_and_corrupt_cache_replaced(tmp_path, server):
    base, _ = server
    config = _config(tmp_path, base)
    fetch([Target("1A7G")], config)
    assert Handler.attempts == {"1A7G": 1}
    (config.cache / ".4zey.cif.gz.abc.tmp.gz").write_bytes(b"half")  # leftover of a killed run: ignored
    (config.cache / "3zee.cif.gz").write_bytes(gzip.compress(b"data_3ZEE\n_atom_site.id\n")[:10])  # corrupt entry
    report = fetch([Target("1A7G"), Target("3ZEE")], config)
    assert report.status.tolist() == ["cached", "downloaded"]
    assert Handler.attempts == {"1A7G": 1, "3ZEE": 3}
    validate_mmcif((config.cache / "3zee.cif.gz").read_bytes())


def test_entry_metadata_filters(tmp_path, server):
    base, _ = server
    config = _config(tmp_path, base, max_resolution=2.0)
    report = fetch([Target("1A7G"), Target("4ZEY"), Target("3ZEE")], config)
    assert report.status.tolist() == ["filtered", "downloaded", "filtered"]
    assert "resolution 2.4 > 2.0" in report.reason[0]
    method_only = fetch([Target("1A7G"), Target("3ZEE")], _config(tmp_path / "m", base, methods=["electron microscopy"]))
    assert method_only.status.tolist() == ["filtered", "downloaded"]


def test_search_query_cli(tmp_path, server):
    base, outside = server
    query = tmp_path / "q.json"
    query.write_text(json.dumps({"query": {"type": "terminal", "service": "text"}, "return_type": "entry"}))
    code = main(["fetch", "--query", str(query), "--max", "2", "--out", str(tmp_path / "out"), "--cache",
                 str(tmp_path / "cache"), "--rcsb-url", f"{base}/download", "--entry-url", f"{base}/entry",
                 "--search-url", f"{base}/search", "--timeout", str(TIMEOUT), "--backoff", "0.01", "--no-progress"])
    assert code == 0
    report = pd.read_csv(tmp_path / "out" / "fetch_report.csv", keep_default_na=False)
    assert list(zip(report.id, report.chain, report.status)) == [("1A7G", "", "downloaded"), ("4ZEY", "A", "downloaded")]
    assert outside == []


def test_unreachable_network_falls_back_to_source_dir(tmp_path, server):
    _, outside = server
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()  # nothing listens there: connection refused
    config = _config(tmp_path, f"http://127.0.0.1:{closed_port}", source_dirs=[SAMPLES])
    report = fetch([Target("1A8O"), Target("1UBI", "A"), Target("9XYZ")], config)
    assert report.status.tolist() == ["local", "local", "failed"]
    assert "offline" in report.reason[2]
    assert (tmp_path / "out" / "1a8o.pdb").read_bytes() == (SAMPLES / "1a8o.pdb").read_bytes()
    # and a host outside loopback is refused by the test's guard, and also treated as unreachable
    config = _config(tmp_path / "x", "http://192.0.2.1", source_dirs=[SAMPLES])
    assert fetch([Target("1A8O")], config).status.tolist() == ["local"]
    assert outside and all(a[0] == "192.0.2.1" for a in outside)


def test_ids_parsing(tmp_path):
    assert parse_target("1abc_B") == Target("1ABC", "B") and parse_target("7sgn_C_target.pdb") == Target("7sgn_C_target")
    assert parse_target("data/x/1tii.pdb") == Target("1TII") and parse_target("1ABC.A") == Target("1ABC", "A")
    text = tmp_path / "ids.txt"
    text.write_text("# demo\n1UBI\n1a8o_A  # selenomethionine\n\n")
    assert read_ids_file(text) == [Target("1UBI"), Target("1A8O", "A")]
    csv = tmp_path / "ids.csv"
    csv.write_text("file,chain\ndata/samples/structures/1tii.pdb,D\n")
    assert read_ids_file(csv) == [Target("1TII", "D")]


def test_another_entry_served_for_the_requested_id_is_rejected(tmp_path, server):
    """1GBT's valid mmCIF served for 1B05 is neither cached nor placed under 1B05 (download, cache, local)."""
    base, _ = server
    config = _config(tmp_path, base)
    report = fetch([Target("1B05")], config)
    assert report.status.tolist() == ["failed"]
    assert "entry 1GBT (_entry.id), not the requested 1B05" in report.reason[0] and "4 attempts" in report.reason[0]
    assert not (config.cache / "1b05.cif.gz").exists() and not (tmp_path / "out" / "1b05.cif.gz").exists()
    # A wrong file already in the cache is not served: it is downloaded again (here: wrong again).
    config.cache.mkdir(parents=True, exist_ok=True)
    (config.cache / "1b05.cif.gz").write_bytes(gzip.compress((SHARED / "1gbt.cif").read_bytes()))
    assert fetch([Target("1B05")], config).status.tolist() == ["failed"]
    assert Handler.attempts["1B05"] == 8
    # Offline, from --source-dir: a file named 1b05 holding another entry is refused, naming the file.
    local = tmp_path / "local"
    local.mkdir()
    (local / "1b05.cif").write_bytes((SHARED / "1gbt.cif").read_bytes())
    (local / "1a8o.pdb").write_bytes((SAMPLES / "1a8o.pdb").read_bytes())
    offline = _config(tmp_path / "o", base, offline=True, source_dirs=[local])
    report = fetch([Target("1B05"), Target("1A8O")], offline)
    assert report.status.tolist() == ["failed", "local"]
    assert f"{local / '1b05.cif'}: entry 1GBT (_entry.id), not the requested 1B05" in report.reason[0]


@pytest.mark.parametrize("reply, message", [
    (b'{"result_set": [{"score": 1.0}]}', "result_set[0]: no `identifier`"),
    (b"<html>busy</html>", "search http://127.0.0.1:"),
    (b"[1, 2]", "expected a JSON object with result_set"),
    (b"", "search http://127.0.0.1:"),  # an empty answer
])
def test_malformed_search_answers_are_one_line_naming_the_search(tmp_path, server, capsys, reply, message):
    base, _ = server
    Handler.search_reply = reply
    query = tmp_path / "q.json"
    query.write_text(json.dumps({"query": {"type": "terminal"}}))
    code = main(["fetch", "--query", str(query), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c"),
                 "--search-url", f"{base}/search", "--timeout", str(TIMEOUT), "--backoff", "0", "--retries", "1",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 2 and out.startswith("foldtune fetch: ") and message in out and out.count("\n") == 1


def test_ctrl_c_writes_the_report_of_what_finished(tmp_path, server, capsys):
    base, _ = server
    args = ["fetch", "1A7G", "2CRB", "4ZEY", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
            "--rcsb-url", f"{base}/download", "--entry-url", f"{base}/entry", "--timeout", "5", "--backoff", "0",
            "--no-progress"]
    assert main(args) == 130
    out = capsys.readouterr().out
    assert out.startswith("foldtune fetch: interrupted (Ctrl-C) after 1 of 3 rows;") and out.count("\n") == 1
    report = pd.read_csv(tmp_path / "out" / "fetch_report.csv", keep_default_na=False)
    assert report.status.tolist() == ["downloaded", "failed", "failed"]
    assert all("interrupted (Ctrl-C)" in reason for reason in report.reason[1:])
    _no_partial_files(tmp_path)
    # Rerun: the finished one comes from the cache.
    PLAN["2CRB"] = ["500"]
    try:
        assert main(args) == 1
    finally:
        PLAN["2CRB"] = ["sigint"]
    report = pd.read_csv(tmp_path / "out" / "fetch_report.csv", keep_default_na=False)
    assert report.status.tolist() == ["cached", "failed", "downloaded"]


def test_a_dripping_server_is_cut_off_by_the_attempt_timeout(tmp_path, server):
    base, _ = server
    config = _config(tmp_path, base, attempt_timeout=0.5)
    started = time.perf_counter()
    report = fetch([Target("4AKE")], config)
    assert time.perf_counter() - started < 1.5  # 40 bytes at 50 ms: 2 s without the limit
    assert report.status.tolist() == ["downloaded"] and Handler.attempts == {"4AKE": 2}
    validate_mmcif((config.cache / "4ake.cif.gz").read_bytes())
    Handler.attempts = {}
    PLAN["4AKE"] = ["drip"]
    try:
        report = fetch([Target("4AKE")], _config(tmp_path / "again", base, attempt_timeout=0.5))
    finally:
        PLAN["4AKE"] = ["drip", "ok"]
    assert report.status.tolist() == ["failed"] and "stalled: the attempt's time limit passed" in report.reason[0]


def test_malformed_entry_metadata_is_named_and_the_file_still_fetched(tmp_path, server):
    base, _ = server
    resolution = fetch([Target("3U8V")], _config(tmp_path, base, max_resolution=2.0))
    method = fetch([Target("2Q2K")], _config(tmp_path / "m", base, methods=["x-ray diffraction"]))
    for report in (resolution, method):
        assert report.status.tolist() == ["downloaded"]  # prepare still filters on the file's own resolution
        assert report.reason[0].startswith("entry metadata unavailable (malformed: ")
        assert report.reason[0].endswith("filters not applied")
    assert "could not convert string to float: 'high'" in resolution.reason[0]
