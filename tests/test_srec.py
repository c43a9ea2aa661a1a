import os
import pickle
import zipfile

import pytest
import torch

from conftest import SHARED_DATA, srec_section, synthetic
from shards.safe_unpickle import UnsafePickle
from shards.samples import build_vocab, leave_one_out, user_sequences
from shards.synthetic import generate
from trainer.model.srec import ARCHS, build_srec, load_srec, save_srec
from trainer.model.srec.common import left_pad
from trainer.evaluation.ranking import Popularity, Random
from trainer.model.srec.metrics import evaluate
from trainer.model.srec.pretrain import pretrain as pretrain_section

TRAINABLE = ["sasrec", "gru4rec", "caser"]


def pretrain(splits, num_items, max_len=10, seed=0, **settings):
    """pretrain with the default srec section and `settings` over it (the keys are the config's)."""
    return pretrain_section(splits, num_items, srec_section(**settings), max_len=max_len, seed=seed)


@pytest.fixture(scope="module")
def synthetic_splits():
    inter, items = generate(synthetic(num_users=300, num_items=100), 2)
    vocab = build_vocab(inter, items)
    return leave_one_out(user_sequences(inter, vocab["dense"]), 10)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_interface_and_roundtrip(arch, tmp_path):
    m = build_srec(arch, 30, hidden=16, max_len=5).eval()
    x, lengths = m.pad([[1, 2, 3], [4], list(range(9))])
    assert x.shape == (3, 5) and lengths.tolist() == [3, 1, 5] and x[1, :4].eq(30).all()
    assert m.user_state(x, lengths).shape == (3, 16)
    assert m.scores(x, lengths).shape == (3, 30)
    assert m.item_vectors(torch.tensor([0, 29])).shape == (2, 16)
    with pytest.raises(IndexError, match="items 0..29"):
        m.item_vectors(torch.tensor([3, 30]))
    save_srec(m, str(tmp_path))
    m2 = load_srec(str(tmp_path))
    assert torch.equal(m.scores(x, lengths), m2.scores(x, lengths))


@pytest.mark.parametrize("arch", ["gru4rec", "llara_sasrec"])
def test_padding_does_not_change_the_state(arch):
    """Models that read a sequence by its length give the same state however much padding precedes it."""
    m = build_srec(arch, 30, hidden=16, max_len=8).eval()
    x, lengths = m.pad([[5, 6, 7]])
    y = torch.full((1, 8), 30)
    y[0, -3:] = torch.tensor([5, 6, 7])
    assert torch.allclose(m.user_state(x, lengths), m.user_state(y, torch.tensor([3])))
    assert not torch.allclose(m.user_state(x, lengths), m.user_state(*m.pad([[5, 6, 8]])))


@pytest.mark.slow  # trains three SRecs for 5 epochs each to a quality bar
@pytest.mark.parametrize("arch", TRAINABLE)
def test_pretrained_models_beat_popularity_and_random(arch, synthetic_splits):
    model, report = pretrain(synthetic_splits, 100, arch=arch, hidden=32, max_len=10, epochs=5, lr=0.005, seed=0)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    test = synthetic_splits["test"]
    ours = evaluate(model, test, 100)
    pop = evaluate(Popularity([s["target"] for s in synthetic_splits["train"]], 100), test, 100)
    rnd = evaluate(Random(100), test, 100)
    assert ours["hr@10"] > pop["hr@10"] > rnd["hr@10"] * 0.8
    assert ours["ndcg@10"] > 2 * rnd["ndcg@10"]
    assert report["best_val_ndcg@10"] > 0


@pytest.mark.slow  # trains an SRec for 4 epochs to a quality bar
def test_bce_with_sampled_negatives_learns(synthetic_splits):
    model, _ = pretrain(synthetic_splits, 100, arch="sasrec", hidden=32, max_len=10, epochs=4, lr=0.005, loss="bce",
                        negatives=4, seed=0)
    # the synthetic users come back to items they had: their own history is ranked here (mask_history=False)
    assert evaluate(model, synthetic_splits["test"], 100, mask_history=False)["hr@10"] > 0.3


