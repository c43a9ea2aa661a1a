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
