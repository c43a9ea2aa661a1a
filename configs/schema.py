"""Configs: an omegaconf YAML in configs/, overridden by `key=value` arguments on the command line.

Every key's default (and its comment) is in configs/llara_default.yaml, and only there. Its type and
the values it allows are declared below, one dataclass per section, with no defaults of their own
(MISSING: the defaults YAML fills them). load_config merges, in order, the defaults YAML, a YAML
given with --config and the overrides into that schema (omegaconf's structured configs), then checks
every value. Any failure is a ConfigError of one line that names the key:

    unknown config key 'train.lrr' (from command line); see .../llara_default.yaml for the keys
    train.lr='abc': expected a float > 0
    train.micro_batch=0: expected an integer >= 1
    data.source='foo': expected one of synthetic, ml-100k, ml-1m, lastfm, sequences, llara, generic

The allowed choices are read from the modules that act on them (e.g. trainer.data.curriculum.MODES),
imported only when checked. Checks that need more than one key stay where those keys are used
(e.g. trainer/model/srec/pretrain.py check_pretrain_args, trainer.job.precision's refusal of bf16 on CPU).
The one open section is train.deepspeed, DeepSpeed's own config merged over the trainer's: its keys
are DeepSpeed's, checked by trainer/job/ds_config.py.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, get_type_hints

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(CONFIG_DIR, "llara_default.yaml")


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------- what a key allows

def _num(x) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Range:
    """low <= value (low < value if low_open) and likewise for high; -1 too with minus_one ("all")."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    minus_one: bool = False

    def allows(self, value) -> bool:
        if self.minus_one and value == -1:
            return True
        if isinstance(value, float) and math.isnan(value):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def describe(self, kind: str) -> str:
        if self.high is None:
            text = f"{kind} {'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            text = (f"{kind} in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                    f"{')' if self.high_open else ']'}")
        return f"-1 or {text}" if self.minus_one else text


@dataclass(frozen=True)
class OneOf:
    """One of the values in `owner`: a tuple, or the dotted name of the constant (tuple or dict) in
    the module that acts on them, imported when first checked."""
    owner: tuple | str

    def values(self) -> tuple:
        if isinstance(self.owner, tuple):
            return self.owner
        module, _, name = self.owner.rpartition(".")
        return tuple(getattr(importlib.import_module(module), name))

    def allows(self, value) -> bool:
        return value in self.values()

    def describe(self, kind: str) -> str:
        return "one of " + ", ".join(str(v) for v in self.values())


def key(rule: Range | OneOf | None = None):
    """A config key: its default is in llara_default.yaml (MISSING here); `rule` what it allows beyond its type."""
    return field(default=MISSING, metadata={"rule": rule} if rule else {})


def at_least(low: int):
    return key(Range(low))


def above(low: float):
    return key(Range(low, low_open=True))


def fraction():  # 0 <= value < 1 (dropouts, warm-up share)
    return key(Range(0, 1, high_open=True))


def probability():
    return key(Range(0, 1))


def all_or_count():  # -1 (all, every) or a positive count
    return key(Range(1, minus_one=True))


def choice(owner: tuple | str):
    return key(OneOf(owner))


def section(cls):
    return field(default_factory=cls)


# ---------------------------------------------------------------------------- the schema: one class a section

@dataclass
class Synthetic:
    num_users: int = at_least(1)
    num_items: int = at_least(1)
    num_clusters: int = at_least(2)  # each user draws 2 favourite clusters
    min_seq_len: int = at_least(1)
    max_seq_len: int = at_least(1)
    p_follow: float = probability()
    zipf_a: float = at_least(0)
    pattern: str = choice("shards.synthetic.PATTERNS")
    titles: str = choice("shards.synthetic.TITLE_KINDS")


@dataclass
class Ctr:
    threshold: float = key()
    retrieval: str = choice("shards.ctr.CTR_RETRIEVALS")
    reit: bool = key()
    few_shot: int = all_or_count()
    profile: bool = key()


@dataclass
class Retrieval:
    hybrid: bool = key()
    pool_len: int = at_least(1)
    order: str = choice("shards.retrieval.ORDERS")
    template: str = choice("shards.retrieval.TEMPLATES")
    pooling: str = choice("shards.retrieval.POOLINGS")
    pca_dim: int = at_least(1)
    batch_size: int = at_least(1)
    dtype: str = choice("shards.retrieval.EMBED_DTYPES")


