"""Config schema: YAML diffs, overrides, and errors that name the key and the allowed values."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.config import Config, load_config, save_config
from trainer.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_then_yaml_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 0.001\nmodel:\n  vision:\n    depth: 3\n")
    cfg = load_config(str(preset), ["model.vision.depth=5", "model.text.lora_targets=[q, v]"])
    assert cfg.optim.lr == 0.001
    assert cfg.model.vision.depth == 5
    assert cfg.model.text.lora_targets == ["q", "v"]
    assert cfg.model.vision.num_heads == Config().model.vision.num_heads  # untouched default


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=0.1", "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
        ("modle.task=pretrain", "unknown config key 'modle' (did you mean 'model'?)"),
        ("model.task=finetune", "model.task='finetune': expected one of 'pretrain', 'classify'"),
        ("model.vision.depth=2.5", "model.vision.depth=2.5: expected an integer"),
        ("train.max_steps=0", "max_steps=0: expected >= 1"),
        ("optim.lr=-1", "lr=-1.0: expected > 0"),
        ("model.vision.mask_ratio=1.5", "mask_ratio"),
        ("data.label_mode=four", "expected one of 'three_class', 'binary'"),
        ("train.progress=maybe", "expected true or false"),
        ("optim", "expected key.sub=value"),
        ("model.text_tower=gpt", "model.text_tower='gpt': expected one of 'bert', 'llama'"),
        ("train.retrieval=true model.task=classify", "train.retrieval=true needs an ITC model"),
        ("model.attention_pool.enabled=true model.attention_pool.out_dim=64", "out_dim=64"),
    ],
)
def test_bad_keys_and_values_fail_with_the_path(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, override.split(" "))
    assert fragment in str(err.value)


def test_unknown_key_in_yaml_names_allowed_keys(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match="train.max_step.*did you mean 'max_steps'.*allowed keys"):
        load_config(str(preset))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=0.5", "model.vision.spatial_dims=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.5


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_preset_loads(preset):
    load_config(str(REPO / "configs" / preset))


def test_cli_reports_config_error_and_exits_2():
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "train.max_stepz=3"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "unknown config key 'train.max_stepz'" in proc.stderr


def test_exponent_floats_without_a_dot(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 3e-4\n")
    assert load_config(str(preset)).optim.lr == 3e-4
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_a_preset_can_start_from_a_base(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.5\n  warmup_steps: 7\ntrain:\n  seed: 3\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim:\n  lr: 0.25\n")
    cfg = load_config(str(tmp_path / "child.yaml"), ["train.seed=4"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.seed) == (0.25, 7, 4)
    (tmp_path / "base.yaml").write_text("base: ../" + tmp_path.name + "/child.yaml\n")
    with pytest.raises(ConfigError, match="base files form a cycle"):
        load_config(str(tmp_path / "child.yaml"))
    joint = load_config(str(REPO / "configs" / "ad_alifuse_classify.yaml"))
    assert joint.model.task == "classify" and joint.model.cross_attention == "between"


def test_yes_and_no_are_strings_and_mappings_are_typed(tmp_path):
    cfg = load_config(None, ["train.mixed_precision=no", "data.extra_splits.AIBL=/d/AIBL"])
    assert cfg.train.mixed_precision == "no" and cfg.data.extra_splits == {"AIBL": "/d/AIBL"}
    with pytest.raises(ConfigError, match="data.extra_splits=.*expected a mapping"):
        load_config(None, ["data.extra_splits=[a]"])
    with pytest.raises(ConfigError, match=r"train.eval_splits names \['AIBL'\]"):
        load_config(None, ["train.eval_splits=[val, AIBL]"])
