"""data.domain: LLaRA's prompt wording per data set (movie: MovieLens, game: Steam, artist: LastFM).
The movie set is the default and unchanged (test_user_token's goldens pin its bytes)."""

import json
import os

import pytest
from transformers import AutoTokenizer

from shards.build import load_manifest, load_source, write_shards
from shards.prompts import (ARTIST_TEMPLATES, CANS_EMB, DOMAINS, GAME_TEMPLATES, HISTORY_EMB, LLARA_TEMPLATES,
                            USER_EMB, USER_TEMPLATES, render_llara, templates)
from trainer.data.loader import meta, read_shard

# the smallest synthetic run: 40 users, one SASRec epoch, one tokenizing process
TINY = ["data.synthetic.num_users=40", "data.synthetic.num_items=60", "srec.epochs=1", "data.build_workers=1",
        "data.samples_per_shard=300"]
WORDS = {"movie": ("watched", "movie"), "game": ("played", "game"), "artist": ("listened to", "music artist")}


def test_movie_is_the_default_and_unchanged():
    assert DOMAINS == ("movie", "game", "artist")
    assert templates() is templates(False, "movie") is LLARA_TEMPLATES
    assert templates(True) is templates(True, "movie") is USER_TEMPLATES
    from configs.schema import load_config

    assert load_config().data.domain == "movie"


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("user_token", [False, True])
def test_every_domain_renders_with_its_placeholders(domain, user_token):
    sample = {"user": 3, "history": [0, 1, 2], "candidates": [4, 3, 5, 6], "target": 3}
    titles = [f"Name {i}" for i in range(7)]
    ts = templates(user_token, domain)
    assert len(ts) == 3 and len(set(ts)) == 3
    verb, noun = WORDS[domain]
    for t in ts:
        assert t.count(USER_EMB) == (1 if user_token else 0)
        if user_token:  # the plain template with " ([UserEmb])" after its first "user"
            assert t.replace(f" ({USER_EMB})", "") == templates(False, domain)[ts.index(t)]
        prompt, answer = render_llara(sample, titles, t)
        assert "[HistoryHere]" not in prompt and "[CansHere]" not in prompt
        assert prompt.count(HISTORY_EMB) == 3 and prompt.count(CANS_EMB) == 4
        assert "Name 0 [HistoryEmb], Name 1 [HistoryEmb], Name 2 [HistoryEmb]" in prompt
        assert "Name 4 [CansEmb], Name 3 [CansEmb], Name 5 [CansEmb], Name 6 [CansEmb]" in prompt
        assert prompt.endswith("Answer:") and answer == " Name 3\n"
        assert verb in t
    assert any(f"next {noun} this user" in t for t in ts)
    if domain != "movie":
        assert not any("movie" in t.lower() for t in ts)


def test_artist_and_game_wording():
    assert any("the next music artist this user will listen to" in t for t in ARTIST_TEMPLATES)
    assert any("artist names" in t for t in ARTIST_TEMPLATES)
    assert all("listen" in t for t in ARTIST_TEMPLATES)
    assert any("the next game this user will play" in t for t in GAME_TEMPLATES)
    assert all("played" in t for t in GAME_TEMPLATES)


def test_an_unknown_domain_is_refused_naming_the_values(tmp_path):
    with pytest.raises(ValueError, match=r"data.domain='music': expected one of movie, game, artist"):
        templates(domain="music")
    with pytest.raises(ValueError, match=r"expected one of movie, game, artist"):
        write_shards([], {}, str(tmp_path / "tok"), str(tmp_path / "d"), num_candidates=20, max_len=400,
                     samples_per_shard=10, seed=0, workers=1, domain="movies")
    assert not (tmp_path / "d").exists()
    from configs.schema import load_config
    from trainer.data.prepare import prepare

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"data.domain='book': expected one of movie, game, artist"):
        prepare(load_config(None, [f"output_dir={out}", *TINY, "data.domain=book"]))
    assert not (out / "data").exists() and not (out / "assets").exists()  # refused before any work


@pytest.fixture(scope="module")
def artist_run(tmp_path_factory):
    from configs.schema import load_config
    from trainer.data.prepare import prepare

    out = tmp_path_factory.mktemp("artist_run")
    cfg = load_config(None, [f"output_dir={out}", *TINY, "data.domain=artist"])
    return cfg, prepare(cfg)