@dataclass
class Data:
    source: str = choice("shards.readers.SOURCES")
    path: Optional[str] = key()
    items_path: Optional[str] = key()
    split: str = choice("shards.samples.SPLIT_SCHEMES")
    kcore: int = at_least(0)
    build_workers: int = at_least(0)
    verify_shards: bool = key()
    loader_workers: int = at_least(0)
    length_grouping: int = at_least(0)  # 0 = off; N: windows of N global batches (trainer/data/loader.py)
    synthetic: Synthetic = section(Synthetic)
    history_len: int = at_least(1)
    domain: str = choice("shards.prompts.DOMAINS")
    num_candidates: int = at_least(2)  # the target and at least one negative
    user_token: bool = key()
    max_len: int = at_least(1)
    task: str = choice("shards.ctr.TASKS")
    ctr: Ctr = section(Ctr)
    retrieval: Retrieval = section(Retrieval)
    samples_per_shard: int = at_least(1)


@dataclass
class Tiny:
    vocab_size: int = at_least(1)
    hidden_size: int = at_least(1)
    num_layers: int = at_least(1)
    num_heads: int = at_least(1)
    intermediate_size: int = at_least(1)
    max_position_embeddings: int = at_least(1)


@dataclass
class Lora:
    r: int = at_least(1)
    alpha: int = at_least(1)
    dropout: float = fraction()
    target_modules: List[str] = key()


@dataclass
class Model:
    base: Optional[str] = key()
    init_from: Optional[str] = key()  # a finished run's output_dir: a second stage starts from it
    tiny: Tiny = section(Tiny)
    lora: Lora = section(Lora)
    unfreeze: List[str] = key()
    injection: str = choice("trainer.model.hybrid_embedding.INJECTIONS")
    attn_implementation: str = choice("trainer.model.build.ATTENTIONS")


@dataclass
class SRec:
    path: Optional[str] = key()
    arch: str = choice("trainer.model.srec.ARCHS")
    hidden: int = at_least(1)
    blocks: int = at_least(1)
    heads: int = at_least(1)
    layers: int = at_least(1)
    dropout: float = fraction()
    ffn_inner: int = at_least(0)  # sasrec: 0 = hidden
    activation: str = choice("trainer.model.srec.sasrec.ACTIVATIONS")
    norm: str = choice("trainer.model.srec.sasrec.NORMS")
    attn_dropout: float = key(Range(0, 1, high_open=True, minus_one=True))  # -1: srec.dropout
    stop_metric: str = choice("trainer.model.srec.pretrain.STOP_METRICS")
    eval_mask_history: bool = key()  # full ranking leaves the user's history out (RecBole, ICLRec)
    loss: str = choice("trainer.model.srec.pretrain.LOSSES")
    negatives: int = at_least(1)
    positions: str = choice("trainer.model.srec.pretrain.POSITIONS")
    epochs: int = at_least(1)
    patience: int = at_least(1)
    lr: float = above(0)
    weight_decay: float = at_least(0)
    adam_beta2: float = fraction()
    init: str = choice("trainer.model.srec.pretrain.INITS")
    init_std: float = above(0)  # init=normal
    batch_size: int = at_least(1)
    val_users: int = all_or_count()  # -1: every validation user


@dataclass
class Sdpo:
    negatives: int = at_least(1)  # k negatives per prompt, drawn from its candidates
    beta: float = above(0)
    shared_prompt: bool = True


@dataclass
class Train:
    objective: str = choice("trainer.objectives.sdpo.OBJECTIVES")
    mode: str = choice("trainer.data.curriculum.MODES")
    num_workers: int = at_least(1)
    min_workers: int = at_least(0)  # > 0: Ray Train's elastic range (min_workers, num_workers); 0: fixed
    cpus_per_worker: int = at_least(1)
    use_gpu: bool = key()
    precision: str = choice("trainer.job.precision.PRECISIONS")
    zero_stage: int = choice((0, 1, 2, 3))  # DeepSpeed's ZeRO stages
    offload_optimizer: bool = key()
    offload_params: bool = key()
    activation_checkpointing: bool = key()
    peak_tflops: float = at_least(0)  # 0: a known GPU's peak (trainer/job/flops.py), none on CPU
    max_failures: int = key(Range(0, minus_one=True))  # -1: restarts after a lost worker without limit
    micro_batch: int = at_least(1)
    grad_accum: int = at_least(1)
    global_batch: int = all_or_count()  # > 0: grad_accum is derived from it (derive_accumulation)
    epochs: int = at_least(1)
    max_steps: int = all_or_count()
    lr: float = above(0)
    warmup_ratio: float = fraction()
    weight_decay: float = at_least(0)
    grad_clip: float = at_least(0)
    checkpoint_every: int = at_least(1)
    keep_last: int = at_least(0)
    log_every: int = at_least(1)
    sample_log: bool = key()  # logs/samples/rank<r>.jsonl: the keys of the samples each step trained on
    sdpo: Sdpo = section(Sdpo)
    deepspeed: Dict[str, Any] = key()  # open: DeepSpeed's own keys, checked by trainer/job/ds_config.py


