"""`foldtune fetch`: download mmCIF files from RCSB, or serve them offline from a cache / local directory."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "download PDB/mmCIF structures (or serve them offline from a cache / local dir); writes fetch_report.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", help="PDB ids, optionally with a chain: 1UBI 1a8o_A")
    parser.add_argument("--ids-file", help="one id per line, or CSV with id/pdb_id/file (+ chain) columns")
    parser.add_argument("--query", metavar="FILE.json", help="RCSB Search API v2 query (JSON) to run")
    parser.add_argument("--max", type=int, default=None, help="at most this many search results")
    parser.add_argument("--out", help="directory for the fetched files (hard links or copies) + fetch_report.csv")
    parser.add_argument("--cache", default="cache/structures", help="content cache of downloaded mmCIF (.cif.gz)")
    parser.add_argument("--offline", action="store_true", help="no network: cache and --source-dir only")
    parser.add_argument("--source-dir", action="append", default=[], metavar="DIR",
                        help="local structure files matched by PDB id in the file name (repeatable)")
    parser.add_argument("--max-resolution", type=float, help="skip entries with a worse resolution (Å)")
    parser.add_argument("--method", action="append", help="keep only these experimental methods (repeatable)")
    parser.add_argument("--max-entry-residues", type=int, help="skip entries with more deposited polymer residues")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per socket operation")
    parser.add_argument("--attempt-timeout", type=float, default=300.0,
                        help="seconds per attempt in all (a server sending a byte at a time is cut off; 0 = none)")
    parser.add_argument("--retries", type=int, default=3, help="extra attempts after a retryable failure")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in s (doubles each time)")
    parser.add_argument("--rcsb-url", default=None, help="base URL of file downloads (default files.rcsb.org/download)")
    parser.add_argument("--entry-url", default=None, help="base URL of the entry metadata API")
    parser.add_argument("--search-url", default=None, help="URL of the RCSB Search API v2")
    parser.add_argument("--no-progress", action="store_true")


def argument_error(args: argparse.Namespace) -> str | None:
    """The first bad argument value, as `--name: why`, or None (checked before any request or file)."""
    import math

    checks = [("--retries", args.retries, args.retries >= 0, "must be >= 0 (extra attempts)"),
              ("--backoff", args.backoff, math.isfinite(args.backoff) and args.backoff >= 0, "must be >= 0 seconds"),
              ("--timeout", args.timeout, math.isfinite(args.timeout) and args.timeout > 0, "must be > 0 seconds"),
              ("--attempt-timeout", args.attempt_timeout,
               math.isfinite(args.attempt_timeout) and args.attempt_timeout >= 0, "must be >= 0 seconds (0 = none)"),
              ("--max", args.max, args.max is None or args.max >= 1, "must be >= 1 (search results)"),
              ("--max-resolution", args.max_resolution, args.max_resolution is None or args.max_resolution > 0,
               "must be > 0 Å"),
              ("--max-entry-residues", args.max_entry_residues,
               args.max_entry_residues is None or args.max_entry_residues >= 1, "must be >= 1")]
    for name, value, ok, why in checks:
        if not ok:
            return f"{name} {value}: {why}"
    for name, value in (("--out", args.out), ("--cache", args.cache)):
        path = Path(value) if value else None
        while path is not None and not path.exists() and path != path.parent:
            path = path.parent  # the first existing ancestor must be a directory too
        if path is not None and path.exists() and not path.is_dir():
            return f"{name} {value}: {path} is a file, not a directory"
    return None


def run(args: argparse.Namespace) -> int:
    from data import fetch as F

    problem = argument_error(args)
    if problem:
        print(f"foldtune fetch: {problem}")
        return 2
    started = time.perf_counter()
    config = F.FetchConfig(
        cache=Path(args.cache), out=Path(args.out) if args.out else None,
        files_url=args.rcsb_url or F.FILES_URL, entry_url=args.entry_url or F.ENTRY_URL,
        search_url=args.search_url or F.SEARCH_URL, timeout=args.timeout, retries=args.retries,
        attempt_timeout=args.attempt_timeout or None,
        backoff=args.backoff, offline=args.offline, source_dirs=[Path(d) for d in args.source_dir],
        max_resolution=args.max_resolution, methods=args.method, max_entry_residues=args.max_entry_residues,
        progress=not args.no_progress,
    )
    try:
        targets = [F.parse_target(token) for token in args.ids]
        if args.ids_file:
            targets += F.read_ids_file(args.ids_file)
        if args.query:
            if config.offline:
                print("foldtune fetch: --query needs the network (drop --offline or pass ids)")
                return 2
            try:
                query = json.loads(Path(args.query).read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"{args.query}: --query: not a JSON search query ({exc})") from None
            except OSError as exc:
                raise ValueError(f"{args.query}: --query: {exc.strerror or exc}") from None
            if not isinstance(query, dict):
                raise ValueError(f"{args.query}: --query: expected a JSON object, got {type(query).__name__}")
            targets += F.Fetcher(config).search(query, args.max)
    except (OSError, ValueError, F.FetchError) as exc:
        print(f"foldtune fetch: {exc}")
        return 2
    except KeyboardInterrupt:
        print("foldtune fetch: interrupted (Ctrl-C) before any id was fetched")
        return 130
    if not targets:
        print("foldtune fetch: no ids (give ids, --ids-file or --query)")
        return 2
    report_path = Path(config.out or config.cache) / "fetch_report.csv"
    try:
        frame = F.fetch(targets, config, report_path)
    except F.FetchInterrupted as stop:
        done = int((~stop.frame["reason"].str.contains("interrupted (Ctrl-C)", regex=False)).sum())
        print(f"foldtune fetch: interrupted (Ctrl-C) after {done} of {len(stop.frame)} rows; {stop.report} lists "
              "them (the others as failed, interrupted); rerun the same command to continue: finished downloads "
              "are served from the cache")
        return 130
    counts = frame.drop_duplicates("id")["status"].value_counts()
    summary = ", ".join(f"{status} {int(n)}" for status, n in counts.items())
    print(f"fetch: {frame['id'].nunique()} ids ({len(frame)} rows): {summary}; report {report_path}; "
          f"{time.perf_counter() - started:.1f} s")
    return 0 if not (frame["status"] == "failed").any() else 1
