"""LLaRA hybrid prompts: render a sample as text, tokenize it once, locate its placeholders.

Every item is written as its title followed by one placeholder token: `[HistoryEmb]` after history
items, `[CansEmb]` after candidates. At training time the embedding layer replaces the embedding at
each placeholder by adapter(SRec vector of that item) (hybrid step) or swaps the placeholder for
`[PH]` and leaves it as a plain token (text-only step): one tokenization serves both.

The wording follows data.domain (movie, game, artist: LLaRA's MovieLens, Steam and LastFM sets).

Optional (`data.user_token`, off by default; beyond LLaRA): the prompt also names the user's state,
"This user ([UserEmb]) has watched ...", one `[UserEmb]` per sample, whose embedding becomes
user_adapter(SRec user_state(history)). Off, prompts and shards are byte-identical to LLaRA's.
"""

from __future__ import annotations

import numpy as np

PH, HISTORY_EMB, CANS_EMB, ITEM_EMB = "[PH]", "[HistoryEmb]", "[CansEmb]", "[ItemEmb]"
PLACEHOLDERS = (PH, HISTORY_EMB, CANS_EMB, ITEM_EMB)
USER_EMB = "[UserEmb]"  # a special token only in tokenizers built for data.user_token=true

# The three movie templates of LLaRA's public code, in substance. [HistoryHere] and [CansHere]
# are filled with the rendered item lists.
LLARA_TEMPLATES = (
    "This user has watched [HistoryHere] in the previous. Please predict the next movie this user "
    "will watch. Choose the answer from the following 20 movie titles: [CansHere]. Answer:",
    "Given the movies this user has watched: [HistoryHere], which one of the following movies will "
    "the user watch next? [CansHere]. Answer:",
    "The user watched [HistoryHere]. Recommend the movie the user is most likely to watch next "
    "from these candidates: [CansHere]. Answer:",
)

# LLaRA keeps one template set per domain (MovieLens, Steam, LastFM); these are ours, in the same
# substance: Steam users have played games, LastFM users have listened to music artists.
GAME_TEMPLATES = (
    "This user has played [HistoryHere] before. Please predict the next game this user will play. "
    "Pick the answer from these candidate games: [CansHere]. Answer:",
    "Given the games this user has played: [HistoryHere], which one of the following games will the "
    "user play next? [CansHere]. Answer:",
    "The user played [HistoryHere]. Recommend the game the user is most likely to play next from "
    "these candidates: [CansHere]. Answer:",
)
ARTIST_TEMPLATES = (
    "This user has listened to [HistoryHere] before. Please predict the next music artist this user "
    "will listen to. Pick the answer from these artist names: [CansHere]. Answer:",
    "Given the music artists this user has listened to: [HistoryHere], which one of the following "
    "artists will the user listen to next? [CansHere]. Answer:",
    "The user listened to [HistoryHere]. Recommend the music artist the user is most likely to listen "
    "to next from these candidate artist names: [CansHere]. Answer:",
)
DOMAIN_TEMPLATES = {"movie": LLARA_TEMPLATES, "game": GAME_TEMPLATES, "artist": ARTIST_TEMPLATES}
DOMAINS = tuple(DOMAIN_TEMPLATES)  # data.domain's values


def _name_the_user(plain: tuple[str, ...]) -> tuple[str, ...]:
    # the user's state named after the first "user": "This user ([UserEmb]) has watched ...",
    # "... this user ([UserEmb]) has played: ...", "The user ([UserEmb]) listened to ..."
    return tuple(t.replace("user", f"user ({USER_EMB})", 1) for t in plain)


DOMAIN_USER_TEMPLATES = {d: _name_the_user(ts) for d, ts in DOMAIN_TEMPLATES.items()}
USER_TEMPLATES = DOMAIN_USER_TEMPLATES["movie"]
# every set: one of each list; named after a whole word "user", exactly once
assert all(t.count("[HistoryHere]") == 1 and t.count("[CansHere]") == 1 for ts in DOMAIN_TEMPLATES.values() for t in ts)
assert all(t.count(USER_EMB) == 1 and t.count(f" user ({USER_EMB}) ") == 1
           for ts in DOMAIN_USER_TEMPLATES.values() for t in ts)


def check_domain(domain: str) -> str:
    if domain not in DOMAIN_TEMPLATES:
        raise ValueError(f"data.domain={domain!r}: expected one of {', '.join(DOMAINS)} "
                         "(the item kind LLaRA's prompts name)")
    return domain


