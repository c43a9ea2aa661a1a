"""ray.auth (trainer/job/ray_cluster.py): where the token comes from, what is made when there is none, and
what is refused. The real clusters with authentication on are in test_ray_job.py (`ray job submit`)
and test_slurm_multinode.py (the multi-node sbatch script)."""

import os
import stat
import subprocess
import sys

import pytest

from conftest import REPO
from trainer.job import ray_cluster


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """A HOME of the test's own and no token in the environment; Ray's cached auth mode restored after."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    monkeypatch.undo()
    from ray._raylet import Config

    Config.initialize("")


def test_a_local_cluster_without_a_token_makes_one_only_its_user_can_read(clean_env):
    path = ray_cluster.token_source(starting=True)
    assert path == str(clean_env / "home" / ".ray" / "auth_token")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(open(path).read()) == 64
    first = open(path).read()
    assert ray_cluster.token_source(starting=True) == path and open(path).read() == first  # kept, not remade


def test_two_local_clusters_starting_at_once_share_one_token(clean_env, monkeypatch):
    """Another process makes the token between this one's check and its write (two launches at once,
    as pytest -n 2 runs them): this one keeps the other's token instead of failing or replacing it."""
    path = clean_env / "home" / ".ray" / "auth_token"
    link = os.link

    def other_process_first(src, dst):
        open(dst, "w").write("b" * 64)  # the other process's token lands first
        link(src, dst)

    monkeypatch.setattr(ray_cluster.os, "link", other_process_first)
    assert ray_cluster.token_source(starting=True) == str(path)
    assert path.read_text() == "b" * 64 and os.listdir(path.parent) == ["auth_token"]  # no temporary file left


def test_joining_without_a_token_says_what_to_export(clean_env):
    with pytest.raises(ValueError, match="no Ray token to join the cluster at 10.0.0.1:6379: export RAY_AUTH_TOKEN_PATH"):
        ray_cluster.token_source(starting=False, address="10.0.0.1:6379")
    assert not os.path.exists(clean_env / "home" / ".ray" / "auth_token")  # nothing made for a cluster we join


def test_token_sources_in_ray_s_order(clean_env, monkeypatch):
    token = clean_env / "job_token"
    token.write_text("a" * 64)
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert ray_cluster.token_source(starting=False, address="x:1") == str(token)
    assert stat.S_IMODE(os.stat(token).st_mode) == 0o600  # readable by others: tightened
    monkeypatch.setenv("RAY_AUTH_TOKEN", "b" * 64)
    assert ray_cluster.token_source(starting=False, address="x:1") == "RAY_AUTH_TOKEN"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(clean_env / "missing"))
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN_PATH=.*missing: no token there"):
        ray_cluster.token_source(starting=True)


def test_the_mode_reaches_ray_s_cached_config(clean_env):
    import ray  # noqa: F401  (Ray's config is read at import)
    from ray._raylet import AuthenticationMode, get_authentication_mode

    ray_cluster.set_auth_mode("token", starting=True)
    assert os.environ["RAY_AUTH_MODE"] == "token" and get_authentication_mode() == AuthenticationMode.TOKEN
    ray_cluster.set_auth_mode("disabled", starting=True)
    assert get_authentication_mode() == AuthenticationMode.DISABLED


def test_train_refuses_to_join_without_a_token_before_anything_starts(clean_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    r = subprocess.run([sys.executable, "launch/train.py", f"output_dir={clean_env / 'run'}", "ray.address=10.0.0.1:6379"],
                       cwd=REPO, env=dict(env, HOME=str(clean_env / "home")), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no Ray token to join the cluster at 10.0.0.1:6379" in r.stderr
    assert not (clean_env / "run").exists()  # refused before the data build


def test_the_shard_build_refuses_to_join_without_a_token(clean_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    r = subprocess.run([sys.executable, "launch/build_shards.py", "--ray", "--tokenizer", str(clean_env), "--out",
                        str(clean_env / "shards"), "ray.address=10.0.0.1:6379"], cwd=REPO,
                       env=dict(env, HOME=str(clean_env / "home")), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().endswith("no Ray token to join the cluster at 10.0.0.1:6379: export RAY_AUTH_TOKEN_PATH="
                                     "<that cluster's token file> (the multi-node sbatch script makes one per job) or put "
                                     f"the token in {clean_env / 'home' / '.ray' / 'auth_token'}; a cluster started without "
                                     "authentication needs ray.auth=disabled (unsafe on a shared network)"), r.stderr[-2000:]
    assert not (clean_env / "shards").exists()  # refused before anything was built


def test_unknown_auth_value_is_a_config_error():
    r = subprocess.run([sys.executable, "launch/train.py", "ray.auth=none"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "ray.auth='none': expected one of token, disabled" in r.stderr
