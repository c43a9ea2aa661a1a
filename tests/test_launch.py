"""launch/train.py before Ray starts: bad config keys, a locked or unwritable output folder."""

import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # every test runs launch/train.py or launch/eval.py in a subprocess

TRAIN = os.path.join(REPO, "launch", "train.py")


def test_unknown_key_exits_2_naming_it(tmp_path):
    r = subprocess.run([sys.executable, TRAIN, f"output_dir={tmp_path}", "train.lrr=1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "unknown config key 'train.lrr'" in r.stderr


def _cut_model_folder(folder):
    """A model folder whose model.safetensors was cut short (a copy that stopped halfway)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(64, 64)}, str(folder / "model.safetensors"))
    os.truncate(folder / "model.safetensors", 5000)
    return folder


@pytest.mark.parametrize("bad, message", [
    (["model.base=/nonexistent/folder"], "model.base=/nonexistent/folder: no such folder; give a Hugging Face model "
                                         "folder on disk"),
    (["model.base={cut}"], "{cut}/model.safetensors: cut short (5000 bytes; its tensors need"),
    (["data.source=llara"], "data.source=llara needs data.path (a folder with LLaRA's .df files and id2name.txt)"),
    (["data.source=ml-100k", "data.path={tmp}"], "data.path={tmp}: data.source=ml-100k needs u.data, u.item there"),
    (["srec.path=/nonexistent/lastfm.pt"], "srec.path=/nonexistent/lastfm.pt: no such file or folder"),
    (["model.attn_implementation=flash_attention_2", "train.use_gpu=true", "train.precision=fp32"],
     "model.attn_implementation=flash_attention_2 runs in bf16 or fp16 only"),
])
def test_a_start_that_cannot_succeed_ends_at_once_in_one_line(bad, message, tmp_path):
    """What every worker would meet after Ray started and the data were built (a traceback each, retried by
    Ray's FailureConfig before this project checked them) is said before anything starts: exit 2, one line."""
    cut = _cut_model_folder(tmp_path / "cut") if any("{cut}" in b for b in bad) else None
    fill = {"cut": cut, "tmp": tmp_path}
    args = [b.format(**fill) for b in bad]
    r = subprocess.run([sys.executable, TRAIN, f"output_dir={tmp_path / 'run'}", *args], capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: " + message.format(**fill)), r.stderr
    assert "Ray" not in r.stderr + r.stdout and not (tmp_path / "run" / "data").exists()


@pytest.mark.parametrize("bad, message", [
    ("train.mode=mixed", "train.mode='mixed': expected one of curriculum, hybrid, text"),
    ("model.injection=triton", "model.injection='triton': expected one of fused, reference"),
    ("train.zero_stage=4", "train.zero_stage=4: expected one of 0, 1, 2, 3"),
    ("data.retrieval.dtype=bf16", "data.retrieval.dtype='bf16': expected one of float32, bfloat16, float16"),
    ("srec.loss=bpr", "srec.loss='bpr': expected one of ce, bce"),
])
def test_a_bad_config_value_exits_2_before_the_output_folder_is_made(bad, message, tmp_path):
    """Refused by load_config (configs/schema.py): one line, nothing locked or written."""
    r = subprocess.run([sys.executable, TRAIN, f"output_dir={tmp_path / 'run'}", bad], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {message}", r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad, message", [
    (["srec.positions=all", "srec.arch=gru4rec"], "srec.positions=all needs a per-position output; gru4rec has none"),
    (["train.deepspeed.zero_optimisation.overlap_comm=true"], "train.deepspeed.zero_optimisation: not a key DeepSpeed"),
])
def test_a_bad_choice_exits_2_before_the_data_build(bad, message, tmp_path):
    """Each key is valid alone; the combination is refused by prepare() before any data is built."""
    r = subprocess.run([sys.executable, TRAIN, f"output_dir={tmp_path}", *bad], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and f"error: {message}" in r.stderr, r.stderr[-2000:]
    assert "(raised at " in r.stderr  # where: a ValueError from a bug is found from there
    assert not (tmp_path / "data").exists() and not (tmp_path / "assets").exists()


def test_a_second_run_on_the_same_output_folder_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c",
                               "import importlib.util, sys, time\n"
                               f"spec = importlib.util.spec_from_file_location('t', {TRAIN!r})\n"
                               "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
                               f"f = m.lock_output_dir({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run([sys.executable, TRAIN, f"output_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2
        assert f"another run is writing to {tmp_path}" in r.stderr and f"pid {holder.pid}" in r.stderr
    finally:
        holder.kill()
    time.sleep(0.5)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, TRAIN, f"output_dir={blocker / 'run'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is not writable" in r.stderr


def test_a_corrupt_shard_is_refused_before_any_worker_starts(small_run, tmp_path):
    import shutil

    from conftest import SMALL

    _, paths = small_run
    out = tmp_path / "run"
    shutil.copytree(paths.output_dir, out, ignore=shutil.ignore_patterns(".lock", "ray", "checkpoints", "logs"))
    shard = out / "data" / "train-00000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, TRAIN, f"output_dir={out}", *SMALL], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "train-00000.tar does not match its sha256" in r.stderr
    assert "starting a local Ray cluster" not in r.stderr + r.stdout


def test_a_gpu_run_without_gpus_is_refused_before_the_data_build(tmp_path):
    """train.use_gpu on a Ray cluster with no GPU: a clear error, not a job left pending for ever."""
    r = subprocess.run([sys.executable, TRAIN, f"output_dir={tmp_path}", "train.use_gpu=true", "train.num_workers=1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "train.use_gpu=true asks for 1 workers with a GPU each, the Ray cluster has 0 GPU(s)" in r.stderr
    assert not (tmp_path / "data").exists()  # refused before the shards were built


def test_eval_on_gpu_without_gpus_is_refused(small_run, tmp_path):
    _, paths = small_run
    r = subprocess.run([sys.executable, os.path.join(REPO, "launch", "eval.py"), "--run", paths.output_dir, "--zero-shot",
                        "--gpu", "--workers", "1", "--out", str(tmp_path / "eval")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "--gpu asks for 1 workers with a GPU each, the Ray cluster has 0 GPU(s)" in r.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()