def templates(user_token: bool = False, domain: str = "movie") -> tuple[str, ...]:
    """LLaRA's prompt templates for data.domain (movie, game or artist), with [UserEmb] if user_token."""
    check_domain(domain)
    return DOMAIN_USER_TEMPLATES[domain] if user_token else DOMAIN_TEMPLATES[domain]


def render_items(item_ids, titles, placeholder: str) -> str:
    return ", ".join(f"{titles[i]} {placeholder}" for i in item_ids)


def render_llara(sample: dict, titles, template: str) -> tuple[str, str]:
    """Return (prompt, answer). The answer is the target title and a newline, as in LLaRA."""
    prompt = template.replace("[HistoryHere]", render_items(sample["history"], titles, HISTORY_EMB))
    prompt = prompt.replace("[CansHere]", render_items(sample["candidates"], titles, CANS_EMB))
    return prompt, llara_answer(titles[sample["target"]])


def llara_answer(title: str) -> str:
    """LLaRA's answer text for an item: its title after a space, and a newline."""
    return " " + title + "\n"


def answer_token_ids(answer: str, tokenizer) -> list[int]:
    """An answer's tokens as the shards hold them after the prompt: the text's tokens and eos."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


class PromptTooLong(ValueError):
    pass


def check_placeholder_tokens(tokenizer, user_token: bool = False, where: str = "") -> None:
    """Every placeholder must be a token of its own. A stock model folder's tokenizer as downloaded
    splits "[HistoryEmb]" into pieces, and then no sample finds its slots: say so, naming the pieces."""
    wanted = [*PLACEHOLDERS, USER_EMB] if user_token else list(PLACEHOLDERS)
    for token in wanted:
        pieces = tokenizer.tokenize(token)
        if len(pieces) != 1 or tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer{' in ' + where if where else ''} has no {token} token (it splits it "
                             f"into {pieces}); launch/train.py adds LLaRA's tokens to a model.base tokenizer "
                             "(trainer/model/build.py prepare_tokenizer): build shards with the run's tokenizer")


def tokenize_prompt_answer(prompt: str, answer: str, tokenizer, max_len: int, sample: dict, kind: str):
    """[bos] prompt answer [eos] as int32 ids (bos where the tokenizer has one), the label mask (1 on answer and eos), and the answer's
    length in tokens; longer than max_len is PromptTooLong naming the sample."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = answer_token_ids(answer, tokenizer)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]  # Qwen2 has no bos token
    ids = np.asarray(bos + prompt_ids + answer_ids, dtype=np.int32)
    if len(ids) > max_len:
        raise PromptTooLong(
            f"user {sample['user']} (target {sample['target']}): {kind} + answer is {len(ids)} tokens, "
            f"the limit (data.max_len) is {max_len}; raise the limit or shorten data.history_len"
        )
    label_mask = np.zeros(len(ids), dtype=np.uint8)
    label_mask[len(ids) - len(answer_ids):] = 1
    return ids, label_mask, len(answer_ids)


def tokenize_llara(sample: dict, titles, template: str, tokenizer, max_len: int, user_token: bool = False) -> dict:
    """Tokenize prompt and answer once; record each placeholder's position and item id.

    Returns numpy arrays: input_ids (prompt + answer + eos), label_mask (1 on answer tokens and eos),
    slot_pos and slot_item (placeholder positions in order, with the item each one stands for).
    With user_token (the template must then hold one [UserEmb]) also user_pos, the position of the
    [UserEmb] token; the user's history is slot_item[:len(history)].
    """
    prompt, answer = render_llara(sample, titles, template)
    ids, label_mask, n_answer = tokenize_prompt_answer(prompt, answer, tokenizer, max_len, sample, "prompt")

    hist_id = tokenizer.convert_tokens_to_ids(HISTORY_EMB)
    cans_id = tokenizer.convert_tokens_to_ids(CANS_EMB)
    hist_pos = np.flatnonzero(ids == hist_id)
    cans_pos = np.flatnonzero(ids == cans_id)
    if len(hist_pos) != len(sample["history"]) or len(cans_pos) != len(sample["candidates"]):
        raise ValueError(
            f"user {sample['user']}: found {len(hist_pos)}/{len(cans_pos)} placeholders for "
            f"{len(sample['history'])} history items and {len(sample['candidates'])} candidates; "
            "does a title contain a placeholder token?"
        )
    slot_pos = np.concatenate([hist_pos, cans_pos]).astype(np.int32)
    slot_item = np.asarray(list(sample["history"]) + list(sample["candidates"]), dtype=np.int32)
    out = {"input_ids": ids, "label_mask": label_mask, "slot_pos": slot_pos, "slot_item": slot_item,
           "prompt_len": int(len(ids) - n_answer)}
    if user_token:
        user_id = tokenizer.convert_tokens_to_ids(USER_EMB)
        if user_id in (None, tokenizer.unk_token_id):
            raise ValueError(f"data.user_token=true but the tokenizer has no {USER_EMB} special token")
        user_pos = np.flatnonzero(ids == user_id)
        if len(user_pos) != 1:
            raise ValueError(f"user {sample['user']}: found {len(user_pos)} {USER_EMB} tokens, expected one; "
                             "does a title contain the placeholder?")
        out["user_pos"] = int(user_pos[0])
        out["history_len"] = len(sample["history"])
    return out


