"""Download mmCIF files from RCSB (or serve them offline from a cache / local directory) — ``foldtune fetch``.

- Every id ends up either fetched (``downloaded`` / ``cached`` / ``local``) or reported (``failed`` /
  ``filtered``) in ``fetch_report.csv`` (id,chain,status,path,reason); one bad id never stops the run.
- Cache writes are atomic (temp + rename) and a cached file counts only if it validates (gzip decompresses,
  mmCIF with ``data_`` and a complete ``_atom_site`` loop), so a killed run never leaves a file that later
  counts as cached.
- Retries with exponential backoff on timeouts, 5xx/429, truncated or wrong bodies; 4xx fails at once.
- When the network is unreachable (DNS failure, refused or unroutable connection) the run switches to
  offline mode: cache first, then ``source_dirs`` (files whose name starts with the PDB id).
"""

from __future__ import annotations

import errno
import gzip
import http.client
import json
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from data.io import atomic_path, atomic_write_bytes
from data.structure import mmcif_atom_site_problem

FILES_URL = "https://files.rcsb.org/download"
ENTRY_URL = "https://data.rcsb.org/rest/v1/core/entry"
SEARCH_URL = "https://search.rcsb.org/rcsbsearch/v2/query"
REPORT_COLUMNS = ["id", "chain", "status", "path", "reason"]
_STRUCTURE_SUFFIX = re.compile(r"\.(cif|mmcif|pdb|ent)(\.gz)?$", re.I)
_ID_CHAIN = re.compile(r"^(\d[A-Za-z0-9]{3})[_.:]([A-Za-z0-9]{1,4})$")


class FetchInterrupted(Exception):
    """Ctrl-C during `fetch`: the report was written for the ids that finished (the rest: failed,
    "interrupted"); ``frame`` is that report."""

    def __init__(self, frame: pd.DataFrame, report: Path):
        super().__init__(f"interrupted; {report} lists the ids that finished")
        self.frame, self.report = frame, report


class FetchError(Exception):
    """One attempt failed. ``retry`` says whether another attempt may help."""

    def __init__(self, reason: str, retry: bool, unreachable: bool = False):
        super().__init__(reason)
        self.retry, self.unreachable = retry, unreachable


@dataclass
class FetchConfig:
    cache: Path = Path("cache/structures")
    out: Path | None = None
    files_url: str = FILES_URL
    entry_url: str = ENTRY_URL
    search_url: str = SEARCH_URL
    timeout: float = 30.0  # seconds per socket operation
    attempt_timeout: float | None = 300.0  # seconds per attempt in all: a server dripping bytes cannot stall a run
    retries: int = 3  # extra attempts after the first
    backoff: float = 1.0  # seconds; attempt k waits backoff * 2**(k-1)
    offline: bool = False
    source_dirs: list[Path] = field(default_factory=list)
    max_resolution: float | None = None
    methods: list[str] | None = None  # e.g. ["X-RAY DIFFRACTION"]; compared upper-case
    max_entry_residues: int | None = None  # rcsb_entry_info.deposited_polymer_monomer_count
    progress: bool = True


@dataclass
class Target:
    id: str  # PDB id (upper case) or, offline, a file stem
    chain: str = ""


# ------------------------------------------------------------------------------------------- ids
def parse_target(token: str) -> Target:
    """``1ABC`` / ``1abc_A`` / ``1ABC.A`` / a file name (``1abc.cif.gz``, ``7sgn_C_target.pdb``)."""
    token = Path(token.strip()).name
    stem = _STRUCTURE_SUFFIX.sub("", token)
    match = _ID_CHAIN.match(stem)
    if match:
        return Target(match.group(1).upper(), match.group(2))
    return Target(stem.upper() if re.fullmatch(r"\d[A-Za-z0-9]{3}", stem) else stem)


