"""train.deepspeed: DeepSpeed's own config merged over the trainer's, and what is refused up front."""

import pytest

from configs.schema import ConfigError, load_config
from trainer.job.ds_config import GRANULARITY_BROKEN_UP_TO, OWNED, _version, check_deepspeed_overrides, deepspeed_config


def test_deepspeed_keys_merge_over_the_trainers_config(tmp_path):
    cfg = load_config(None, ["train.deepspeed.zero_optimization.stage3_prefetch_bucket_size=5e7",
                             "train.deepspeed.zero_optimization.overlap_comm=true", "train.zero_stage=3"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 5e7, "overlap_comm": True}
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch  # the trainer's keys stay
    check_deepspeed_overrides(cfg)  # DeepSpeed's parser takes them
    # the same from a YAML, and the rest of the config stays strict
    p = tmp_path / "ds.yaml"
    p.write_text("train:\n  deepspeed:\n    wall_clock_breakdown: true\n    activation_checkpointing:\n"
                 "      partition_activations: true\n")
    ds = deepspeed_config(load_config(str(p)))
    assert ds["wall_clock_breakdown"] is True and ds["activation_checkpointing"] == {"partition_activations": True}
    with pytest.raises(ConfigError, match="train.deepspeedd"):
        load_config(None, ["train.deepspeedd.x=1"])


def test_an_empty_train_deepspeed_is_the_trainers_config():
    cfg = load_config(None, [])
    assert dict(cfg.train.deepspeed) == {}
    assert deepspeed_config(cfg)["zero_optimization"] == {"stage": cfg.train.zero_stage}
    check_deepspeed_overrides(cfg)


@pytest.mark.parametrize("override, message", [
    ("train.deepspeed.train_micro_batch_size_per_gpu=4", "train.deepspeed.train_micro_batch_size_per_gpu is set by the trainer \\(train.micro_batch\\)"),
    ("train.deepspeed.zero_optimization.stage=2", "train.deepspeed.zero_optimization.stage is set by the trainer \\(train.zero_stage\\)"),
    ("train.deepspeed.bf16.enabled=true", "bf16.enabled is set by the trainer \\(train.precision\\)"),
    ("train.deepspeed.optimizer.type=Adam", "train.deepspeed.optimizer is set by the trainer"),
    ("train.deepspeed.zero_optimization.offload_optimizer.pin_memory=true", "needs train.offload_optimizer=true"),
    # a misspelt top-level key, which DeepSpeed itself would ignore without a word
    ("train.deepspeed.zero_optimisation.overlap_comm=true", "train.deepspeed.zero_optimisation: not a key DeepSpeed"),
    ("train.deepspeed.gradient_clip=0.5", "train.deepspeed.gradient_clip: not a key DeepSpeed"),
    # what DeepSpeed's own parser refuses: an unknown key in its ZeRO section, a value of the wrong type
    ("train.deepspeed.zero_optimization.stage3_prefetch_bucket=1", "refused it: .*stage3_prefetch_bucket"),
    ("train.deepspeed.zero_optimization.reduce_bucket_size=big", "refused it: .*reduce_bucket_size"),
])
def test_refused_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        check_deepspeed_overrides(load_config(None, [override]))


def test_every_owned_key_is_one_the_trainer_sets():
    cfg = load_config(None, ["train.offload_optimizer=true", "train.offload_params=true"])
    built = deepspeed_config(cfg, "bf16")
    for path in OWNED:
        node, *rest = path.split(".")
        if node in ("train_batch_size", "optimizer", "scheduler"):  # left to DeepSpeed's derivation / the client's
            assert node not in built
            continue
        if node == "activation_checkpointing":  # refused, not built: DeepSpeed's section does not reach an HF model
            assert node not in built and "train.activation_checkpointing" in OWNED[node]
            continue
        value = built[node]
        for key in rest:
            value = value[key]
        assert value is not None, path


def test_module_granularity_threshold_is_refused_where_deepspeed_crashes_with_it():
    """DeepSpeed up to 0.19.8 (the newest tried) crashes in the first backward once the threshold makes a
    module a leaf (shown with a LoRA Llama on the CPU): refused up front there, passed on after it."""
    import deepspeed

    cfg = load_config(None, ["train.deepspeed.zero_optimization.stage3_module_granularity_threshold=5000"])
    if _version(deepspeed.__version__) <= GRANULARITY_BROKEN_UP_TO:
        with pytest.raises(ValueError, match="stage3_module_granularity_threshold: DeepSpeed .* fails in the first backward"):
            check_deepspeed_overrides(cfg)
    else:
        check_deepspeed_overrides(cfg)
    assert _version("0.19.8") == (0, 19, 8) and _version("0.20.0rc1+abc") == (0, 20, 0) and _version("1.0") == (1, 0)


def test_unread_keys_are_not_guessed_when_deepspeed_reads_a_plain_copy(monkeypatch):
    """The misspelt-key check records which keys DeepSpeed's parser looks up; a DeepSpeed that parsed a plain
    copy of the config would leave nothing recorded, and then no valid key may be refused for being unread."""
    import deepspeed.runtime.config as ds_runtime_config

    seen = []

    def parse_a_copy(config):
        plain = dict(config)
        seen.append(plain.get("train_micro_batch_size_per_gpu"))

    monkeypatch.setattr(ds_runtime_config, "DeepSpeedConfig", parse_a_copy)
    check_deepspeed_overrides(load_config(None, ["train.deepspeed.wall_clock_breakdown=true"]))
    assert seen == [8]  # the parser ran, on its copy