# ReLLa's CTR answers (P(yes) compares the logits of their first differing tokens: trainer/evaluation/scoring.py)
CTR_ANSWERS = (" Yes.", " No.")


# ---- ReLLa CTR prompts (data.task=ctr; shards/ctr.py builds the samples)

# ReLLa's profile, rated history and question, with LLaRA's placeholders after every item: the
# trainer's mode fills them with behaviour tokens (hybrid) or leaves them as [PH] (text, ReLLa's setting).
CTR_TEMPLATE = ("[ProfileHere]The user watched the following movies in order and gave these ratings: [HistoryHere]. "
                "Will the user like [TargetHere]? Answer Yes or No. Answer:")
CTR_TEMPLATES = (CTR_TEMPLATE,)


def profile_sentence(profile: dict | None) -> str:
    """ "The user is a female, aged 25-34, working as a writer. " or "" without a profile."""
    if not profile:
        return ""
    g = str(profile.get("gender", "")).strip()
    gender = {"F": "female", "M": "male"}.get(g.upper(), g) if g else ""
    parts = [f"The user is a {gender}" if gender else "The user"]
    if profile.get("age") not in (None, ""):
        parts.append(f"aged {profile['age']}")
    if profile.get("occupation"):
        parts.append(f"working as {profile['occupation']}")
    return ", ".join(parts) + ". "


def format_rating(r) -> str:
    r = float(r)
    return f"{int(r)}" if r == int(r) else f"{r:g}"


def render_ctr(sample: dict, titles, profile: dict | None = None, template: str = CTR_TEMPLATE) -> tuple[str, str]:
    """(prompt, answer): "1. Title [HistoryEmb] (4 stars), 2. ..." and the target as "Title [ItemEmb]";
    the answer is " Yes." (label 1) or " No." (label 0)."""
    hist = ", ".join(f"{n}. {titles[i]} {HISTORY_EMB} ({format_rating(r)} stars)"
                     for n, (i, r) in enumerate(zip(sample["history"], sample["history_ratings"]), 1))
    prompt = (template.replace("[ProfileHere]", profile_sentence(profile)).replace("[HistoryHere]", hist)
              .replace("[TargetHere]", f"{titles[sample['target']]} {ITEM_EMB}"))
    return prompt, CTR_ANSWERS[0 if sample["label"] else 1]


def tokenize_ctr(sample: dict, titles, tokenizer, max_len: int, profile: dict | None = None) -> dict:
    """As tokenize_llara for a CTR sample: label_mask on the answer and eos, one slot per history
    item ([HistoryEmb]) then the target ([ItemEmb])."""
    prompt, answer = render_ctr(sample, titles, profile)
    ids, label_mask, n_answer = tokenize_prompt_answer(prompt, answer, tokenizer, max_len, sample, "CTR prompt")
    hist_pos = np.flatnonzero(ids == tokenizer.convert_tokens_to_ids(HISTORY_EMB))
    item_pos = np.flatnonzero(ids == tokenizer.convert_tokens_to_ids(ITEM_EMB))
    if len(hist_pos) != len(sample["history"]) or len(item_pos) != 1:
        raise ValueError(f"user {sample['user']}: found {len(hist_pos)}/{len(item_pos)} placeholders for "
                         f"{len(sample['history'])} history items and 1 target; does a title contain a placeholder token?")
    return {"input_ids": ids, "label_mask": label_mask, "slot_pos": np.concatenate([hist_pos, item_pos]).astype(np.int32),
            "slot_item": np.asarray(list(sample["history"]) + [sample["target"]], dtype=np.int32),
            "prompt_len": int(len(ids) - n_answer)}
