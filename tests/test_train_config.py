"""Training config: defaults, overrides, and errors that name the key before anything is built."""

from __future__ import annotations

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import DEFAULTS, ConfigError, load_config, parse_overrides


def _write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_sections_and_overrides(tmp_path):
    path = _write(tmp_path, {"base_training": {"adapter": {"method": "full"}},
                             "training": {"adapter": {"rank": 4}, "trainer": {"lr": 0.01}}})
    cfg = load_config(path, section="training",
                      overrides=["adapter.method=lora", "trainer.recycles=[0, 3]", "output_dir=runs/x",
                                 "model.size.trunk.num_blocks=1"])
    assert cfg["adapter"] == {**DEFAULTS["adapter"], "method": "lora", "rank": 4}
    assert cfg["trainer"]["lr"] == 0.01 and cfg["trainer"]["recycles"] == [0, 3]
    assert cfg["output_dir"] == "runs/x" and cfg["model"]["size"] == {"trunk": {"num_blocks": 1}}
    assert cfg["loss"] == DEFAULTS["loss"]
    assert parse_overrides(["a.b=null", "c=1e-3"]) == {"a": {"b": None}, "c": 1e-3}


@pytest.mark.parametrize("data, overrides, key", [
    ({"adapter": {"rnak": 8}}, [], "adapter.rnak: unknown key"),
    ({"trainer": {"lr": "fast"}}, [], "trainer.lr: expected a number"),
    ({"adapter": {"method": "dora"}}, [], "adapter.method: must be one of"),
    ({}, ["adapter.targets=[attn, ffn]"], "adapter.targets: must be one of"),
    ({}, ["trainer.recycles=[3, 1]"], "trainer.recycles"),
    ({}, ["trainer.max_steps=-1"], "trainer.max_steps: must be >= 0"),
    ({}, ["trainer.accumulate=true"], "trainer.accumulate: expected an integer"),
    ({}, ["model.size.trunk.num_blokcs=2"], "model.size.trunk.num_blokcs: unknown size key"),
    ({}, ["model.source=esm2_stem"], "model.esm2: source esm2_stem needs"),
    ({}, ["loss.fape=1"], "loss.fape: unknown key"),
    ({}, ["kind=lm"], "adapter.part: a language model has no trunk"),
    ({}, ["kind=lm", "adapter.part=stem", "adapter.targets=[attn, sm]"], "adapter.targets: sm is in ESMFold's trunk"),
    ({}, ["adapter.part=stem", "adapter.targets=[trimul]"], "adapter.targets: trimul is in ESMFold's trunk"),
    ({"model": 3}, [], "model: expected a mapping"),
    ({}, ["adapter.rank"], "adapter.rank: override must look like key=value"),
])
def test_invalid_configs_name_the_key(tmp_path, data, overrides, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        load_config(_write(tmp_path, data), overrides=overrides)


def test_config_targets_are_the_adapter_targets():
    from adapters.spec import TARGET_ROLES
    from pipeline.config import TARGETS

    assert set(TARGETS) == set(TARGET_ROLES)


def test_missing_section_and_file(tmp_path):
    with pytest.raises(ConfigError, match="training: section not found"):
        load_config(_write(tmp_path, {"other": {}}), section="training")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_error_before_training(tmp_path, capsys):
    path = _write(tmp_path, {"adapter": {"rank": 0}, "output_dir": str(tmp_path / "run")})
    assert main(["train", "--config", str(path)]) == 2
    assert "adapter.rank: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["train", "--config", str(path), "adapter.rank=2", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["adapter"]["rank"] == 2


@pytest.mark.parametrize("size", [{"trunk": {"max_recycles": 0, "num_blocks": 2}},
                                  {"trunk.max_recycles": 0, "trunk.num_blocks": 2}])
def test_a_dotted_override_into_model_size_merges(tmp_path, size):
    """`model.size.trunk.num_blocks=4` changes that key only: the file's other size keys stay."""
    path = _write(tmp_path, {"model": {"size": size}})
    cfg = load_config(path, overrides=["model.size.trunk.num_blocks=4",
                                       "model.size.trunk.structure_module.num_blocks=1"])
    assert cfg["model"]["size"] == {"trunk": {"max_recycles": 0, "num_blocks": 4,
                                              "structure_module": {"num_blocks": 1}}}
    # Without overrides, the file's spelling is kept as written (the recorded config and its digest do not move).
    assert load_config(path)["model"]["size"] == size