def test_an_artist_config_builds_artist_shards(artist_run):
    cfg, paths = artist_run
    manifest = load_manifest(paths.data)
    assert manifest["params"]["templates"] == list(ARTIST_TEMPLATES)
    tok = AutoTokenizer.from_pretrained(paths.llm)
    shard = next(s for s in manifest["shards"] if s["split"] == "test")
    samples = list(read_shard(os.path.join(paths.data, shard["name"])))
    assert samples
    for s in samples[:10]:
        prompt = tok.decode(s["input_ids"][:s["prompt_len"]], skip_special_tokens=False)
        t = ARTIST_TEMPLATES[meta(s)["template"]]
        assert prompt.replace(tok.bos_token, "").startswith(t[:t.index("[HistoryHere]")])
        assert "movie" not in prompt.lower()
        assert list(s["input_ids"][s["slot_pos"]]).count(tok.convert_tokens_to_ids(HISTORY_EMB)) == len(meta(s)["history"])
    # the tiny tokenizer learned the artist wording, not the movie one
    vocab = tok.get_vocab()
    assert "Ġlistened" in vocab and "Ġmovie" not in vocab


def test_the_same_tokenizer_builds_game_shards_with_the_user_token(artist_run, tmp_path):
    from configs.schema import to_dict
    from trainer.model.tiny import build_tokenizer

    cfg, _ = artist_run
    items, splits, stats = load_source(cfg.data, cfg.seed)
    tok_dir = str(tmp_path / "llm")
    build_tokenizer([" " + t for _, t, _ in items] + list(templates(True, "game")), 500, tok_dir, user_token=True)
    m = write_shards(items, splits, tok_dir, str(tmp_path / "d"), num_candidates=20, max_len=400,
                     samples_per_shard=500, seed=cfg.seed, workers=1, stats=stats, user_token=True, domain="game")
    assert m["params"]["templates"] == list(templates(True, "game")) and m["params"]["user_token"] is True
    tok = AutoTokenizer.from_pretrained(tok_dir)
    s = next(iter(read_shard(str(tmp_path / "d" / "test-00000.tar"))))
    prompt = tok.decode(s["input_ids"][:s["prompt_len"]])
    assert f"user ({USER_EMB})" in prompt and "play" in prompt and "movie" not in prompt.lower()
    assert s["input_ids"][s["user_pos"]] == tok.convert_tokens_to_ids(USER_EMB)


def test_a_stamp_from_before_the_key_reads_as_movie(artist_run, tmp_path):
    from configs.schema import load_config
    from trainer.data.prepare import prepare

    _, paths = artist_run
    with open(paths.stamp) as f:
        stamp = json.load(f)
    assert stamp["data"]["domain"] == "artist"
    del stamp["data"]["domain"]  # as prepared before data.domain existed: those runs built movie prompts
    out = tmp_path / "old"
    os.makedirs(out / "assets")
    (out / "assets" / "prepare.json").write_text(json.dumps(stamp))
    assert prepare(load_config(None, [f"output_dir={out}", *TINY])).output_dir == str(out)  # reused
    with pytest.raises(ValueError, match="another data config"):
        prepare(load_config(None, [f"output_dir={out}", *TINY, "data.domain=artist"]))


def test_runtime_keys_may_change_in_a_prepared_folder(tmp_path):
    """How a run reads, checks or computes (loader and build workers, shard verification, fused or
    reference injection) is not what its data and model were built from: a prepared folder is reused
    with other values; a key that changes what is built (history_len) is still refused."""
    from configs.schema import load_config, to_dict
    from trainer.data.prepare import prepare

    out = tmp_path / "run"
    cfg = load_config(None, [f"output_dir={out}", *TINY])
    os.makedirs(out / "assets")
    stamp = {"seed": cfg.seed, "data": to_dict(cfg.data), "model": to_dict(cfg.model), "srec": to_dict(cfg.srec)}
    (out / "assets" / "prepare.json").write_text(json.dumps(stamp))
    runtime = ["model.injection=reference", "data.loader_workers=1", "data.verify_shards=false", "data.build_workers=2"]
    assert prepare(load_config(None, [f"output_dir={out}", *TINY, *runtime])).output_dir == str(out)  # reused
    with pytest.raises(ValueError, match="another data config"):
        prepare(load_config(None, [f"output_dir={out}", *TINY, *runtime, "data.history_len=7"]))
