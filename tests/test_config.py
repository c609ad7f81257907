"""Configuration: user configs and overrides, paths written with either separator, type and value
checks whose messages name the key and the file."""
from __future__ import annotations

import os

import pytest

from svlab import config
import xvector


# =========================================================================== config
def test_windows_separators_in_user_config(tmp_path):
    user = tmp_path / "win.yaml"
    user.write_text("data:\n  root: 'F:\\DataSet\\Aishell\\ALL'\n"
                    "  train_manifest: 'files\\split_train_set.txt'\n", encoding="utf-8")
    if os.name != "nt":  # a drive path cannot name anything here: refused with the key (issue 18, item 4)
        with pytest.raises(config.ConfigError, match=r"key 'data.root'.*Windows path.*/mnt/f/DataSet/Aishell/ALL"):
            config.load_config(user)
        user.write_text("data:\n  train_manifest: 'files\\split_train_set.txt'\n", encoding="utf-8")
    cfg = config.load_config(user)
    manifest = config.config_path_value(cfg, "data.train_manifest")
    assert manifest == config.PROJECT_ROOT / "files" / "split_train_set.txt"
    assert "\\" not in str(manifest)
    if os.name == "nt":
        assert cfg["data"]["root"] == "F:\\DataSet\\Aishell\\ALL"
        assert not str(config.config_path_value(cfg, "data.root")).startswith(str(config.PROJECT_ROOT))
    assert cfg["_config_path"] == str(user)


def test_relative_paths_resolve_against_project_root_not_cwd(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("test:\n  trials: files/trials.txt\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    cfg = config.load_config("mine.yaml")  # the --config file itself is relative to the cwd
    assert cfg["_config_path"] == str(tmp_path / "mine.yaml")
    trials = config.config_path_value(cfg, "test.trials")
    assert trials == config.PROJECT_ROOT / "files" / "trials.txt"
    assert trials.is_absolute()
    assert config.resolve_path("saved_model\\000") == config.PROJECT_ROOT / "saved_model" / "000"
    absolute = tmp_path / "elsewhere" / "x.txt"
    assert config.resolve_path(str(absolute)) == absolute


def test_empty_path_is_a_config_error():
    cfg = config.load_config(None, {"test.trials": ""})
    with pytest.raises(config.ConfigError, match="test.trials"):
        config.config_path_value(cfg, "test.trials")


def test_unknown_key_suggests_the_right_one(tmp_path):
    user = tmp_path / "typo.yaml"
    user.write_text("train:\n  epoch: 5\n", encoding="utf-8")
    with pytest.raises(config.ConfigError) as err:
        config.load_config(user)
    msg = str(err.value)
    assert "train.epoch" in msg and "did you mean 'train.epochs'" in msg and str(user) in msg
    with pytest.raises(config.ConfigError, match="did you mean 'loss.margin'"):
        config.load_config(None, {"loss.margn": 0.3})
    with pytest.raises(config.ConfigError, match="trainn"):
        config.load_config(None, {"trainn.lr": 0.1})


@pytest.mark.parametrize("key,value", [("train.epochs", "many"), ("train.epochs", True), ("train.epochs", 2.5),
                                       ("train.lr", "fast"), ("model.name", 3.0), ("features.n_mfcc", [20])])
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load_config(None, {key: value})


def test_section_given_as_value_and_value_as_section(tmp_path):
    user = tmp_path / "bad.yaml"
    user.write_text("train: 5\n", encoding="utf-8")
    with pytest.raises(config.ConfigError, match="train"):
        config.load_config(user)
    user.write_text("train:\n  lr:\n    value: 1\n", encoding="utf-8")
    with pytest.raises(config.ConfigError, match="train.lr"):
        config.load_config(user)


def test_value_checks_and_coercion():
    cfg = config.load_config(None, {"train.lr": 1, "train.epochs": 3})
    assert isinstance(cfg["train"]["lr"], float) and cfg["train"]["lr"] == 1.0
    assert cfg["train"]["epochs"] == 3
    with pytest.raises(config.ConfigError, match="loss.type"):
        config.load_config(None, {"loss.type": "arcface"})
    with pytest.raises(config.ConfigError, match="train.batchsize"):
        config.load_config(None, {"train.batchsize": 0})
    with pytest.raises(config.ConfigError, match="n_mfcc"):
        config.load_config(None, {"features.n_mfcc": 80, "features.n_mels": 40})
    assert config.load_config(None, {"train.epochs": None})["train"]["epochs"] == \
        config.load_config(None)["train"]["epochs"]  # None = flag not given


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n", encoding="utf-8")
    with pytest.raises(config.ConfigError, match="bad.yaml"):
        config.load_config(bad)
    with pytest.raises(config.ConfigError, match="not found"):
        config.load_config(tmp_path / "nope.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(config.ConfigError):
        config.load_config(top)


def test_user_config_with_bom_is_read(tmp_path):
    user = tmp_path / "bom.yaml"
    user.write_bytes("\ufefftrain:\r\n  epochs: 7\r\n".encode("utf-8"))
    assert config.load_config(user)["train"]["epochs"] == 7


def test_parse_override():
    assert config.parse_override("train.lr=0.002") == ("train.lr", 0.002)
    assert config.parse_override("train.epochs=12") == ("train.epochs", 12)
    assert config.parse_override(" loss.type = amsoftmax") == ("loss.type", "amsoftmax")
    assert config.parse_override("train.compile=true") == ("train.compile", True)
    assert config.parse_override("data.root=F:\\DataSet\\Aishell\\ALL") == ("data.root", "F:\\DataSet\\Aishell\\ALL")
    assert config.parse_override("a.b=x=y") == ("a.b", "x=y")
    assert config.parse_override("features.cache_dir=") == ("features.cache_dir", "")
    with pytest.raises(config.ConfigError, match="KEY=VALUE"):
        config.parse_override("train.lr")


def test_override_applies_through_load_config():
    cfg = config.load_config(None, dict([config.parse_override("train.lr=0.002"),
                                         config.parse_override("loss.type=amsoftmax")]))
    assert cfg["train"]["lr"] == 0.002 and cfg["loss"]["type"] == "amsoftmax"


def test_set_string_key_keeps_leading_zeros():
    cfg = config.load_config(None, dict([config.parse_override("train.n_folder=001")]))
    assert cfg["train"]["n_folder"] == "001"


def test_float_keys_accept_exponent_notation(tmp_path):
    user = tmp_path / "exp.yaml"
    user.write_text("train:\n  lr: 1e-3\n  weight_decay: 1e-5\n", encoding="utf-8")
    cfg = config.load_config(user)
    assert cfg["train"]["lr"] == 0.001 and cfg["train"]["weight_decay"] == 1e-5
    cfg = config.load_config(None, dict([config.parse_override("train.lr=2e-3")]))
    assert cfg["train"]["lr"] == 0.002


def test_config_context_constant_matches_the_model():
    if not hasattr(config, "XVECTOR_CONTEXT"):
        pytest.skip("config.XVECTOR_CONTEXT not defined in this version")
    assert config.XVECTOR_CONTEXT == xvector.CONTEXT == sum((k - 1) * d for k, d in xvector.FRAME_LAYERS)
