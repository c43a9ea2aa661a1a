import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import List

import pytest
from conftest import REPO, SHARED_DATA
from omegaconf import OmegaConf

from configs.schema import CONFIG_DIR, ConfigError, load_config

TRAIN = os.path.join(REPO, "launch", "train.py")


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
    from trainer.model.srec.llara_import import load_llara_sasrec

    items, splits, _ = load_source(OmegaConf.merge(cfg.data, {"path": os.path.join(REPO, cfg.data.path)}), cfg.seed)
    srec = load_llara_sasrec(os.path.join(REPO, cfg.srec.path))
    assert len(items) == srec.num_items == 4606 and len(splits["train"]) > 0
    train = cfg.train
    assert cfg.data.num_candidates == 20 and train.micro_batch * train.grad_accum * train.num_workers == 128


@pytest.mark.parametrize("preset, global_batch", [("llara_movielens.yaml", 128), ("llara_steam.yaml", 128),
                                                  ("llara_lastfm.yaml", 128), ("rella_ml1m.yaml", 64)])
def test_presets_keep_their_recipes_global_batch_on_any_worker_count(preset, global_batch):
    for workers in (1, 2, 4, 8):
        train = load_config(os.path.join(CONFIG_DIR, preset), [f"train.num_workers={workers}"]).train
        assert train.micro_batch * train.grad_accum * workers == global_batch, (preset, workers)


def test_an_impossible_global_batch_split_is_refused_naming_the_worker_counts_that_work():
    with pytest.raises(ConfigError, match=r"train.global_batch=128: global batch 128 cannot be split into micro_batch 4 x whole "
                                          r"accumulation steps x 3 workers; worker counts that work with "
                                          r"micro_batch 4: 1, 2, 4, 8, 16, 32"):
        load_config(None, ["train.global_batch=128", "train.micro_batch=4", "train.num_workers=3"])
    with pytest.raises(ConfigError, match=r"not a multiple of micro_batch 8"):
        load_config(None, ["train.global_batch=100", "train.num_workers=1"])
    with pytest.raises(ConfigError, match=r"train.grad_accum=5 but .* needs 4: give one of them"):
        load_config(None, ["train.global_batch=64", "train.grad_accum=5"])
    assert load_config(None, ["train.global_batch=64", "train.grad_accum=4"]).train.grad_accum == 4
    assert load_config(None, ["train.grad_accum=3"]).train.grad_accum == 3  # global_batch -1: as given


def test_an_elastic_range_must_split_the_global_batch_at_every_worker_count_in_it():
    # 4 x 3 x 4 = 48 per step: 1, 2, 3, 4 workers split it; 48 / (4 x 5) does not
    train = load_config(None, ["train.micro_batch=4", "train.global_batch=48", "train.num_workers=4",
                               "train.min_workers=1"]).train
    assert (train.min_workers, train.num_workers, train.grad_accum) == (1, 4, 3)
    with pytest.raises(ConfigError, match=r"train.min_workers=2: Ray may run 3 workers, but the global batch 64 "
                                          r"cannot be split .* worker counts that work with micro_batch 4: 1, 2, 4, 8, 16"):
        load_config(None, ["train.micro_batch=4", "train.global_batch=64", "train.num_workers=4", "train.min_workers=2"])
    with pytest.raises(ConfigError, match=r"train.min_workers=3 is above train.num_workers=2"):
        load_config(None, ["train.min_workers=3"])


# ---- the typed schema (configs/schema.py): types on merge, ranges and choices right after


def _schema_paths(cls, prefix=""):
    from configs.schema import schema_keys

    for name, (kind, _) in schema_keys(cls).items():
        if dataclasses.is_dataclass(kind):
            yield from _schema_paths(kind, f"{prefix}{name}.")
        else:
            yield prefix + name


