"""foldtune data: fetch structures, parse/clean them into atom37 chains, tokenize, datasets and splits.

Modules are imported on use (``from data.structure import read_chain``) so that light commands
(``foldtune fetch``) do not pull in torch.
"""

__all__ = ["fetch", "io", "structure", "tokenize", "dataset", "prepare", "split"]
