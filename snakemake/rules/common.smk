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


# fold: predict -> score structures (rules/evaluate.smk); lm: contact precision of each run (rules/lm.smk).
KIND = (config["training"] or {}).get("kind", "fold")
if KIND not in ("fold", "lm"):
    raise WorkflowError(f"{_config_source()}: training.kind: {KIND!r}: expected fold or lm")
if KIND == "lm" and (config.get("base_training") or config.get("base_run")):
    raise WorkflowError(f"{_config_source()}: base_training / base_run: only for folding models (training.kind "
                        "lm starts from model.esm2)")


# ------------------------------------------------------------------------------------------------ paths
EXP = f"{config['results_dir']}/{config['experiment']}"
CACHE = config["cache_dir"]
LOGS = f"{EXP}/logs"
STRUCTURES = f"{EXP}/structures"
FETCHED = f"{STRUCTURES}/fetch_report.csv"
DATASET = f"{EXP}/dataset"
MANIFEST = f"{DATASET}/manifest.csv"
SPLITS = f"{EXP}/splits.csv"
# A shipped base (`base_run`: a finished method=full run, e.g. the demo's committed base) replaces the `base`
# job unless `retrain_base` asks for it (then base_training trains it into runs/base as usual).
SHIPPED_BASE = None if config.get("retrain_base") else config.get("base_run")
if SHIPPED_BASE and not (Path(SHIPPED_BASE) / "summary.json").is_file():
    raise WorkflowError(f"{_config_source()}: base_run: {SHIPPED_BASE}/summary.json not found (a finished "
                        "`foldtune train` run directory is expected; or set retrain_base: true)")
if config.get("retrain_base") and not config.get("base_training"):
    raise WorkflowError(f"{_config_source()}: retrain_base: true needs a base_training section (the recipe)")
TRAINS_BASE = bool(config.get("base_training")) and not SHIPPED_BASE
BASE_RUN = SHIPPED_BASE or f"{EXP}/runs/base"
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


def _grid_groups() -> list:
    """The grid's groups of runs: the top-level grid (name "") and every `grid.groups` entry, each with the
    top-level values for what it does not set. A group's `training` holds dotted overrides of the
    training section for its runs (e.g. model.train_heads, trainer.lr)."""
    grid = config["grid"]
    shared = {key: grid.get(key) for key in ("ranks", "seeds", "targets", "part", "budget", "per_method")}
    shared["per_method"] = shared["per_method"] or {}
    shared["part"] = shared["part"] or (["stem"] if KIND == "lm" else ["trunk"])  # a language model has no trunk
    groups = [{**shared, "name": "", "label": grid.get("label") or "", "methods": list(grid["methods"]),
               "training": dict(grid.get("training") or {})}]
    names = {""}
    for group in grid.get("groups") or []:
        if group["name"] in names:
            raise WorkflowError(f"{_config_source()}: grid.groups: name {group['name']!r} is used twice")
        names.add(group["name"])
        groups.append({**shared, "label": group["name"], "training": {},
                       **{key: value for key, value in group.items() if value is not None}})
    return groups


def _dotted_merge(section: dict, overrides: dict) -> dict:
    """`section` with dotted-key overrides ({"trainer.lr": 0.01}) applied (nested mappings are copied)."""
    merged = json.loads(json.dumps(section or {}, default=str))
    for key, value in overrides.items():
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return merged


def _counted_configs(group: dict, method: str) -> tuple:
    """(model, adapter) sections as a run of `method` in `group` trains them: what its count depends on."""
    training = _dotted_merge(config["training"], {**group["training"], **group["per_method"].get(method, {})})
    # The base's shape (base_training builds it when there is one; base_run is a weights path, no shape)
    # and the run's head setting (trained heads count).
    shape = (config.get("base_training") or {}).get("model") or training.get("model") or {}
    model_cfg = {k: v for k, v in shape.items() if k not in ("base_run", "train_heads")}
    model_cfg["train_heads"] = bool((training.get("model") or {}).get("train_heads", False))
    return model_cfg, {**training.get("adapter", {}), "method": method}


