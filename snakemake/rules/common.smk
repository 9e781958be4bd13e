# Config validation, output paths and the experiment grid. Shared Python helpers live here (no lambdas in rules).

import hashlib
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


def _config_source() -> str:
    files = [str(f) for f in getattr(workflow, "configfiles", [])]
    return ", ".join(files) if files else "--config"


if not config:
    raise WorkflowError("no config: run with --configfile configs/<experiment>.yaml (e.g. configs/demo.yaml)")
def _schema_message(error: jsonschema.ValidationError) -> str:
    """`file: dotted.key: what is wrong` from a jsonschema error (anyOf: the alternatives' reasons)."""
    where = ".".join(str(part) for part in error.absolute_path) or "(top level)"
    if error.validator == "anyOf" and error.context:
        reasons = sorted({sub.message for sub in error.context})
        return f"{_config_source()}: {where}: none of the alternatives fit ({'; '.join(reasons)})"
    return f"{_config_source()}: {where}: {error.message}"


try:
    validate(config, schema="../schemas/config.schema.yaml")
except Exception as exc:  # snakemake wraps the jsonschema error in its WorkflowError
    causes = [exc, exc.__cause__, exc.__context__]
    errors = [cause for cause in causes if isinstance(cause, jsonschema.ValidationError)]
    if not errors:
        raise
    raise WorkflowError(_schema_message(errors[0])) from None


if (config["training"] or {}).get("kind", "fold") != "fold":
    raise WorkflowError(f"{_config_source()}: training.kind: {config['training']['kind']!r} is not supported by the "
                        "workflow (it predicts and scores structures); train language models with "
                        "`foldtune train --config FILE --section training` (see configs/esm2_lm.yaml)")


# ------------------------------------------------------------------------------------------------ paths
EXP = f"{config['results_dir']}/{config['experiment']}"
CACHE = config["cache_dir"]
LOGS = f"{EXP}/logs"
STRUCTURES = f"{EXP}/structures"
FETCHED = f"{STRUCTURES}/fetch_report.csv"
DATASET = f"{EXP}/dataset"
MANIFEST = f"{DATASET}/manifest.csv"
SPLITS = f"{EXP}/splits.csv"
BASE_RUN = f"{EXP}/runs/base"
RESOLVED_CONFIG = f"{EXP}/workflow_config.yaml"
BASELINES = {"ideal-helix": "ideal_helix"}  # --baseline name -> result name


def _write_if_changed(path: str, text: str) -> None:
    """Write the resolved config next to the outputs. Every job re-parses the Snakefile, so only a change
    rewrites it, and atomically (a reader never sees half a file)."""
    target = Path(path)
    if target.exists() and target.read_text(encoding="utf-8") == text:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)


# `foldtune train --config RESOLVED_CONFIG --section ...` reads the validated config with its defaults filled
# and any `snakemake --config` overrides applied, which the config file on disk would not have.
_write_if_changed(RESOLVED_CONFIG, yaml.safe_dump(config, sort_keys=False))


# ------------------------------------------------------------------------------------------------- grid
def _targets_tag(targets) -> str:
    return "+".join(targets)


def _budget_ranks() -> dict:
    """Equal-budget mode: {(method, targets_tag, part): rank}, cached in EXP/budget.json by the inputs' hash
    (every job re-parses the Snakefile; counting builds the model on the meta device, ~seconds)."""
    grid = config["grid"]
    budget = grid["budget"]
    model_cfg = (config.get("base_training") or config["training"]).get("model", {})
    adapter_cfg = config["training"].get("adapter", {})
    methods = [m for m in grid["methods"] if m in ("lora", "lorta", "tlora")]
    key_payload = json.dumps([model_cfg, adapter_cfg, grid, methods], sort_keys=True, default=str)
    key = hashlib.sha256(key_payload.encode()).hexdigest()[:16]
    cache = Path(EXP) / "budget.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return {tuple(k.split("|")): v["rank"] for k, v in cached["ranks"].items()}
    from pipeline.budget import rank_for_budget

    ranks, table = {}, {}
    for targets in grid["targets"]:
        for part in grid["part"]:
            for method in methods:
                choice = rank_for_budget(model_cfg, {**adapter_cfg, "method": method, "targets": list(targets),
                                                     "part": part}, budget["params"], rule=budget["rule"],
                                         max_rank=budget["max_rank"])
                ident = (method, _targets_tag(targets), part)
                ranks[ident] = choice.rank
                table["|".join(ident)] = {"rank": choice.rank, "trainable_params": choice.params}
    _write_if_changed(str(cache), json.dumps({"key": key, "budget": budget, "ranks": table}, indent=2) + "\n")
    return ranks