@dataclass
class Eval:
    split: str = choice("shards.samples.SPLITS")
    max_samples: int = all_or_count()
    batch_size: int = at_least(1)
    max_new_tokens: int = at_least(1)
    candidates_per_pass: int = at_least(1)
    compare: bool = key()


@dataclass
class Ray:
    address: Optional[str] = key()
    object_store_mb: int = at_least(1)
    auth: str = choice(("token", "disabled"))  # Ray's token authentication (trainer/job/ray_cluster.py)


@dataclass
class Config:
    seed: int = at_least(0)  # numpy's generators take no negative seed
    output_dir: str = key()
    data: Data = section(Data)
    model: Model = section(Model)
    srec: SRec = section(SRec)
    train: Train = section(Train)
    eval: Eval = section(Eval)
    ray: Ray = section(Ray)


# ---------------------------------------------------------------------------- reading the schema

@functools.cache
def schema_keys(cls=Config) -> dict:
    """{name: (type, rule or None)} of a section's keys."""
    hints = get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("rule")) for f in dataclasses.fields(cls)}


def _is_section(kind) -> bool:
    return dataclasses.is_dataclass(kind)


_KINDS = {int: "an integer", float: "a float", bool: "true or false", str: "a string",
          Optional[str]: "a string or null", List[str]: "a list of strings", Dict[str, Any]: "a mapping"}


def allowed(kind, rule) -> str:
    """'a float > 0', 'an integer >= 1', 'one of ...': what a key of this type and rule takes."""
    words = "a section of keys" if _is_section(kind) else _KINDS[kind]
    return rule.describe(words) if rule else words


def schema_of(dotted: str):
    """(type, rule) of a dotted key ('train.lr', 'model.unfreeze[0]'); a key inside train.deepspeed
    or a list gives the open section's or the list's."""
    kind, rule = Config, None
    for name in re.sub(r"\[\d+\]", "", dotted).split("."):
        if not _is_section(kind) or name not in schema_keys(kind):
            break
        kind, rule = schema_keys(kind)[name]
    return kind, rule


def _plain(value):
    return OmegaConf.to_container(value, resolve=False) if isinstance(value, (DictConfig, ListConfig)) else value


def _refuse(dotted: str, value, kind, rule) -> ConfigError:
    return ConfigError(f"{dotted}={_plain(value)!r}: expected {allowed(kind, rule)}")


_SHAPES = {List[str]: list, Dict[str, Any]: dict}


def _check_shapes(layer: dict, cls=Config, prefix: str = "") -> None:
    """A section, list or mapping given something else (`train: 5`, `model.unfreeze={a: 1}`): omegaconf's
    merge would fail without naming the key (or with a bare TypeError)."""
    for name, value in layer.items():
        kind, rule = schema_keys(cls).get(name, (None, None))
        shape = dict if _is_section(kind) else _SHAPES.get(kind)
        if shape is not None and not isinstance(value, shape):
            raise _refuse(prefix + name, value, kind, rule)
        if _is_section(kind):
            _check_shapes(value, kind, f"{prefix}{name}.")