def _budget_ranks(group: dict) -> dict:
    """Equal-budget mode of one group: {(method, targets_tag, part): rank}, cached in EXP/budget[_<group>].json
    by the inputs' hash (every job re-parses the Snakefile; counting builds the model on the meta device)."""
    budget = group["budget"]
    methods = [m for m in group["methods"] if m in ("lora", "lorta", "tlora")]
    counted = {method: _counted_configs(group, method) for method in methods}
    key_payload = json.dumps([counted, group], sort_keys=True, default=str)
    key = hashlib.sha256(key_payload.encode()).hexdigest()[:16]
    cache = Path(EXP) / (f"budget_{group['name']}.json" if group["name"] else "budget.json")
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return {tuple(k.split("|")): v["rank"] for k, v in cached["ranks"].items()}
    from pipeline.budget import rank_for_budget

    ranks, table = {}, {}
    for targets in group["targets"]:
        for part in group["part"]:
            for method in methods:
                model_cfg, adapter_cfg = counted[method]
                choice = rank_for_budget(model_cfg, {**adapter_cfg, "targets": list(targets), "part": part},
                                         budget["params"], rule=budget["rule"], max_rank=budget["max_rank"])
                ident = (method, _targets_tag(targets), part)
                ranks[ident] = choice.rank
                table["|".join(ident)] = {"rank": choice.rank, "trainable_params": choice.params}
    _write_if_changed(str(cache), json.dumps({"key": key, "budget": budget, "ranks": table}, indent=2) + "\n")
    return ranks


def _group_runs(group: dict, many_targets: bool, many_parts: bool) -> dict:
    """run name -> run of one group; names of a named group start with `<group>-`."""
    budget_ranks = _budget_ranks(group) if group.get("budget") else None
    runs = {}
    for method in group["methods"]:
        for targets in group["targets"]:
            for part in group["part"]:
                if method in ("full", "none"):
                    ranks = [0]
                elif budget_ranks is not None:
                    ranks = [budget_ranks[(method, _targets_tag(targets), part)]]
                else:
                    ranks = group["ranks"]
                for rank in ranks:
                    for seed in group["seeds"]:
                        name = method if method in ("full", "none") else f"{method}_r{rank}"
                        name += f"_s{seed}"
                        if many_targets and method not in ("full", "none"):
                            name += f"_{_targets_tag(targets)}"
                        if many_parts:
                            name += f"_{part}"
                        if group["name"]:
                            name = f"{group['name']}-{name}"
                        settings = {**group["training"], **group["per_method"].get(method, {})}
                        overrides = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
                        runs.setdefault(name, {"method": method, "rank": rank, "seed": seed,
                                               "targets": list(targets), "part": part, "group": group["name"],
                                               "label": group["label"], "overrides": overrides})
    return runs


def _build_runs() -> dict:
    """run name -> {method, rank, seed, targets, part, group, label, overrides}. The untuned base (`none`,
    nothing trains: model.train_heads=false) is always included; `none` in a group that trains the folding
    head (`model.train_heads: true`) is the head-only control."""
    groups = _grid_groups()
    many_targets = len({_targets_tag(t) for g in groups for t in g["targets"]}) > 1
    many_parts = len({p for g in groups for p in g["part"]}) > 1
    runs = {"none": {"method": "none", "rank": 0, "seed": 0, "targets": list(groups[0]["targets"][0]),
                     "part": groups[0]["part"][0], "group": "", "label": "",
                     "overrides": ["model.train_heads=false"]}}
    for group in groups:
        for name, run in _group_runs(group, many_targets, many_parts).items():
            if run["method"] == "none" and not group["name"]:
                continue  # the top-level `none` is the reference above
            if name in runs:
                raise WorkflowError(f"{_config_source()}: grid: run {name!r} is defined twice")
            runs[name] = run
    return runs


RUNS = _build_runs()
# Which group each run belongs to, for the report (written only when it changes, like the resolved config).
GROUPS_FILE = f"{EXP}/groups.json"
_write_if_changed(GROUPS_FILE, json.dumps({name: {"group": run["group"], "label": run["label"]}
                                           for name, run in RUNS.items()}, indent=2) + "\n")
EVAL_SPLITS = list(config["evaluate"]["splits"])
# Structure baselines (ideal helix) have no contacts: a language-model experiment has none.
BASELINE_NAMES = [BASELINES[b] for b in config["evaluate"]["baselines"]] if KIND == "fold" else []
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