def read_ids_file(path: str | os.PathLike) -> list[Target]:
    """Text (one id per line, ``#`` comments) or CSV with an ``id``/``pdb_id`` or ``file`` column and an
    optional ``chain`` column (so ``data/samples/demo_chains.csv`` works)."""
    path = Path(path)
    text = path.read_text()
    first = text.splitlines()[0] if text.strip() else ""
    if "," in first:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        column = next((c for c in ("id", "pdb_id", "file") if c in frame.columns), None)
        if column is None:
            raise ValueError(f"{path}: columns: need id, pdb_id or file (got {list(frame.columns)})")
        targets = []
        for row in frame.to_dict("records"):
            target = parse_target(row[column])
            chain = (row.get("chain") or "").strip()
            targets.append(Target(target.id, chain if chain not in ("_", "(blank)") else "") if chain else target)
        return targets
    return [parse_target(line.split("#")[0]) for line in text.splitlines() if line.split("#")[0].strip()]


# ------------------------------------------------------------------------------------------- HTTP
def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _open(url: str, timeout: float, data: bytes | None = None, headers: dict | None = None):
    handlers = [urllib.request.ProxyHandler({})] if _is_loopback(url) else []
    request = urllib.request.Request(url, data=data, headers={"User-Agent": "foldtune-fetch/0.1", **(headers or {})})
    return urllib.request.build_opener(*handlers).open(request, timeout=timeout)


def _read_body(response, url: str, deadline: float | None) -> bytes:
    """The response body, read in blocks so that the attempt's `deadline` (time.monotonic) holds even when
    every single read is within the socket timeout (a server sending a byte at a time)."""
    if deadline is None:
        return response.read()
    blocks = []
    while True:
        if time.monotonic() > deadline:
            raise FetchError(f"stalled: the attempt's time limit passed after {sum(map(len, blocks))} bytes",
                             retry=True)
        block = response.read1(1 << 16) if hasattr(response, "read1") else response.read(1 << 16)
        if not block:
            return b"".join(blocks)
        blocks.append(block)


def http_get(url: str, timeout: float, data: bytes | None = None, headers: dict | None = None,
             attempt_timeout: float | None = None) -> bytes:
    """Body of one request; raises ``FetchError`` classified for retry / unreachable network.
    `timeout` bounds each socket operation, `attempt_timeout` the whole request (None: no limit)."""
    deadline = time.monotonic() + attempt_timeout if attempt_timeout else None
    try:
        with _open(url, timeout, data, headers) as response:
            body = _read_body(response, url, deadline)
            expected = response.headers.get("Content-Length")
            if expected is not None and expected.isdigit() and len(body) < int(expected):
                raise FetchError(f"truncated body ({len(body)} of {expected} bytes)", retry=True)
            return body
    except FetchError:
        raise
    except urllib.error.HTTPError as exc:
        retry = exc.code >= 500 or exc.code == 429
        raise FetchError(f"HTTP {exc.code} {exc.reason}", retry=retry) from None
    except (socket.timeout, TimeoutError) as exc:
        raise FetchError(f"timeout after {timeout} s", retry=True) from exc
    except http.client.IncompleteRead as exc:
        raise FetchError(f"truncated body ({len(exc.partial)} bytes read)", retry=True) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise FetchError(f"timeout after {timeout} s", retry=True) from None
        unreachable = isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or (
            isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EACCES))
        if unreachable:
            raise FetchError(f"network unreachable ({reason})", retry=False, unreachable=True) from None
        raise FetchError(f"connection error ({reason})", retry=True) from None
    except (ConnectionError, http.client.HTTPException, OSError) as exc:
        raise FetchError(f"connection error ({type(exc).__name__}: {exc})", retry=True) from None


# ------------------------------------------------------------------------------------------- validation
def validate_mmcif(payload: bytes, require_terminator: bool = True) -> str:
    """The mmCIF text of ``payload`` (gzip or plain); raises ``ValueError`` if it is not a complete mmCIF.

    Complete = decompresses, starts with ``data_``, has an ``_atom_site`` loop whose last row has one value
    per column and (for RCSB downloads) is closed by ``#`` or another item before the end of the file.
    """
    if payload[:2] == b"\x1f\x8b":
        try:
            payload = gzip.decompress(payload)
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"gzip: corrupt or truncated ({exc})") from None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("body: not UTF-8 text (binary?)") from None
    if not text.lstrip().startswith("data_"):
        raise ValueError(f"body: not mmCIF (starts with {text.lstrip()[:30]!r})")
    problem = mmcif_atom_site_problem(text, require_terminator)
    if problem is not None:
        raise ValueError(f"body: {problem}")
    return text