def _build_runs() -> dict:
    """run name -> {method, rank, seed, targets, part}. The untuned base (`none`) is always included."""
    grid = config["grid"]
    methods = list(grid["methods"]) + ([] if "none" in grid["methods"] else ["none"])
    many_targets, many_parts = len(grid["targets"]) > 1, len(grid["part"]) > 1
    budget_ranks = _budget_ranks() if grid.get("budget") else None
    runs = {}
    for method in methods:
        for targets in grid["targets"]:
            for part in grid["part"]:
                if method in ("full", "none"):
                    ranks = [0]
                elif budget_ranks is not None:
                    ranks = [budget_ranks[(method, _targets_tag(targets), part)]]
                else:
                    ranks = grid["ranks"]
                for rank in ranks:
                    for seed in ([0] if method == "none" else grid["seeds"]):
                        name = method if method in ("full", "none") else f"{method}_r{rank}"
                        if method != "none":
                            name += f"_s{seed}"
                        if many_targets and method not in ("full", "none"):
                            name += f"_{_targets_tag(targets)}"
                        if many_parts and method != "none":
                            name += f"_{part}"
                        runs.setdefault(name, {"method": method, "rank": rank, "seed": seed,
                                               "targets": list(targets), "part": part})
    return runs


RUNS = _build_runs()
EVAL_SPLITS = list(config["evaluate"]["splits"])
BASELINE_NAMES = [BASELINES[b] for b in config["evaluate"]["baselines"]]
SCORED = list(RUNS) + BASELINE_NAMES


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


wildcard_constraints:
    run=_alternatives(RUNS),
    baseline=_alternatives(BASELINE_NAMES) if BASELINE_NAMES else "(?!)",
    scored=_alternatives(SCORED),
    split="train|val|test",


# ---------------------------------------------------------------------------------------- rule helpers
def fetch_args(wildcards) -> str:
    data = config["data"]
    args = list(data["ids"])
    if data["ids_file"]:
        args += ["--ids-file", data["ids_file"]]
    if data["query"]:
        args += ["--query", data["query"]]
    if data["max_entries"]:
        args += ["--max", str(data["max_entries"])]
    for directory in data["source_dirs"]:
        args += ["--source-dir", directory]
    if data["offline"]:
        args.append("--offline")
    filters = data["fetch_filters"]
    if filters["max_resolution"] is not None:
        args += ["--max-resolution", str(filters["max_resolution"])]
    for method in filters["methods"]:
        args += ["--method", method]
    if filters["max_entry_residues"] is not None:
        args += ["--max-entry-residues", str(filters["max_entry_residues"])]
    return shlex.join(args)


def prepare_args(wildcards) -> str:
    data = config["data"]
    args = ["--min-len", str(data["min_length"]), "--max-len", str(data["max_length"]),
            "--max-unknown", str(data["max_unknown"])]
    if data["max_resolution"] is not None:
        args += ["--max-resolution", str(data["max_resolution"])]
    if data["chains_file"]:
        args += ["--chains-file", data["chains_file"]]
    return shlex.join(args)


