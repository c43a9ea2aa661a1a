"""Configs: an omegaconf YAML in configs/, overridden by `key=value` arguments on the command line.

The config is in struct mode: an override or a YAML key that the defaults do not have is an error
that names it, instead of being silently ignored. The one exception is train.deepspeed, DeepSpeed's own
config merged over the trainer's: its keys are DeepSpeed's, checked by trainer/ds_config.py.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT = os.path.join(CONFIG_DIR, "llara_default.yaml")


class ConfigError(ValueError):
    pass


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load the defaults, merge the YAML at `path` (if any) and then the `key=value` overrides."""
    cfg = OmegaConf.load(DEFAULT)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.train.deepspeed, False)  # DeepSpeed's own config: its keys are checked by trainer/ds_config.py
    layers = []
    if path and os.path.abspath(path) != DEFAULT:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        layers.append((path, OmegaConf.load(path)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except (ConfigKeyError, ConfigAttributeError) as e:
            key = getattr(e, "full_key", None) or str(e).splitlines()[0]
            raise ConfigError(f"unknown config key {key!r} (from {source}); see {DEFAULT} for the keys") from None
    return cfg


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
