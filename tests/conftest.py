import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SMALL = ["data.synthetic.num_users=120", "data.synthetic.num_items=120", "srec.epochs=3", "data.samples_per_shard=300"]


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A prepared run folder (tokenizer, tiny Llama, shards, SASRec) on a small synthetic set."""
    from trainer.config import load_config
    from trainer.prepare import prepare

    out = tmp_path_factory.mktemp("small_run")
    cfg = load_config(None, [f"output_dir={out}", *SMALL])
    return cfg, prepare(cfg)