def split_args(wildcards) -> str:
    split = config["data"]["split"]
    args = ["--threshold", str(split["identity"]), "--fractions", *map(str, split["fractions"]),
            "--seed", str(split["seed"])]
    if split["date_cutoff"]:
        args += ["--date-cutoff", split["date_cutoff"]]
    return shlex.join(args)


def _section_digest(section: str) -> str:
    """A digest of one config section: a params value, so editing it reruns exactly the jobs that use it."""
    payload = json.dumps(config.get(section), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def base_overrides(wildcards) -> str:
    return shlex.join([f"data.dataset={DATASET}", f"data.splits={SPLITS}", f"output_dir={BASE_RUN}",
                       "adapter.method=full"])


def base_digest(wildcards) -> str:
    return _section_digest("base_training")


def train_inputs(wildcards) -> dict:
    inputs = {"manifest": MANIFEST, "splits": SPLITS}
    if config.get("base_training"):
        inputs["base"] = f"{BASE_RUN}/summary.json"
    return inputs


def train_overrides(wildcards) -> str:
    run = RUNS[wildcards.run]
    overrides = [
        f"adapter.method={run['method']}",
        f"adapter.targets=[{','.join(run['targets'])}]",
        f"adapter.part={run['part']}",
        f"trainer.seed={run['seed']}",
        f"data.dataset={DATASET}",
        f"data.splits={SPLITS}",
        f"output_dir={EXP}/runs/{wildcards.run}",
    ]
    if run["rank"]:
        overrides.append(f"adapter.rank={run['rank']}")
    if config.get("base_training"):
        overrides.append(f"model.base_run={BASE_RUN}")
    return shlex.join(overrides)


def train_digest(wildcards) -> str:
    return _section_digest("training")


def model_gpus(section: str) -> int:
    """GPUs (= DDP processes) of a model job: the section's trainer.devices when it is a count, else 1."""
    devices = ((config.get(section) or {}).get("trainer") or {}).get("devices", "auto")
    if isinstance(devices, list):
        return max(1, len(devices))
    return devices if isinstance(devices, int) and devices > 0 else 1


def rank_threads(wildcards, output, threads) -> int:
    """Torch threads per DDP process: the job's threads shared by its processes."""
    section = "base_training" if Path(output[0]).parent == Path(BASE_RUN) else "training"
    return max(1, threads // model_gpus(section))


def predict_args(wildcards) -> str:
    evaluate = config["evaluate"]
    args = []
    for key, flag in (("max_tokens", "--max-tokens"), ("num_recycles", "--num-recycles"),
                      ("chunk_size", "--chunk-size")):
        if evaluate[key] is not None:
            args += [flag, str(evaluate[key])]
    return shlex.join(args)


def predict_digest(wildcards) -> str:
    keys = ("max_tokens", "num_recycles", "chunk_size")
    return json.dumps({key: config["evaluate"][key] for key in keys}, sort_keys=True)


def score_input(wildcards) -> str:
    return f"{EXP}/predictions/{wildcards.scored}/{wildcards.split}/predictions.csv"


def all_scores() -> list:
    return [f"{EXP}/scores/{name}/{split}.csv" for name in SCORED for split in EVAL_SPLITS]


def all_summaries() -> list:
    return [f"{EXP}/runs/{name}/summary.json" for name in RUNS]


def report_digest(wildcards) -> str:
    return _section_digest("report")


def report_runs(wildcards) -> str:
    return shlex.join(SCORED)


def baseline_cli_name(wildcards) -> str:
    return {result: cli for cli, result in BASELINES.items()}[wildcards.baseline]


# Directories derived from a rule's own files (not hard-coded prefixes: works without a shared filesystem).
def parent_of_output(wildcards, output) -> str:
    return str(Path(output[0]).parent)


def parent_of_fetched(wildcards, input) -> str:
    return str(Path(input.fetched).parent)


def dataset_dir(wildcards, input) -> str:
    return str(Path(input.manifest).parent)


def run_dir(wildcards, input) -> str:
    return str(Path(input.run).parent)
