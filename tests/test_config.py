import os

import pytest
from conftest import REPO, SHARED_DATA

from trainer.config import CONFIG_DIR, ConfigError, load_config


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


PRESETS = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def test_presets_are_there():
    assert {"llara_default.yaml", "llara_movielens.yaml", "llara_steam.yaml", "llara_lastfm.yaml", "rella_ml1m.yaml",
            "srec_sasrec_video.yaml"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_and_names_real_paths(preset):
    """Every preset merges over the defaults in struct mode (a misspelt key would be refused) and the
    data and SRec it names are where the shared data keep them."""
    cfg = load_config(os.path.join(CONFIG_DIR, preset))
    for path in (cfg.data.path, cfg.srec.path):
        if path is None:
            continue
        assert path.startswith("../shared/data/"), path
        if not os.path.isdir(SHARED_DATA):
            pytest.skip(f"{SHARED_DATA} is absent: cannot check that {path} exists")
        assert os.path.exists(os.path.join(REPO, path)), path


def test_llara_lastfm_preset_data_fit_its_srec():
    """The LastFM preset's data and LLaRA's SASRec agree on the catalogue (what training checks at start)."""
    cfg = load_config(os.path.join(CONFIG_DIR, "llara_lastfm.yaml"))
    if not os.path.exists(os.path.join(REPO, cfg.data.path)):
        pytest.skip(f"{cfg.data.path} is absent (LLaRA's released LastFM data, see ../shared/data/INDEX.md)")
    from shards.build import load_source
    from trainer.srec.llara_import import load_llara_sasrec

    items, splits, _ = load_source({**cfg.data, "path": os.path.join(REPO, cfg.data.path)}, cfg.seed)
    srec = load_llara_sasrec(os.path.join(REPO, cfg.srec.path))
    assert len(items) == srec.num_items == 4606 and len(splits["train"]) > 0
    assert cfg.data.num_candidates == 20 and cfg.train.micro_batch * cfg.train.grad_accum == 128