def test_all_positions_objective_learns(synthetic_splits):
    """The SASRec paper's objective: one row per user, every position predicts the next item."""
    from trainer.model.srec.pretrain import user_sequences as train_rows

    inputs, nexts = train_rows(synthetic_splits["train"], 10)
    assert len(inputs) == len({s["user"] for s in synthetic_splits["train"]})
    assert all(x[1:] == y[:-1] and len(x) == len(y) <= 10 for x, y in zip(inputs, nexts))
    model, _ = pretrain(synthetic_splits, 100, arch="sasrec", hidden=32, max_len=10, epochs=6, lr=0.005, loss="bce",
                        positions="all", seed=0)
    ours = evaluate(model, synthetic_splits["test"], 100)
    assert ours["hr@10"] > 2 * evaluate(Random(100), synthetic_splits["test"], 100)["hr@10"]
    with pytest.raises(ValueError, match="per-position output"):
        pretrain(synthetic_splits, 100, arch="caser", positions="all", loss="bce", epochs=1)
    # softmax CE at every position (the ICLRec/CL4SRec line) learns too
    model, _ = pretrain(synthetic_splits, 100, arch="sasrec", hidden=32, max_len=10, epochs=6, lr=0.005, loss="ce",
                        positions="all", seed=0)
    assert evaluate(model, synthetic_splits["test"], 100)["hr@10"] > 2 * evaluate(Random(100), synthetic_splits["test"], 100)["hr@10"]


def test_adam_beta2_reaches_the_optimizer(synthetic_splits):
    """srec.adam_beta2 (the SASRec authors train with 0.98) changes the trained weights; the default is torch's."""
    assert srec_section().adam_beta2 == 0.999  # the default, in configs/llara_default.yaml
    kw = dict(arch="sasrec", hidden=16, max_len=10, epochs=1, lr=0.005, seed=0)
    a, _ = pretrain(synthetic_splits, 100, **kw)
    b, _ = pretrain(synthetic_splits, 100, adam_beta2=0.999, **kw)
    c, _ = pretrain(synthetic_splits, 100, adam_beta2=0.5, **kw)
    assert torch.equal(a.item_emb.weight, b.item_emb.weight)
    assert not torch.allclose(a.item_emb.weight, c.item_emb.weight)


def test_xavier_init_as_the_sasrec_authors(synthetic_splits):
    """srec.init=xavier: every matrix xavier-normal (item rows tiny next to the default's unit-norm
    rows), the padding row zero, vectors untouched; an unknown name is refused."""
    from trainer.model.srec.pretrain import xavier_init

    torch.manual_seed(0)
    m = build_srec("sasrec", 2000, hidden=32, max_len=10)
    default_norms = m.item_emb.weight[:-1].norm(dim=1)
    xavier_init(m)
    rows = m.item_emb.weight
    assert torch.equal(rows[-1], torch.zeros(32))
    expected_std = (2 / (2001 + 32)) ** 0.5
    assert abs(rows[:-1].std().item() / expected_std - 1) < 0.05
    assert rows[:-1].norm(dim=1).mean() < 0.25 * default_norms.mean()  # ~0.18 against ~1
    assert torch.equal(m.final_norm.weight, torch.ones(32))
    kw = dict(arch="sasrec", hidden=16, max_len=10, epochs=1, lr=0.005, seed=0)
    a, _ = pretrain(synthetic_splits, 100, **kw)
    b, _ = pretrain(synthetic_splits, 100, init="xavier", **kw)
    assert not torch.allclose(a.item_emb.weight, b.item_emb.weight)
    with pytest.raises(ValueError, match="srec.init='kaiming'"):
        pretrain(synthetic_splits, 100, init="kaiming", **kw)