def _yaml_paths(node, prefix=""):
    for name, value in node.items():
        if isinstance(value, dict) and value and prefix + name != "train.deepspeed":
            yield from _yaml_paths(value, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_every_default_key_has_a_schema_field_and_every_field_a_default():
    from configs.schema import DEFAULT, Config

    defaults = set(_yaml_paths(OmegaConf.to_container(OmegaConf.load(DEFAULT))))
    fields = set(_schema_paths(Config))
    assert defaults - fields == set(), "keys of llara_default.yaml without a schema field"
    assert fields - defaults == set(), "schema fields without a default in llara_default.yaml"


@pytest.mark.parametrize("preset", PRESETS)
def test_the_schema_loads_every_preset_and_keeps_its_dict_form(preset):
    """The typed config gives the dict the untyped merge gave (same values, same int/float types, same
    order): the stamps of runs prepared before the schema (trainer/data/prepare.py) still match."""
    from configs.schema import DEFAULT, Config, Train, to_dict

    path = os.path.join(CONFIG_DIR, preset)
    cfg = load_config(path)
    assert OmegaConf.get_type(cfg) is Config and OmegaConf.get_type(cfg.train) is Train
    untyped = OmegaConf.merge(OmegaConf.load(DEFAULT), OmegaConf.load(path))
    if untyped.train.global_batch > 0:  # the one value the typed load derives (derive_accumulation)
        untyped.train.grad_accum = untyped.train.global_batch // (untyped.train.micro_batch * untyped.train.num_workers)
    assert json.dumps(to_dict(cfg)) == json.dumps(OmegaConf.to_container(untyped, resolve=True))


def test_types_are_converted_on_merge():
    from configs.schema import to_dict

    cfg = load_config(None, ["data.ctr.threshold=4", "train.lr=1", "train.micro_batch=4", "data.path=null",
                             "model.unfreeze=[]", "train.use_gpu=false", "train.deepspeed.zero_optimization.overlap_comm=true"])
    plain = to_dict(cfg)
    assert plain["data"]["ctr"]["threshold"] == 4.0 and isinstance(plain["data"]["ctr"]["threshold"], float)
    assert isinstance(plain["train"]["lr"], float) and isinstance(plain["train"]["micro_batch"], int)
    assert plain["data"]["path"] is None and plain["model"]["unfreeze"] == [] and plain["train"]["use_gpu"] is False
    assert type(plain["train"]["deepspeed"]) is dict and plain["train"]["deepspeed"]["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "train.lr='abc': expected a float > 0"),
    ("train.lr=0", "train.lr=0.0: expected a float > 0"),
    ("train.lr=null", "train.lr=None: expected a float > 0"),
    ("train.micro_batch=0", "train.micro_batch=0: expected an integer >= 1"),
    ("train.micro_batch=2.5", "train.micro_batch=2.5: expected an integer >= 1"),
    ("train.num_workers=-1", "train.num_workers=-1: expected an integer >= 1"),
    ("train.max_steps=0", "train.max_steps=0: expected -1 or an integer >= 1"),
    ("train.warmup_ratio=1", "train.warmup_ratio=1.0: expected a float in [0, 1)"),
    ("train.keep_last=-1", "train.keep_last=-1: expected an integer >= 0"),
    ("train.use_gpu=maybe", "train.use_gpu='maybe': expected true or false"),
    ("train.zero_stage=5", "train.zero_stage=5: expected one of 0, 1, 2, 3"),
    ("train.mode=mixed", "train.mode='mixed': expected one of curriculum, hybrid, text"),
    ("train.deepspeed=5", "train.deepspeed=5: expected a mapping"),
    ("model.lora.dropout=1.5", "model.lora.dropout=1.5: expected a float in [0, 1)"),
    ("model.unfreeze=embed_tokens", "model.unfreeze='embed_tokens': expected a list of strings"),
    ("model.unfreeze=[[a]]", "model.unfreeze=[['a']]: expected a list of strings"),
    ("model.injection=triton", "model.injection='triton': expected one of fused, reference"),
    ("data.num_candidates=1", "data.num_candidates=1: expected an integer >= 2"),
    ("data.synthetic.p_follow=1.5", "data.synthetic.p_follow=1.5: expected a float in [0, 1]"),
    ("data.ctr.few_shot=0", "data.ctr.few_shot=0: expected -1 or an integer >= 1"),
    ("data.path=[a]", "data.path=['a']: expected a string or null"),
    ("data.source=foo", "data.source='foo': expected one of synthetic, ml-100k, ml-1m, lastfm, sequences, llara, generic"),
    ("data.retrieval.dtype=bf16", "data.retrieval.dtype='bf16': expected one of float32, bfloat16, float16"),
    ("eval.max_samples=0", "eval.max_samples=0: expected -1 or an integer >= 1"),
    ("eval.split=valid", "eval.split='valid': expected one of train, val, test"),
    ("srec.arch=bert", "srec.arch='bert': expected one of sasrec, gru4rec, caser, llara_sasrec"),
    ("ray.object_store_mb=0", "ray.object_store_mb=0: expected an integer >= 1"),
    ("seed=-1", "seed=-1: expected an integer >= 0"),
    ("train=5", "train=5: expected a section of keys"),
])
def test_a_bad_value_is_one_line_naming_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_a_bad_value_in_a_yaml_is_named(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  micro_batch: eight\n")
    with pytest.raises(ConfigError, match=r"^train.micro_batch='eight': expected an integer >= 1$"):
        load_config(str(p))


def test_a_malformed_yaml_or_override_is_one_line(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"x.yaml is not a mapping of config keys$"):
        load_config(str(p))
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lr=["])
    assert str(e.value).startswith("override 'train.lr=[' is not valid YAML: ") and "\n" not in str(e.value)


def test_the_choices_are_the_owners_constants():
    """One owner per list of choices: the schema reads the constants of the modules that act on them."""
    from shards.readers import SOURCES
    from configs.schema import schema_of
    from trainer.data.curriculum import MODES
    from trainer.model.srec import ARCHS

    assert schema_of("train.mode")[1].values() == MODES
    assert schema_of("srec.arch")[1].values() == tuple(ARCHS)
    assert schema_of("data.source")[1].values() == SOURCES
    assert schema_of("model.lora.target_modules[0]")[0] == List[str]


@pytest.mark.slow  # runs launch/train.py in a subprocess (pytest.ini), though it takes about a second
def test_launch_refuses_a_bad_type_with_exit_2_before_ray_or_the_output_folder(tmp_path):
    """The script as `python launch/train.py train.lr=abc output_dir=...` runs it (runpy, as __main__), with
    an exit hook that reports whether Ray was even imported."""
    out = tmp_path / "run"
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('ray imported:', 'ray' in sys.modules))\n"
            f"sys.argv = [{TRAIN!r}, 'train.lr=abc', {f'output_dir={out}'!r}]\n"
            f"runpy.run_path({TRAIN!r}, run_name='__main__')\n")
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and time.monotonic() - start < 30
    assert r.stderr.splitlines() == ["error: train.lr='abc': expected a float > 0"]
    assert r.stdout.strip() == "ray imported: False"
    assert not out.exists()
