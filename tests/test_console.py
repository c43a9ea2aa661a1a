"""trainer/job/console.py: the known noise is dropped, and nothing else."""

import warnings

import pytest

from trainer.job import console
from trainer.job.console import GRADIENT_CHECKPOINTING_MODULE as HF_MODULE
from trainer.job.console import PREEMPTION_WATCHER_ENV, quiet_known_noise

PEFT_MESSAGE = ("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
                "instead.")


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.delenv(PREEMPTION_WATCHER_ENV, raising=False)  # restored after the test
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        yield seen


def test_only_the_peft_warning_is_dropped(quiet):
    for message, category, module in [
        (PEFT_MESSAGE, FutureWarning, HF_MODULE),  # dropped
        ("`gradient_checkpointing_enable` is deprecated and will be removed in v6.", FutureWarning, HF_MODULE),
        (PEFT_MESSAGE, DeprecationWarning, HF_MODULE),
        (PEFT_MESSAGE, FutureWarning, "peft.peft_model"),
        (PEFT_MESSAGE, FutureWarning, HF_MODULE + "_v2"),
    ]:
        warnings.warn_explicit(message, category, "somewhere.py", 1, module=module)
    assert [(str(w.message)[:40], w.category) for w in quiet] == [
        ("`gradient_checkpointing_enable` is depre", FutureWarning),
        (PEFT_MESSAGE[:40], DeprecationWarning),
        (PEFT_MESSAGE[:40], FutureWarning),
        (PEFT_MESSAGE[:40], FutureWarning),
    ]


def _tiny_lora_llama():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def test_get_peft_model_warns_without_the_filter_and_not_with_it(monkeypatch):
    """The real call: if the first assertion fails, peft no longer reads the deprecated property and
    the filter in trainer/job/console.py can go."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _tiny_lora_llama()
    assert any(console.GRADIENT_CHECKPOINTING_WARNING in str(w.message) for w in seen), [str(w.message) for w in seen]

    monkeypatch.delenv(PREEMPTION_WATCHER_ENV, raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        _tiny_lora_llama()
    assert not any(console.GRADIENT_CHECKPOINTING_WARNING in str(w.message) for w in seen)


def test_the_preemption_watcher_is_off_unless_asked_for(monkeypatch):
    from ray.train.v2._internal import constants

    # the name Ray Train reads, and passes from the driver to its controller
    assert PREEMPTION_WATCHER_ENV == constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR
    assert PREEMPTION_WATCHER_ENV in constants.ENV_VARS_TO_PROPAGATE
    monkeypatch.delenv(PREEMPTION_WATCHER_ENV, raising=False)
    quiet_known_noise()
    assert constants.get_env_vars_to_propagate()[PREEMPTION_WATCHER_ENV] == "0"
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "1")  # a user who wants Ray's drain notices
    quiet_known_noise()
    assert constants.get_env_vars_to_propagate()[PREEMPTION_WATCHER_ENV] == "1"


# Two workers' lines that Ray's driver takes for one pattern (they differ only in words with digits),
# then a repeated line of Ray's own; what the driver prints of them, in a fresh process (Ray reads its
# setting when imported)
DEDUP_PROBE = r"""
import json, sys
if sys.argv[1] == "project":
    from trainer.job.console import keep_own_lines_whole
    keep_own_lines_whole()
from ray._private.ray_logging import stdout_deduplicator
def batch(pid, rank):
    return {"ip": "10.0.0.1", "pid": pid, "lines": [
        f"2026-12-07 17:00:50,91{rank} trainer: rank {rank} of 2 on Ray node 5e1f{rank}a (n{rank + 1})",
        f"(raylet) worker {pid} ran out of 4 leases"]}
printed = [line for pid, rank in ((101, 0), (202, 1)) for b in stdout_deduplicator.deduplicate(batch(pid, rank))
           for line in b["lines"]]
print(json.dumps(printed))
"""


@pytest.mark.parametrize("setting", ["ray", "project"])
def test_every_worker_s_own_lines_pass_ray_s_deduplication(setting, monkeypatch):
    import json
    import subprocess
    import sys

    monkeypatch.delenv("RAY_DEDUP_LOGS_ALLOW_REGEX", raising=False)
    monkeypatch.delenv("RAY_DEDUP_LOGS", raising=False)
    r = subprocess.run([sys.executable, "-c", DEDUP_PROBE, setting], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    ranks = [line for line in printed if " trainer: rank " in line]
    assert sum("ran out of" in line for line in printed) == 1  # Ray's own repeats are still folded
    if setting == "ray":  # Ray's default holds the second worker's line back (printed 5 s later, if ever)
        assert len(ranks) == 1 and "rank 0 of 2" in ranks[0]
    else:
        assert [line.split(" trainer: ")[1][:11] for line in ranks] == ["rank 0 of 2", "rank 1 of 2"]


def test_a_deduplication_setting_of_the_user_s_own_is_kept(monkeypatch):
    import os

    monkeypatch.setenv("RAY_DEDUP_LOGS_ALLOW_REGEX", "mine")
    console.keep_own_lines_whole()
    assert os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"] == "mine"
    monkeypatch.delenv("RAY_DEDUP_LOGS_ALLOW_REGEX")
    console.keep_own_lines_whole()
    assert os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"] == console.OWN_LINES