def test_metrics_on_a_known_case():
    class Fixed:
        num_items, max_len = 5, 3

        def pad(self, h):
            return left_pad(h, 3, 5)

        def scores(self, x, lengths):
            return torch.tensor([[0.9, 0.5, 0.1, 0.3, 0.2]] * len(x))

    samples = [{"history": [4], "target": 0}, {"history": [4], "target": 1}, {"history": [4], "target": 2}]
    m = evaluate(Fixed(), samples, 5, candidates=[[0, 1, 2], [1, 2, 3], [2, 3, 4]], n_sampled=2, mask_history=False)
    assert m["full_ranking"] == "history ranked"
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 + 1 / torch.log2(torch.tensor(3.0)).item() + 1 / torch.log2(torch.tensor(6.0)).item()) / 3)
    assert m["cand20_hr@1"] == pytest.approx(2 / 3)  # 0 wins, 1 wins, 3 beats 2
    # the default (issue 25, as RecBole): the user's history is not ranked. Target 1 moves from rank 1 to
    # rank 0 (item 0 masked), target 2 from 4 to 2 (items 0 and 4 masked), target 0, in its own history,
    # from 0 to never hit; the other protocols are unchanged
    masked = [{"history": [0], "target": 1}, {"history": [0, 4], "target": 2}, {"history": [0], "target": 0}]
    m = evaluate(Fixed(), masked, 5, candidates=[[0, 1, 2], [1, 2, 3], [2, 3, 4]], n_sampled=2)
    plain = evaluate(Fixed(), masked, 5, candidates=[[0, 1, 2], [1, 2, 3], [2, 3, 4]], n_sampled=2, mask_history=False)
    assert m["full_ranking"] == "history masked"
    assert m["hr@1"] == pytest.approx(1 / 3) and plain["hr@1"] == pytest.approx(1 / 3)  # 1 hit; before: 0 hit
    assert m["ndcg@5"] == pytest.approx((1 + 1 / 2) / 3) and m["hr@5"] == pytest.approx(2 / 3)
    assert plain["ndcg@5"] == pytest.approx((1 / torch.log2(torch.tensor(3.0)).item()
                                             + 1 / torch.log2(torch.tensor(6.0)).item() + 1) / 3)
    assert m["cand20_hr@1"] == plain["cand20_hr@1"]


# ---- LLaRA's released checkpoints


def _need(*parts):
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (LLaRA's weights and data live in ../shared/data)")
    return path


@pytest.mark.parametrize("name,items,hr10", [("movielens", 1682, 0.126), ("steam", 3581, 0.073), ("lastfm", 4606, 0.098)])
def test_llara_weights_reproduce_their_forward(name, items, hr10):
    """The restricted import of the original pickle equals the plain state_dict, and our
    re-implementation of LLaRA's SASRec gives the full-ranking HR@10 that their architecture gives
    on their test sets (rows with at least 3 history items; numbers from llara-srec/PROVENANCE.md)."""
    from shards.readers import read_llara_processed
    from trainer.model.srec.llara_import import load_llara_sasrec, read_llara_checkpoint

    pt = _need("llara-srec", f"{name}.pt")
    state, hparams = read_llara_checkpoint(pt)
    plain = torch.load(_need("llara-srec", f"{name}.state_dict.pt"), map_location="cpu", weights_only=True)
    assert list(state) == list(plain) and all(torch.equal(state[k], plain[k]) for k in plain)
    assert hparams == {"num_items": items, "hidden": 64, "max_len": 10, "heads": 1, "dropout": 0.1}
    model = load_llara_sasrec(pt)
    _, splits = read_llara_processed(_need("llara-data", name))
    rows = [s for s in splits["test"] if len(s["history"]) >= 3]
    got = evaluate(model, rows, items, mask_history=False)["hr@10"]  # their figures rank the history too
    assert round(got, 3) == hr10
    assert torch.equal(model.item_vectors(torch.tensor([0, 5])), plain["item_embeddings.weight"][[0, 5]])


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    from trainer.model.srec.llara_import import read_llara_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
    with pytest.raises(UnsafePickle, match=r"names posix.system|names os.system|not on the allow-list"):
        read_llara_checkpoint(str(path))
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafePickle, match="not a torch zip checkpoint"):
        read_llara_checkpoint(str(tmp_path / "legacy.pt"))


def test_ctrl_c_keeps_the_best_epoch_so_far(synthetic_splits, monkeypatch):
    import trainer.model.srec.pretrain as pt

    real, calls = pt.train_one_epoch, []

    def interrupted_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pt, "train_one_epoch", interrupted_on_third)
    model, report = pretrain(synthetic_splits, 100, arch="sasrec", hidden=32, max_len=10, epochs=10, lr=0.005, seed=0)
    assert report["stopped"] == "interrupted" and len(report["epochs"]) == 2
    assert not model.training and report["best_val_ndcg@10"] == max(e["val_ndcg@10"] for e in report["epochs"])


