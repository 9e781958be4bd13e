"""The `foldtune` console script: a thin dispatcher over `pipeline.commands.<name>` modules."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). The help lives here so `foldtune --help` imports no torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("pipeline.commands.fetch", "download PDB/mmCIF structures (or serve them offline from a cache / local dir)"),
    "prepare": ("pipeline.commands.prepare", "parse, clean and tokenize structures into a dataset directory"),
    "split": ("pipeline.commands.split", "train/val/test split by sequence-identity clusters"),
    "params": ("pipeline.commands.params", "count trainable/total parameters of a model + adapter (meta device)"),
    "score": ("pipeline.commands.score", "TM-score, GDT, RMSD, lDDT of a model against a reference"),
    "train": ("pipeline.commands.train", "fine-tune a folding model or language model with an adapter"),
    "predict": ("pipeline.commands.predict", "fold sequences / a dataset split with a (fine-tuned) model"),
    "contacts": ("pipeline.commands.contacts", "contact precision (P@L, L/2, L/5; short/medium/long) of a language-model run"),
    "export": ("pipeline.commands.export", "export a run: LoRA in peft's format, or --merged a transformers ESMFold dir"),
    "import-peft": ("pipeline.commands.import_peft", "make a foldtune run directory from a peft LoRA adapter"),
    "report": ("pipeline.commands.report", "compare methods: tables, plots, report.md/html"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foldtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"foldtune {name}", description=help_text)
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(module.run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C (or the workflow stopping its jobs): one line, not a traceback
        print(f"foldtune {name}: interrupted (Ctrl-C); outputs are written atomically, so a rerun starts from "
              "what finished", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
