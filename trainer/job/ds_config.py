"""The DeepSpeed config of a training run: built from train.*, with train.deepspeed merged over it.

train.deepspeed is DeepSpeed's own JSON config, as a nested mapping (on the command line
`train.deepspeed.zero_optimization.stage3_prefetch_bucket_size=5e7`, or a `deepspeed:` block under
`train:` in a YAML): the tuning knobs of ZeRO-3 at scale (bucket sizes, prefetching, the persistence
threshold, overlap_comm), activation checkpointing, monitors. It is merged key by
key over what the trainer builds. The keys the trainer builds itself from train.* are refused there,
so that each setting has one place (the data reader, the logs and the checkpoints read train.*):
see OWNED.

check_deepspeed_overrides() runs in launch/train.py before anything is built: it refuses owned keys,
top-level keys that DeepSpeed does not read (a typo would otherwise be ignored silently), and what
DeepSpeed's own config parser refuses (it validates its sections, zero_optimization included, and
refuses unknown keys in them).
"""

from __future__ import annotations

import copy
import re
from omegaconf import DictConfig, OmegaConf

# dotted key in DeepSpeed's config -> where the trainer takes it from
OWNED = {
    "train_batch_size": "train.micro_batch x train.grad_accum x train.num_workers",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "torch's AdamW with train.lr and train.weight_decay",
    "scheduler": "warmup + cosine with train.warmup_ratio",
    "zero_force_ds_cpu_optimizer": "always false: the trainer passes torch's AdamW, also when offloading",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer.device": "train.offload_optimizer",
    "zero_optimization.offload_param.device": "train.offload_params",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "activation_checkpointing": "train.activation_checkpointing (DeepSpeed's section does not reach a Hugging Face model)",
}


# stage3_module_granularity_threshold crashed DeepSpeed's backward with the newest DeepSpeed tried here
GRANULARITY_BROKEN_UP_TO = (0, 19, 8)


def _version(text: str) -> tuple:
    """'0.19.8' -> (0, 19, 8); a part's leading digits only ('0rc1' -> 0)."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = re.match(r"\d*", piece).group()
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def base_config(t, precision: str) -> dict:
    """What the trainer sets, from the train section `t`."""
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {
            "stage": t.zero_stage,
            **({"offload_optimizer": {"device": "cpu"}} if t.offload_optimizer else {}),
            **({"offload_param": {"device": "cpu"}} if t.offload_params and t.zero_stage == 3 else {}),
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},  # with DeepSpeed's dynamic loss scaling
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def _overrides(t) -> dict:
    extra = t.get("deepspeed") or {}
    return OmegaConf.to_container(extra, resolve=True) if isinstance(extra, DictConfig) else copy.deepcopy(dict(extra))


def merge(base: dict, extra: dict) -> dict:
    """`extra` merged over `base` key by key (nested mappings merged, anything else replaced); a new dict."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(cfg, precision: str = "fp32") -> dict:
    """The config handed to deepspeed.initialize: base_config() with train.deepspeed merged over it."""
    return merge(base_config(cfg.train, precision), _overrides(cfg.train))


def _leaves(d: dict, prefix: str = ""):
    for key, value in d.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")


class _ReadKeys(dict):
    """A dict that records which keys were looked up (DeepSpeed's parser reads its config with get / in / [])."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def check_deepspeed_overrides(cfg) -> None:
    """Refuse (ValueError) a train.deepspeed that the trainer or DeepSpeed would misread; nothing to do when
    it is empty. DeepSpeed's parser runs here as for one process on the CPU (fp32), so a check that
    depends on the GPU or the number of workers is still DeepSpeed's, on the workers."""
    extra = _overrides(cfg.train)
    if not extra:
        return
    for path in _leaves(extra):
        if path in OWNED:
            raise ValueError(f"train.deepspeed.{path} is set by the trainer ({OWNED[path]})")
    zero = extra.get("zero_optimization") if isinstance(extra.get("zero_optimization"), dict) else {}
    if "offload_optimizer" in zero and not cfg.train.offload_optimizer:
        raise ValueError("train.deepspeed.zero_optimization.offload_optimizer needs train.offload_optimizer=true")
    if "offload_param" in zero and not (cfg.train.offload_params and cfg.train.zero_stage == 3):
        raise ValueError("train.deepspeed.zero_optimization.offload_param needs train.offload_params=true "
                         "and train.zero_stage=3")

    from deepspeed import __version__ as ds_version  # lazy: reads DS_ACCELERATOR on import
    from deepspeed.runtime.config import DeepSpeedConfig  # lazy: reads DS_ACCELERATOR on import

    if zero.get("stage3_module_granularity_threshold") and _version(ds_version) <= GRANULARITY_BROKEN_UP_TO:
        raise ValueError(
            f"train.deepspeed.zero_optimization.stage3_module_granularity_threshold: DeepSpeed {ds_version} fails "
            "in the first backward once it makes a module a leaf (seen here on the CPU with this trainer's LoRA Llama: "
            "\"output with shape [1] doesn't match the broadcast shape [128, 8]\"; without LoRA: \"unknown parameter "
            "type\"), and below the smallest module's size it does nothing; refused up to DeepSpeed "
            f"{'.'.join(map(str, GRANULARITY_BROKEN_UP_TO))}")

    config = _ReadKeys(merge(base_config(cfg.train, "fp32"), extra))
    try:
        DeepSpeedConfig(config)
    except Exception as e:  # pydantic's ValidationError, AssertionError, ValueError...: DeepSpeed's words
        detail = " ".join(str(e).split())
        raise ValueError(f"train.deepspeed: DeepSpeed {ds_version} refused it: {detail[:600]}") from None
    # nothing recorded at all (the trainer's own keys are always read) means DeepSpeed read a plain copy of
    # the config, not this dict: then which keys it read is unknown, and none is refused for it
    unread = sorted(set(extra) - config.read) if config.read else []
    if unread:
        raise ValueError(f"train.deepspeed.{unread[0]}: not a key DeepSpeed {ds_version} reads (misspelt?); "
                         "see https://www.deepspeed.ai/docs/config-json/")