@pytest.mark.slow  # launch/pretrain_srec.py in subprocesses
def test_pretrain_cli_saves_and_evaluate_reads_back(tmp_path):
    """launch/pretrain_srec.py trains (a bar per epoch over the batches: loss, batches/s) and saves;
    --evaluate on the saved folder gives the same table row; an SRec for another catalogue is refused
    with both item counts."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    data = ["data.synthetic.num_users=120", "data.synthetic.num_items=60", "srec.epochs=1", "srec.hidden=16"]

    def cli(*args):
        return subprocess.run([sys.executable, "launch/pretrain_srec.py", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=600)

    r = cli("--out", str(tmp_path / "a"), "--archs", "gru4rec", *data)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 1/1" in r.stderr and "batch/s" in r.stderr and "loss=" in r.stderr  # the per-batch bar
    trained = json.loads((tmp_path / "a" / "eval_test.json").read_text())
    assert {"gru4rec", "popularity", "random"} <= set(trained)
    r = cli("--out", str(tmp_path / "b"), "--evaluate", str(tmp_path / "a" / "gru4rec"), "--no-baselines", *data)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "eval_test.json").read_text()) == {"gru4rec": trained["gru4rec"]}
    other = [*data[:1], "data.synthetic.num_items=50", *data[2:]]
    r = cli("--out", str(tmp_path / "c"), "--evaluate", str(tmp_path / "a" / "gru4rec"), *other)
    assert r.returncode == 2 and "knows 60 items, the data has 50" in r.stderr


@pytest.mark.slow  # launch/pretrain_srec.py in a subprocess
def test_import_llara_on_a_folder_without_train_split(tmp_path):
    """README's --import-llara command on LLaRA's MovieLens folder, which ships no train_data.df: the
    imported SASRec is evaluated and saved; the popularity baseline (it counts the train split) is left
    out with a message instead of a KeyError."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    weights = os.path.join(SHARED_DATA, "llara-srec", "movielens.pt")
    data = os.path.join(SHARED_DATA, "llara-data", "movielens")
    if not (os.path.exists(weights) and os.path.isdir(data)):
        pytest.skip(f"LLaRA's MovieLens SASRec or data not in {SHARED_DATA}")
    r = subprocess.run([sys.executable, "launch/pretrain_srec.py", "--out", str(tmp_path), "--import-llara", weights,
                        "data.source=llara", f"data.path={data}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "popularity baseline is left out" in r.stderr
    rows = json.loads((tmp_path / "eval_test.json").read_text())
    assert set(rows) == {"llara_sasrec (imported)", "random"}
    assert rows["llara_sasrec (imported)"]["hr@10"] > rows["random"]["hr@10"]
    assert (tmp_path / "llara_sasrec" / "model.safetensors").exists()


@pytest.mark.slow  # launch/pretrain_srec.py in a subprocess
def test_ctrl_c_in_the_first_epoch_is_a_message_not_a_traceback(tmp_path):
    """SIGINT before any epoch finished: exit 130 with a line saying nothing was saved (Video's first
    SASRec epoch takes ~30 s here, so the signal lands inside it)."""
    import signal
    import subprocess
    import sys

    from conftest import REPO

    video = os.path.join(SHARED_DATA, "sasrec-amazon-video", "Video.txt")
    if not os.path.exists(video):
        pytest.skip(f"{video} is absent (the SASRec authors' Amazon Video, see ../shared/data/INDEX.md)")
    p = subprocess.Popen([sys.executable, "launch/pretrain_srec.py", "--out", str(tmp_path), "--archs", "sasrec",
                          "data.source=sequences", f"data.path={video}", "data.history_len=50", "srec.hidden=50"],
                         cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = ""
    while "pretraining sasrec" not in seen:  # the progress bar appears when the first epoch starts
        chunk = p.stderr.read(1)
        assert chunk, seen[-2000:]
        seen += chunk
    p.send_signal(signal.SIGINT)
    _, rest = p.communicate(timeout=120)
    assert p.returncode == 130, (seen + rest)[-2000:]
    assert "interrupted before sasrec's first epoch finished: nothing saved for it" in rest
    assert "Traceback" not in seen + rest and not (tmp_path / "sasrec").exists()


def test_a_bad_srec_choice_is_refused_before_the_data_build(tmp_path):
    """prepare() trains the SRec after the tokenizer, the tiny LLM and the shards: a typo in srec.*
    must stop it before those, not minutes later."""
    from configs.schema import load_config
    from trainer.data.prepare import prepare

    out = tmp_path / "run"
    for bad, message in ((["srec.init=kaiming"], "srec.init='kaiming'"), (["srec.loss=bpr"], "srec.loss='bpr'"),
                         (["srec.arch=bert4rec"], "srec.arch='bert4rec'"),
                         (["srec.arch=caser", "srec.positions=all"], "srec.positions=all needs a per-position output")):
        with pytest.raises(ValueError, match=message):
            prepare(load_config(None, [f"output_dir={out}", "data.synthetic.num_users=40", "data.synthetic.num_items=60", *bad]))
        assert not (out / "data").exists() and not (out / "assets").exists()  # refused before any work


def test_validation_reads_every_user_by_default_and_a_cap_is_named(synthetic_splits, caplog):
    """srec.val_users: -1 (default) validates on every validation user (it was the first 5,000, silently);
    a cap takes the first N and the log says so; the report says how many were read."""
    import logging

    n = sum(1 for s in synthetic_splits["val"] if s["history"])
    kw = dict(arch="sasrec", hidden=16, max_len=10, epochs=1, lr=0.005, seed=0)
    with caplog.at_level(logging.INFO, logger="trainer.model.srec.pretrain"):
        _, every = pretrain(synthetic_splits, 100, **kw)
        _, capped = pretrain(synthetic_splits, 100, val_users=40, **kw)
    assert every["val_users"] == n > 40 and capped["val_users"] == 40
    assert f"validation on all {n} validation users" in caplog.text
    assert f"validation on the first 40 of {n} validation users (srec.val_users=40)" in caplog.text
    assert every["epochs"][0]["val_ndcg@10"] != capped["epochs"][0]["val_ndcg@10"]  # other users, another figure
    from configs.schema import load_config

    assert load_config(None, []).srec.val_users == -1


def test_sasrec_knobs_reach_the_model_and_the_defaults_are_the_old_model():
    """srec.ffn_inner, activation, norm, attn_dropout (issue 25): each changes the built SASRec; with the
    defaults it is the model as before (the same parameters from the same seed, the same forward)."""
    from trainer.model.srec.sasrec import SASRec

    def built(seed=0, **kw):
        torch.manual_seed(seed)
        return SASRec(50, hidden=16, blocks=2, heads=2, max_len=8, dropout=0.2, **kw).eval()

    x = torch.randint(0, 51, (4, 8), generator=torch.Generator().manual_seed(1))
    base = built()
    assert isinstance(base.blocks[0].ffn[1], torch.nn.ReLU) and base.blocks[0].ffn[0].out_features == 16
    assert base.blocks[0].attn.dropout == 0.2 and base.blocks[0].norm == "pre"
    wide = built(ffn_inner=64, activation="gelu", attn_dropout=0.3)
    assert wide.blocks[1].ffn[0].out_features == 64 and wide.blocks[1].ffn[3].in_features == 64
    assert isinstance(wide.blocks[1].ffn[1], torch.nn.GELU) and wide.blocks[1].attn.dropout == 0.3
    post = built(norm="post")
    post.load_state_dict(base.state_dict())  # the same weights, the other order
    assert not torch.allclose(post.sequence_output(x), base.sequence_output(x))
    assert wide.config["ffn_inner"] == 64 and post.config["norm"] == "post"  # saved with the model
    with pytest.raises(ValueError, match="srec.activation='tanh'"):
        built(activation="tanh")


def test_early_stopping_metric_is_a_key(synthetic_splits):
    kw = dict(arch="gru4rec", hidden=16, max_len=10, epochs=3, patience=3, lr=0.005, seed=0)
    _, ndcg = pretrain(synthetic_splits, 100, **kw)
    _, hr1 = pretrain(synthetic_splits, 100, stop_metric="hr@1", **kw)
    assert ndcg["stop_metric"] == "ndcg@10" and ndcg["best_val"] == max(e["val_ndcg@10"] for e in ndcg["epochs"])
    assert hr1["stop_metric"] == "hr@1" and hr1["best_val"] == max(e["val_hr@1"] for e in hr1["epochs"])
    with pytest.raises(ValueError, match="srec.stop_metric='auc'"):
        pretrain(synthetic_splits, 100, stop_metric="auc", **kw)


def test_normal_init_with_its_std(synthetic_splits):
    """srec.init=normal, srec.init_std: every weight drawn from normal(0, std), biases 0, the padding row 0."""
    model, _ = pretrain(synthetic_splits, 100, arch="sasrec", hidden=32, max_len=10, epochs=1, lr=1e-12,
                        init="normal", init_std=0.05, seed=0)  # a step of lr 1e-12 leaves the init as it was
    rows = model.item_emb.weight[:100]
    assert abs(rows.std().item() - 0.05) < 0.005 and not model.item_emb.weight[100].any()
    assert abs(model.blocks[0].attn.in_proj_weight.std().item() - 0.05) < 0.005
    assert model.blocks[0].ffn[0].bias.abs().max() < 1e-9  # zero, moved by the steps of lr 1e-12 only
