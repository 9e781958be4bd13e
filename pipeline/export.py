"""Adapters out of foldtune: a run's LoRA as a peft adapter, or the merged model as a transformers directory.

    export_peft(RUN, DIR)     DIR/adapter_config.json + adapter_model.safetensors in peft's format (LoRA)
    export_merged(RUN, DIR)   DIR/config.json + model.safetensors: `EsmForProteinFolding.from_pretrained(DIR)`
    import_peft(PEFT, CFG, RUN)  a foldtune run directory (config.yaml + adapter/) from a peft LoRA adapter

Merging happens in fp32 (the run's model is built in fp32); each tensor is then cast to the dtype the
base stores it in (read from the base checkpoint's headers; fp32 for random bases and fresh folding heads).
A bf16/fp16 weight cannot hold an update much smaller than its own rounding step, so the relative loss of
the update, ||cast(W + dW) - W - dW|| / ||dW|| over every adapted weight, is measured and reported.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from data.io import atomic_write_text

UPDATE_LOSS_WARN = 1e-3  # relative loss of the merged update above which export warns


def export_peft(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write RUN's adapter (LoRA on ESMFold) in peft's format; ValueError when peft cannot express it."""
    import adapters
    from pipeline.predict import read_run_config, load_run_model

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    model = load_run_model(run_dir)
    adapters.save_peft(model, out_dir, base_model_name_or_path=_base_name(cfg["model"]))
    return Path(out_dir)


def _base_name(model_cfg: dict) -> str:
    """peft's base_model_name_or_path: the ESMFold directory / hub id, else a description of the base."""
    from pipeline.train import base_source

    if model_cfg.get("source") == "esmfold_pretrained" and not model_cfg.get("base_run"):
        return str(model_cfg["path"])
    return ", ".join(f"{k}={v}" for k, v in base_source(model_cfg).items())


def stored_dtypes(model_cfg: dict) -> dict[str, torch.dtype]:
    """Parameter name -> dtype the base checkpoint stores it in (names missing here are fp32)."""
    source = model_cfg.get("source", "random")
    dtypes: dict[str, torch.dtype] = {}
    if source == "esmfold_pretrained":
        from safetensors import safe_open

        directory = Path(model_cfg["path"]).expanduser()
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():
                    dtypes[name] = handle.get_slice(name).get_dtype()
        dtypes = {name: _SAFETENSORS_DTYPES.get(dt, torch.float32) for name, dt in dtypes.items()}
    elif source == "esm2_stem":
        from pipeline.models import fair_esm_to_hf, read_fair_esm_checkpoint

        state, _, _ = read_fair_esm_checkpoint(model_cfg["esm2"])
        dtypes = {f"esm.{name}": tensor.dtype for name, tensor in fair_esm_to_hf(state).items()}
    if model_cfg.get("base_run"):  # weights a method=full run trained: stored in fp32 by adapters.save
        from safetensors import safe_open

        import adapters

        with safe_open(str(Path(model_cfg["base_run"]) / "adapter" / adapters.WEIGHTS_NAME), "pt") as handle:
            dtypes.update({name: torch.float32 for name in handle.keys()})
    return dtypes


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def export_merged(run_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Fold RUN's adapter into the base weights (fp32), cast to the stored dtypes, `save_pretrained` to DIR.

    Returns {"adapted_weights", "dtypes", "update_relative_loss"}; warns when that loss > UPDATE_LOSS_WARN.
    """
    import adapters
    from adapters.layer import adapted_linears
    from pipeline.predict import read_run_config, load_run_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = read_run_config(run_dir)
    model = load_run_model(run_dir).float()
    stored = stored_dtypes(cfg["model"])
    deltas = {f"{path}.weight": adapter.get_delta_weight().detach() for path, _, adapter in adapted_linears(model)}
    bases = {name: model.get_parameter(name).detach().clone() for name in deltas}
    adapters.merge(model)
    adapters.detach(model, keep_merged=True)
    error_sq = update_sq = 0.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            dtype = stored.get(name, torch.float32)
            if dtype != param.dtype:
                param.data = param.data.to(dtype)
            if name in deltas:
                effective = param.float() - bases[name].to(dtype).float()
                error_sq += float((effective - deltas[name]).pow(2).sum())
                update_sq += float(deltas[name].pow(2).sum())
    loss = (error_sq / update_sq) ** 0.5 if update_sq > 0 else 0.0
    if loss > UPDATE_LOSS_WARN:
        warnings.warn(f"export --merged: the stored dtypes ({_dtype_summary(model)}) lose {loss:.2%} of the "
                      f"adapter update (relative L2); predict from the run (unmerged) for the exact model",
                      RuntimeWarning, stacklevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = ["EsmForProteinFolding"]  # foldtune's FoldingModel adds no weights
    atomic_write_text(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"adapted_weights": len(deltas), "dtypes": _dtype_summary(model), "update_relative_loss": loss}


def _dtype_summary(model: torch.nn.Module) -> str:
    counts: dict[str, int] = {}
    for param in model.parameters():
        key = str(param.dtype).replace("torch.", "")
        counts[key] = counts.get(key, 0) + param.numel()
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def import_peft(peft_dir: str | Path, cfg: dict, out_run: str | Path) -> Path:
    """A foldtune run directory from a peft LoRA adapter: RUN/config.yaml (cfg with the adapter section the
    peft config maps to) + RUN/adapter (foldtune format, base recorded). `foldtune predict --run` reads it."""
    import adapters
    from adapters.peft_interop import import_config
    from pipeline.config import dump_config
    from pipeline.predict import load_base_model
    from pipeline.train import base_source

    out_run = Path(out_run)
    if (out_run / "adapter").exists():
        raise ValueError(f"--out: {out_run} already holds an adapter; choose another directory")
    model = load_base_model(cfg)
    config = import_config(model, peft_dir).to_dict()
    adapters.load(model, peft_dir, base_source=base_source(cfg["model"], cfg.get("kind", "fold")))
    run_cfg = {**cfg, "adapter": {**cfg["adapter"], **{k: config[k] for k in
                                                       ("method", "rank", "alpha", "targets", "part", "dropout")}},
               "output_dir": str(out_run)}
    run_cfg["model"] = {**cfg["model"], "train_heads": any(
        p.requires_grad for n, p in model.named_parameters() if ".adapter." not in n)}
    out_run.mkdir(parents=True, exist_ok=True)
    adapters.save(model, out_run / "adapter")
    atomic_write_text(out_run / "config.yaml", dump_config(run_cfg))
    return out_run