_ENTRY_ID = re.compile(r"^_entry\.id[ \t]+['\"]?([^\s'\"]+)", re.M)
_PDB_HEADER = re.compile(r"^HEADER.{56}(\d[A-Za-z0-9]{3})", re.M)


def entry_id(text: str) -> str | None:
    """The PDB id a structure file says it is: mmCIF `_entry.id`, else a PDB file's HEADER idCode; None when
    the file does not say (upper case)."""
    match = _ENTRY_ID.search(text[:200_000]) or _PDB_HEADER.search(text[:2000])
    return match.group(1).upper() if match else None


def check_entry(text: str, pdb_id: str) -> None:
    """ValueError when the file names another entry than the requested one (a mirror or proxy serving the
    wrong file would otherwise be cached, and its chains named, under the requested id)."""
    found = entry_id(text)
    if found is not None and found != pdb_id.upper():
        raise ValueError(f"body: entry {found} (_entry.id), not the requested {pdb_id.upper()}")


def _file_text(path: Path) -> str:
    payload = path.read_bytes()
    if payload[:2] == b"\x1f\x8b":
        payload = gzip.decompress(payload)
    return payload.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------- fetcher
class Fetcher:
    """Fetch targets into ``config.cache`` (``<id>.cif.gz``) and link/copy them into ``config.out``."""

    def __init__(self, config: FetchConfig):
        self.config = config
        self.offline = config.offline
        self.offline_reason = "--offline" if config.offline else ""
        self.requests = 0

    # -- small helpers
    def cache_path(self, pdb_id: str) -> Path:
        return self.config.cache / f"{pdb_id.lower()}.cif.gz"

    def _cached(self, pdb_id: str) -> Path | None:
        path = self.cache_path(pdb_id)
        if not path.is_file():
            return None
        try:
            check_entry(validate_mmcif(path.read_bytes()), pdb_id)
        except ValueError:
            return None  # a corrupt or wrong cache entry is downloaded again (and replaced atomically)
        return path

    def _local(self, target_id: str) -> Path | None:
        wanted = target_id.lower()
        candidates = []
        for directory in self.config.source_dirs:
            for path in sorted(Path(directory).iterdir()) if Path(directory).is_dir() else []:
                if not path.is_file() or not _STRUCTURE_SUFFIX.search(path.name):
                    continue
                stem = _STRUCTURE_SUFFIX.sub("", path.name).lower()
                if stem == wanted:
                    return path
                if stem.startswith(wanted) and not stem[len(wanted)].isalnum():
                    candidates.append(path)
        return candidates[0] if candidates else None

    def _request(self, url: str, data: bytes | None = None, headers: dict | None = None,
                 validate=None) -> bytes:
        """GET/POST with retries; ``validate(body)`` raising ValueError counts as a retryable failure."""
        attempts = self.config.retries + 1
        last = "no attempt"
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.config.backoff * 2 ** (attempt - 1))
            self.requests += 1
            try:
                body = http_get(url, self.config.timeout, data, headers, self.config.attempt_timeout)
                if validate is not None:
                    validate(body)
                return body
            except FetchError as exc:
                last = str(exc)
                if exc.unreachable:
                    raise
                if not exc.retry:
                    break
            except ValueError as exc:
                last = str(exc)
        raise FetchError(f"{last} (after {attempt + 1} attempt{'s' if attempt else ''})", retry=False)

    def _go_offline(self, reason: str) -> None:
        if not self.offline:
            self.offline = True
            self.offline_reason = reason
            print(f"fetch: network unreachable ({reason}); continuing offline from cache and --source-dir")

    # -- metadata and search
    def entry_metadata(self, pdb_id: str) -> dict:
        body = self._request(f"{self.config.entry_url.rstrip('/')}/{pdb_id.upper()}", validate=json.loads)
        return json.loads(body)

    def filter_reason(self, metadata: dict) -> str | None:
        info = metadata.get("rcsb_entry_info") or {}
        config = self.config
        if config.methods:
            methods = {m.get("method", "").upper() for m in metadata.get("exptl") or []}
            if not methods & {m.upper() for m in config.methods}:
                return f"method {sorted(methods)} not in {config.methods}"
        if config.max_resolution is not None:
            resolution = (info.get("resolution_combined") or [None])[0]
            if resolution is None:
                return "no resolution in entry metadata"
            if float(resolution) > config.max_resolution:
                return f"resolution {resolution} > {config.max_resolution}"
        if config.max_entry_residues is not None:
            residues = info.get("deposited_polymer_monomer_count")
            if residues is not None and int(residues) > config.max_entry_residues:
                return f"entry has {residues} polymer residues > {config.max_entry_residues}"
        return None

    def search(self, query: dict, max_results: int | None = None) -> list[Target]:
        """Run an RCSB Search API v2 query; entry, entity (1ABC_1) and instance (1ABC.A) ids are accepted."""
        query = json.loads(json.dumps(query))
        if max_results:
            options = query.setdefault("request_options", {})
            options.setdefault("paginate", {"start": 0, "rows": int(max_results)})
        url = self.config.search_url
        try:
            body = self._request(url, data=json.dumps(query).encode(), headers={"Content-Type": "application/json"},
                                 validate=json.loads)
        except FetchError as exc:
            raise FetchError(f"search {url}: {exc}", retry=False, unreachable=exc.unreachable) from None
        answer = json.loads(body) if body.strip() else {}
        if not isinstance(answer, dict):
            raise ValueError(f"search {url}: expected a JSON object with result_set, got {type(answer).__name__}")
        results = answer.get("result_set") or []
        if not isinstance(results, list):
            raise ValueError(f"search {url}: result_set: expected a list, got {type(results).__name__}")
        targets = []
        for index, item in enumerate(results[: max_results or None]):
            if isinstance(item, dict) and not isinstance(item.get("identifier"), str):
                raise ValueError(f"search {url}: result_set[{index}]: no `identifier` (got keys {sorted(item)})")
            identifier = item["identifier"] if isinstance(item, dict) else str(item)
            entry, _, chain = identifier.partition(".")
            targets.append(Target(entry.split("_")[0].upper(), chain))
        return targets

    # -- one target
    def _download(self, pdb_id: str) -> Path:
        url = f"{self.config.files_url.rstrip('/')}/{pdb_id.upper()}.cif"
        body = self._request(url, headers={"Accept-Encoding": "gzip"},
                             validate=lambda payload: check_entry(validate_mmcif(payload), pdb_id))
        payload = body if body[:2] == b"\x1f\x8b" else gzip.compress(body, mtime=0)
        path = self.cache_path(pdb_id)
        atomic_write_bytes(path, payload)
        return path

    def _place(self, source: Path) -> Path:
        """Hard link (or copy) ``source`` into ``out`` atomically; returns the path in ``out``."""
        if self.config.out is None:
            return source
        destination = Path(self.config.out) / source.name
        if destination.exists() and destination.samefile(source):
            return destination
        with atomic_path(destination) as tmp:
            tmp.unlink()
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
        return destination

    def fetch_one(self, target: Target, metadata_checked: dict) -> dict:
        row = {"id": target.id, "chain": target.chain, "status": "failed", "path": "", "reason": ""}
        is_pdb_id = bool(re.fullmatch(r"\d[A-Z0-9]{3}", target.id))
        try:
            if is_pdb_id and not self.offline and self._needs_metadata():
                if target.id not in metadata_checked:
                    try:
                        metadata = self.entry_metadata(target.id)
                        try:
                            metadata_checked[target.id] = self.filter_reason(metadata)
                        except (AttributeError, TypeError, ValueError, IndexError) as exc:
                            raise FetchError(f"malformed: {type(exc).__name__}: {exc}", retry=False) from None
                    except FetchError as exc:
                        if exc.unreachable:
                            raise
                        metadata_checked[target.id] = None  # no metadata: prepare still filters chains
                        row["reason"] = f"entry metadata unavailable ({exc}); filters not applied"
                if metadata_checked[target.id]:
                    row.update(status="filtered", reason=metadata_checked[target.id])
                    return row
            source, status = (self._cached(target.id), "cached") if is_pdb_id else (None, "")
            if source is None and is_pdb_id and not self.offline:
                source, status = self._download(target.id), "downloaded"
        except FetchError as exc:
            if not exc.unreachable:
                row["reason"] = f"{target.id}: {exc}"
                local = self._local(target.id)
                if local is None:
                    return row
                source, status = local, "local"
                row["reason"] += "; served from --source-dir"
            else:
                self._go_offline(str(exc))
                source, status = None, ""
        if source is None:
            source, status = self._local(target.id), "local"
        if source is None:
            where = "cache" + (" or --source-dir" if self.config.source_dirs else "")
            mode = f"offline ({self.offline_reason})" if self.offline else "not a PDB id"
            row["reason"] = f"{target.id}: not in {where}; {mode}"
            return row
        if status == "local":
            try:
                text = _file_text(source)
                if text.lstrip().startswith("data_"):  # an mmCIF: complete, as a download must be
                    validate_mmcif(text.encode("utf-8"))
                if is_pdb_id:
                    check_entry(text, target.id)
            except (ValueError, OSError, EOFError, zlib.error) as exc:
                row["reason"] = f"{target.id}: {source}: {str(exc).removeprefix('body: ')}"
                return row
        row.update(status=status, path=str(self._place(source)))
        return row

    def _needs_metadata(self) -> bool:
        c = self.config
        return c.max_resolution is not None or bool(c.methods) or c.max_entry_residues is not None

    def run(self, targets: Sequence[Target]) -> pd.DataFrame:
        from rich.progress import Progress

        rows, fetched = [], {}
        metadata_checked: dict[str, str | None] = {}
        self.interrupted = False
        with Progress(disable=not self.config.progress, transient=True) as bar:
            task = bar.add_task("fetch", total=len(targets))
            try:
                self._run_targets(targets, rows, fetched, metadata_checked, bar, task)
            except KeyboardInterrupt:  # Ctrl-C: report what finished; the rest are marked, not lost
                self.interrupted = True
                for target in targets[len(rows):]:
                    rows.append({"id": target.id, "chain": target.chain, "status": "failed", "path": "",
                                 "reason": f"{target.id}: interrupted (Ctrl-C) before it finished"})
        return pd.DataFrame(rows, columns=REPORT_COLUMNS)

    def _run_targets(self, targets: Sequence[Target], rows: list, fetched: dict, metadata_checked: dict, bar,
                     task) -> None:
        """Fetch `targets` in order, appending one report row each to `rows` (so an interrupt keeps them)."""
        for target in targets:
            key = target.id
            if key in fetched:  # another chain of an id already handled: same file, no second request
                rows.append({**fetched[key], "chain": target.chain})
            else:
                try:
                    row = self.fetch_one(target, metadata_checked)
                except Exception as exc:  # a bug or odd error for one id must not lose the others
                    row = {"id": target.id, "chain": target.chain, "status": "failed", "path": "",
                           "reason": f"{target.id}: {type(exc).__name__}: {exc}"}
                fetched[key] = row
                rows.append(row)
            bar.advance(task)


def fetch(targets: Iterable[Target], config: FetchConfig, report: str | os.PathLike | None = None) -> pd.DataFrame:
    """Fetch every target and write ``fetch_report.csv`` (atomically) to ``report`` (default: out or cache dir)."""
    targets = list(targets)
    fetcher = Fetcher(config)
    frame = fetcher.run(targets)
    report = Path(report) if report else Path(config.out or config.cache) / "fetch_report.csv"
    with atomic_path(report) as tmp:
        frame.to_csv(tmp, index=False)
    if fetcher.interrupted:
        raise FetchInterrupted(frame, report)
    return frame