def _files_digest(paths) -> str:
    """A digest of the named files' contents (a params value next to their being inputs: an edit that keeps an
    older modification time, e.g. `cp -p` of a saved copy, still reruns). A missing file digests as missing:
    Snakemake then reports it as a missing input."""
    digest = hashlib.sha256()
    for path in paths:
        file = Path(path)
        digest.update(f"{path}\0".encode())
        digest.update(file.read_bytes() if file.is_file() else b"\0missing")
    return digest.hexdigest()[:16]


def fetch_inputs(wildcards) -> dict:
    """The files `foldtune fetch` reads (data.ids_file, data.query): editing them reruns fetch."""
    data = config["data"]
    return {key: data[key] for key in ("ids_file", "query") if data[key]}


def fetch_digest(wildcards) -> str:
    return _files_digest(fetch_inputs(wildcards).values())


def prepare_inputs(wildcards) -> dict:
    """The fetch report and data.chains_file: editing the chains file reruns prepare."""
    inputs = {"fetched": FETCHED}
    if config["data"]["chains_file"]:
        inputs["chains_file"] = config["data"]["chains_file"]
    return inputs


def prepare_digest(wildcards) -> str:
    chains_file = config["data"]["chains_file"]
    return _files_digest([chains_file] if chains_file else [])


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
    if TRAINS_BASE or SHIPPED_BASE:
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
    overrides += run["overrides"]
    if TRAINS_BASE or SHIPPED_BASE:
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
    if evaluate["precision"] != "fp32":
        args += ["--precision", evaluate["precision"]]
    return shlex.join(args)


# evaluate.batch_runs: the runs each batched predict job folds (one batch per group; the reference joins the
# top-level group's, named `grid`).
BATCHES = {}
for _name, _run in RUNS.items():
    BATCHES.setdefault(_run["group"] or "grid", []).append(_name)


def batched_out_template(wildcards) -> str:
    """`foldtune predict --out` for many runs: {run} is filled in by foldtune with each run's name."""
    return f"{EXP}/predictions/{{run}}/{wildcards.split}"


def predict_digest(wildcards) -> str:
    keys = ("max_tokens", "num_recycles", "chunk_size")
    digest = {key: config["evaluate"][key] for key in keys}
    if config["evaluate"]["precision"] != "fp32":  # fp32 is left out: predictions made before the key existed stay valid
        digest["precision"] = config["evaluate"]["precision"]
    return json.dumps(digest, sort_keys=True)


def score_input(wildcards) -> str:
    return f"{EXP}/predictions/{wildcards.scored}/{wildcards.split}/predictions.csv"


def all_scores() -> list:
    """What the report reads: score tables of structures, or contact tables of language models."""
    table = "scores" if KIND == "fold" else "contacts"
    return [f"{EXP}/{table}/{name}/{split}.csv" for name in SCORED for split in EVAL_SPLITS]


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


def dataset_dir(wildcards, input) -> str:
    return str(Path(input.manifest).parent)


def run_dir(wildcards, input) -> str:
    return str(Path(input.run).parent)


# ------------------------------------------------------------------------------ model configs, checked first
def _check_model_configs() -> None:
    """Resolve every model job's config as its `foldtune train` will (section of RESOLVED_CONFIG + the job's
    overrides) before any job runs: a typo under `training:` / `base_training:` stops the dry run, naming the
    section and key, instead of failing after fetch, prepare, split and the base. Checked again only when
    the config or the grid changes (a model size check imports torch)."""
    from types import SimpleNamespace

    jobs = [("base_training", base_overrides(None))] if TRAINS_BASE else []
    jobs += [("training", train_overrides(SimpleNamespace(run=name))) for name in RUNS]
    key = hashlib.sha256(json.dumps([config, jobs], sort_keys=True, default=str).encode()).hexdigest()[:16]
    stamp = Path(EXP) / ".model_configs_checked"
    if stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == key:
        return
    from pipeline.config import ConfigError, load_config

    for section, overrides in jobs:
        try:
            load_config(RESOLVED_CONFIG, section=section, overrides=shlex.split(overrides))
        except ConfigError as exc:
            raise WorkflowError(f"{_config_source()}: {section}: {exc}") from None
    _write_if_changed(str(stamp), key + "\n")


_check_model_configs()