def check_values(node: DictConfig, cls=Config, prefix: str = "") -> None:
    """Every key's value against its rule (types were checked on merge); the first that fails is a ConfigError."""
    for name, (kind, rule) in schema_keys(cls).items():
        dotted = prefix + name
        if OmegaConf.is_missing(node, name):
            raise ConfigError(f"{dotted} has no value: give it a default in {DEFAULT}")
        try:
            value = node[name]
        except OmegaConfBaseException as e:  # an interpolation that does not resolve to the key's type
            raise ConfigError(f"{dotted}: {str(e).splitlines()[0]}") from None
        if _is_section(kind):
            check_values(value, kind, dotted + ".")
        elif kind == List[str] and not all(isinstance(x, str) for x in value):  # omegaconf lets [[a]] through
            raise _refuse(dotted, value, kind, rule)
        elif rule is not None and value is not None and not rule.allows(value):
            raise _refuse(dotted, value, kind, rule)


# ---------------------------------------------------------------------------- loading

def _merge(cfg: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    _check_shapes(OmegaConf.to_container(layer, resolve=False))
    try:
        return OmegaConf.merge(cfg, layer)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or str(e).splitlines()[0]
        raise ConfigError(f"unknown config key {key!r} (from {source}); see {DEFAULT} for the keys") from None
    except OmegaConfBaseException as e:  # a value omegaconf cannot convert to the key's type
        dotted = getattr(e, "full_key", None)
        if not dotted:
            raise ConfigError(f"{str(e).splitlines()[0]} (from {source})") from None
        raise _refuse(dotted, getattr(e, "value", None), *schema_of(dotted)) from None


def _parse(what: str, read) -> DictConfig:
    """read(): a YAML file or overrides parsed, which must be a mapping of keys; else a ConfigError naming `what`."""
    try:
        layer = read()
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{what} is not a mapping of config keys")
    return layer


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The defaults, then the YAML at `path` (if any), then the `key=value` overrides, merged into the
    schema and checked (ConfigError)."""
    layers = [(DEFAULT, OmegaConf.load(DEFAULT))]
    if path and os.path.abspath(path) != DEFAULT:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        layers.append((path, _parse(path, lambda: OmegaConf.load(path))))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _parse(f"override {item!r}", lambda: OmegaConf.from_dotlist([item]))
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    cfg = OmegaConf.structured(Config)
    for source, layer in layers:
        cfg = _merge(cfg, layer, source)
    check_values(cfg)
    derive_accumulation(cfg.train)
    return cfg


def accumulation_for(global_batch: int, micro_batch: int, workers: int) -> int:
    """The accumulation steps that split global_batch into micro_batch x accumulation x workers, or a
    ValueError naming the worker counts that work."""
    per_micro_step = micro_batch * workers
    if global_batch % per_micro_step:
        per_worker = global_batch // micro_batch if global_batch % micro_batch == 0 else 0
        works = [w for w in range(1, per_worker + 1) if per_worker % w == 0]
        hint = (f"worker counts that work with micro_batch {micro_batch}: {', '.join(map(str, works))}" if works
                else f"it is not a multiple of micro_batch {micro_batch}")
        raise ValueError(f"global batch {global_batch} cannot be split into micro_batch {micro_batch} x whole "
                         f"accumulation steps x {workers} workers; {hint}")
    return global_batch // per_micro_step


def derive_accumulation(train: DictConfig) -> None:
    """train.global_batch > 0 fixes micro_batch x grad_accum x num_workers: grad_accum is set to the
    quotient (so a preset keeps its recipe's global batch on any GPU count). A split that is not whole,
    or a grad_accum given besides that disagrees, is a ConfigError naming the worker counts that work;
    so is an elastic range (train.min_workers) with a worker count in it that cannot split the batch."""
    if train.min_workers > train.num_workers:
        raise ConfigError(f"train.min_workers={train.min_workers} is above train.num_workers={train.num_workers}")
    if train.global_batch > 0:
        try:
            derived = accumulation_for(train.global_batch, train.micro_batch, train.num_workers)
        except ValueError as e:
            raise ConfigError(f"train.global_batch={train.global_batch}: {e}") from None
        if train.grad_accum not in (1, derived):
            raise ConfigError(f"train.grad_accum={train.grad_accum} but train.global_batch={train.global_batch} with "
                              f"micro_batch {train.micro_batch} and {train.num_workers} workers needs {derived}: "
                              "give one of them")
        train.grad_accum = derived
    for workers in range(train.min_workers or train.num_workers, train.num_workers):
        try:
            accumulation_for(train.micro_batch * train.grad_accum * train.num_workers, train.micro_batch, workers)
        except ValueError as e:
            raise ConfigError(f"train.min_workers={train.min_workers}: Ray may run {workers} workers, but the {e}") from None


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
