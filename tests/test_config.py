"""Config: reference defaults, strict validation with one-line errors, overrides, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bissl.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    diff_configs,
    dump_config,
    load_config,
    parse_override,
)
from bissl.configs import CONFIG_DIR, packaged_configs, resolve_config

CONFIGS = CONFIG_DIR


def _error(raw=None, overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as info:
        if raw is not None:
            config_from_dict(raw)
        else:
            load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message and message.startswith("config error: ")
    return message


def test_defaults_are_the_reference_tables():
    """docs/method.md §4: the ImageNet-scale values (pretext, BiSSL stage, fine-tuning)."""
    c = Config()
    p, b, f = c.pretext, c.bissl, c.finetune
    assert (p.method, p.epochs, p.batch_size, p.lr, p.momentum, p.weight_decay, p.eta) == (
        "simclr",
        500,
        1024,
        4.8,
        0.9,
        1e-6,
        1e-3,
    )
    assert (p.warmup_epochs, p.final_lr_factor, p.temperature, p.projector_dims, p.byol_ema) == (
        10,
        1e-3,
        0.5,
        [256, 256, 256],
        0.9995,
    )
    assert (b.stages, b.lower_steps, b.upper_steps, b.head_warmup_epochs) == (500, 20, 8, 20)
    assert (b.lam, b.damping, b.gamma, b.cg_iters, b.solver, b.clip_norm) == (1e-3, 10.0, 1.0, 5, "cg", 10.0)
    assert (b.lower.lr, b.lower.weight_decay, b.lower.warmup_steps, b.lower.batch_size) == (1.0, 1e-6, 200, 1024)
    assert (b.upper.lr, b.upper.weight_decay, b.upper.momentum, b.upper.batch_size) == (0.015, 1e-3, 0.9, 256)
    assert (f.epochs, f.batch_size, f.momentum, f.head) == (400, 256, 0.9, "linear")
    assert c.model.backbone == "resnet50" and c.baseline.enabled and not c.baseline.compute_matched


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"bissl": {"lamda": 1}}, "config error: unknown key 'bissl.lamda' (did you mean 'lam'?)"),
        ({"bisl": {}}, "config error: unknown key 'bisl' (did you mean 'bissl'?)"),
        ({"bissl": {"lower": {"lrr": 1}}}, "config error: unknown key 'bissl.lower.lrr' (did you mean 'lr'?)"),
        ({"run": {"zzz": 1}}, "config error: unknown key 'run.zzz'"),
    ],
)
def test_unknown_keys_are_named_with_their_path(raw, expected):
    assert _error(raw) == expected


@pytest.mark.parametrize(
    "raw, key, fragment",
    [
        ({"bissl": {"lam": "abc"}}, "bissl.lam", "must be a number"),
        ({"bissl": {"lam": 0}}, "bissl.lam", "must be > 0"),
        ({"bissl": {"cg_iters": 2.5}}, "bissl.cg_iters", "must be an integer"),
        ({"bissl": {"cg_iters": True}}, "bissl.cg_iters", "must be an integer"),
        ({"bissl": {"solver": "gmres"}}, "bissl.solver", "must be one of 'cg', 'cg_layerwise'"),
        ({"bissl": {"lower": {"momentum": 1.0}}}, "bissl.lower.momentum", "must be in [0, 1)"),
        ({"pretext": {"projector_dims": [256, 0]}}, "pretext.projector_dims", "item 1 must be >= 1"),
        ({"pretext": {"method": "moco"}}, "pretext.method", "must be one of 'simclr', 'byol'"),
        ({"run": {"seeds": [0, 0]}}, "run.seeds", "must not repeat"),
        ({"run": {"seeds": []}}, "run.seeds", "must not be empty"),
        ({"run": {"device": "gpu"}}, "run.device", "must be 'auto'"),
        ({"baseline": {"enabled": "yes"}}, "baseline.enabled", "must be true or false"),
        ({"bissl": 3}, "bissl", "must be a mapping"),
        ({"bissl": {"lam": float("nan")}}, "bissl.lam", "must be finite"),
    ],
)
def test_bad_values_name_the_key(raw, key, fragment):
    message = _error(raw)
    assert f"'{key}" in message and fragment in message


def test_cross_field_checks():
    assert "val_fraction" in _error({"data": {"val_fraction": 0.5, "test_fraction": 0.5}})
    assert "cg_iters" in _error({"bissl": {"cg_iters": 0}})
    assert config_from_dict({"bissl": {"cg_iters": 0, "solver": "identity"}}).bissl.cg_iters == 0


def test_overrides_parse_yaml_values():
    cfg = load_config(
        None,
        [
            "bissl.lam=0.01",
            "pretext.weight_decay=1e-5",
            "run.seeds=[3, 4]",
            "baseline.compute_matched=true",
            "bissl.hvp_mode=fwdrev",
            "data.root=null",
            "model.options={width: 8}",
        ],
    )
    assert cfg.bissl.lam == 0.01 and cfg.pretext.weight_decay == 1e-5
    assert isinstance(cfg.pretext.weight_decay, float)  # YAML 1.1 would read '1e-5' as a string
    assert cfg.run.seeds == [3, 4] and cfg.baseline.compute_matched and cfg.bissl.hvp_mode == "fwdrev"
    assert cfg.data.root is None and cfg.model.options == {"width": 8}
    assert cfg.bissl.damping == 10.0  # untouched keys keep their defaults
    assert parse_override("a.b=") == (["a", "b"], "")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("bissl.lamda=1", "unknown key 'bissl.lamda' (did you mean 'lam'?)"),
        ("bissl", "must look like 'section.key=value'"),
        ("bissl..lam=1", "must be dotted names"),
        ("bissl.lam=[1", "cannot parse the value of override 'bissl.lam'"),
        ("bissl.lam.x=1", "'bissl.lam' must be a number"),
    ],
)
def test_bad_overrides(override, fragment):
    assert fragment in _error(overrides=[override])


def test_files_round_trip_and_json(tmp_path):
    cfg = load_config(None, ["bissl.lam=0.25", "run.seeds=[1, 2, 3]"])
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    (tmp_path / "c.json").write_text(json.dumps({"bissl": {"gamma": 0.01}}))
    assert load_config(tmp_path / "c.json").bissl.gamma == 0.01
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "must hold a mapping" in _error(path=tmp_path / "list.yaml")
    assert "cannot read" in _error(path=tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("bissl: {lam: [\n")
    assert "cannot parse" in _error(path=tmp_path / "bad.yaml")


def test_diff_configs_lists_dotted_keys():
    a = config_to_dict(Config())
    b = config_to_dict(load_config(None, ["bissl.lower.lr=2.0", "run.seeds=[5]"]))
    assert diff_configs(a, b) == ["bissl.lower.lr", "run.seeds"]


@pytest.mark.parametrize("name", packaged_configs())
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    # every key the file sets is applied (spot check: each section's keys)
    resolved = config_to_dict(cfg)
    for section, values in raw.items():
        if not isinstance(values, dict):  # a top-level key such as `task: text`
            assert resolved[section] == values, section
            continue
        for key, value in values.items():
            if not isinstance(value, dict):
                assert resolved[section][key] == value, f"{section}.{key}"


def test_reference_config_is_the_reference_at_scale():
    cfg = load_config(CONFIGS / "reference_imagenet_resnet50.yaml")
    assert cfg.model.backbone == "resnet50" and cfg.data.image_size == 96
    default = config_to_dict(Config())
    changed = diff_configs(
        {k: default[k] for k in ("pretext", "bissl")}, {k: config_to_dict(cfg)[k] for k in ("pretext", "bissl")}
    )
    assert changed == ["pretext.augment.preset"]  # 'byol' spelled out instead of 'auto'


def test_packaged_configs_resolve_by_name_and_paths_win(tmp_path, monkeypatch):
    assert {"demo_digits", "demo_text_genre", "reference_imagenet_resnet50"} <= set(packaged_configs())
    assert resolve_config("demo_digits") == CONFIG_DIR / "demo_digits.yaml"
    assert resolve_config("demo_digits.yaml") == CONFIG_DIR / "demo_digits.yaml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_digits.yaml").write_text("run: {seeds: [7]}\n")
    assert resolve_config("demo_digits.yaml") == Path("demo_digits.yaml")  # an existing file wins
    assert resolve_config("sub/demo_digits.yaml") == Path("sub/demo_digits.yaml")  # a path stays a path
    assert resolve_config("no_such_config") == Path("no_such_config")
    with pytest.raises(ConfigError, match="cannot read no_such_config"):
        load_config(resolve_config("no_such_config"))


def test_a_key_added_after_a_run_takes_its_default_when_resuming(tmp_path):
    """A run directory written before a key existed resumes; setting that key otherwise is a change."""
    import yaml

    from bissl.config import Config, config_to_dict, with_defaults
    from bissl.trainer import prepare_run_dir

    cfg = Config()
    run_dir = tmp_path / "run"
    prepare_run_dir(cfg, run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["text"]["probes"], saved["data"]["fold_by_seed"]  # as written by an older bissl
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert with_defaults(saved) == config_to_dict(cfg)
    assert prepare_run_dir(cfg, run_dir) is True
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    changed = load_config(None, ["text.probes=false"])
    with pytest.raises(ConfigError, match=r"text\.probes"):
        prepare_run_dir(changed, run_dir)
