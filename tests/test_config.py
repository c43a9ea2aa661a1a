import pytest

from trainer.config import ConfigError, load_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=0.5", "train.mode=hybrid"])
    assert cfg.train.lr == 0.5 and cfg.train.mode == "hybrid"
    assert cfg.train.zero_stage == 3 and cfg.train.num_workers == 2


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'"):
        load_config(None, ["train.lrr=0.1"])


def test_unknown_key_in_yaml_is_named(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("data:\n  histroy_len: 5\n")
    with pytest.raises(ConfigError, match=r"data.histroy_len.*x.yaml"):
        load_config(str(p))


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
