"""Pretrain a sequential recommender on the same training samples as the LLM (history -> next
item), keep the epoch with the best validation NDCG@10 (or `stop_metric`, full ranking), then freeze it.

Loss: softmax cross-entropy over all items (default), or binary cross-entropy of the target
against `negatives` items drawn uniformly per sample (`loss="bce"`, as in the SASRec paper).

Targets: `positions="last"` trains on every training sample (history -> its next item, one target
per forward row); `positions="all"` is the SASRec paper's objective: one row per user, the user's
training sequence (its last max_len + 1 items), and every position predicts the item after it
(BCE against one sampled negative per position that the user never interacted with; with `loss="ce"`
softmax cross-entropy over all items at every position, as the ICLRec/CL4SRec line). Models with a
per-position output (`sequence_output`: SASRec) support it.
The SRec never sees a validation or test target.

Validation (early stopping, the progress line): every validation user by default (`val_users=-1`); a
cap N takes the first N and the log says so. With `progress`, a bar per epoch over the batches shows
the running loss and batches/s.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from configs.schema import SRec as SRecSection
from trainer.model.srec import ARCHS, SRec, build_srec
from trainer.model.srec.metrics import KS, evaluate, protocol

log = logging.getLogger(__name__)


def user_sequences(train: list[dict], max_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per user, the training sequence's last max_len + 1 items as (inputs, next items)."""
    last: dict = {}
    for s in train:
        if s["user"] not in last or s["position"] > last[s["user"]]["position"]:
            last[s["user"]] = s
    seqs = [(list(s["history"]) + [s["target"]])[-(max_len + 1):] for _, s in sorted(last.items())]
    return [q[:-1] for q in seqs], [q[1:] for q in seqs]


def all_positions_loss(model: SRec, x: torch.Tensor, y: torch.Tensor, num_items: int, gen: torch.Generator,
                       loss: str = "bce") -> torch.Tensor:
    """At every non-padding position: BCE of the next item against one negative outside the user's row
    (the SASRec paper), or softmax cross-entropy over all items (loss="ce", as the ICLRec/CL4SRec line)."""
    out = model.sequence_output(x)  # [B, L, H]
    valid = y != num_items
    if loss == "ce":
        logits = out[valid] @ model.item_vectors(torch.arange(num_items, device=out.device)).T  # [positions, items]
        return F.cross_entropy(logits, y[valid])
    neg = torch.randint(0, num_items, y.shape, generator=gen)
    seen = torch.cat([x, y[:, -1:]], 1)
    for _ in range(10):  # redraw the negatives that hit an item of the user's row
        hit = (neg[:, :, None] == seen[:, None, :]).any(-1)
        if not hit.any():
            break
        neg = torch.where(hit, torch.randint(0, num_items, y.shape, generator=gen), neg)
    pos_s = (out * model.item_emb(y)).sum(-1)[valid]
    neg_s = (out * model.item_emb(neg)).sum(-1)[valid]
    return F.binary_cross_entropy_with_logits(pos_s, torch.ones_like(pos_s)) + \
        F.binary_cross_entropy_with_logits(neg_s, torch.zeros_like(neg_s))


def xavier_init(model: SRec) -> None:
    """Xavier-normal on every matrix of the model (embeddings, attention and feed-forward weights), as
    the SASRec authors' code initialises them; vectors (biases, norms) keep theirs; the padding row
    of the item table stays zero. With ~24k items this makes the item rows tiny (std ~0.009 at
    hidden 50), so the first scores are near zero, unlike the default's unit-norm rows."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                torch.nn.init.xavier_normal_(param)
        emb = model.item_emb
        if emb.padding_idx is not None:
            emb.weight[emb.padding_idx].zero_()


def normal_init(model: SRec, std: float) -> None:
    """As BERT and the ICLRec/CL4SRec line initialise: every Linear and Embedding weight normal(0, std),
    biases zero, LayerNorms weight 1 and bias 0; the padding row of the item table zero."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, std)
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None and isinstance(module.bias, torch.Tensor):
                module.bias.zero_()
            if isinstance(module, torch.nn.MultiheadAttention):  # its projections are parameters, not Linears
                module.in_proj_weight.normal_(0.0, std)
                module.in_proj_bias.zero_()
        emb = model.item_emb
        if emb.padding_idx is not None:
            emb.weight[emb.padding_idx].zero_()


LOSSES = ("ce", "bce")  # srec.loss
POSITIONS = ("last", "all")  # srec.positions
INITS = ("default", "xavier", "normal")  # srec.init
STOP_METRICS = tuple(f"{m}@{k}" for m in ("ndcg", "hr") for k in KS)  # srec.stop_metric (full ranking)
PRETRAIN_KEYS = ("path", "arch", "epochs", "lr", "batch_size", "patience", "loss", "negatives", "positions", "weight_decay",
                 "adam_beta2", "init", "init_std", "val_users", "stop_metric", "eval_mask_history")  # not the model's


def check_pretrain_args(srec: SRecSection) -> None:
    """The srec.* choices pretrain() takes, checked without building anything (prepare calls it before
    the data build, so a typo costs seconds, not the build); a ValueError names the key."""
    if srec.arch not in ARCHS:
        raise ValueError(f"srec.arch={srec.arch!r}: expected one of {', '.join(ARCHS)}")
    if srec.init not in INITS:
        raise ValueError(f"srec.init={srec.init!r}: expected default, xavier or normal")
    if srec.loss not in LOSSES:
        raise ValueError(f"srec.loss={srec.loss!r}: expected ce or bce")
    if srec.stop_metric not in STOP_METRICS:
        raise ValueError(f"srec.stop_metric={srec.stop_metric!r}: expected one of {', '.join(STOP_METRICS)}")
    if srec.positions not in POSITIONS:
        raise ValueError(f"srec.positions={srec.positions!r}: expected last or all")
    if srec.positions == "all" and not hasattr(ARCHS[srec.arch], "sequence_output"):
        raise ValueError(f"srec.positions=all needs a per-position output; {srec.arch} has none (use sasrec, or positions=last)")


def pretrain(splits: dict[str, list[dict]], num_items: int, srec: SRecSection, *, max_len: int, seed: int,
             progress: bool = False) -> tuple[SRec, dict]:
    """Train the SRec the config's srec section describes (its defaults: configs/llara_default.yaml) on the
    training split, early-stopped on the validation split; returns (the best epoch's model, a report)."""
    check_pretrain_args(srec)
    arch, epochs, lr, batch_size, patience = srec.arch, srec.epochs, srec.lr, srec.batch_size, srec.patience
    loss, negatives, positions, init, stop_metric = srec.loss, srec.negatives, srec.positions, srec.init, srec.stop_metric
    val_users, eval_mask_history = srec.val_users, srec.eval_mask_history
    model_kwargs = {k: srec[k] for k in srec if k not in PRETRAIN_KEYS} | {"max_len": max_len}
    torch.manual_seed(seed)
    model = build_srec(arch, num_items, **model_kwargs)
    if init == "xavier":
        xavier_init(model)
    elif init == "normal":
        normal_init(model, srec.init_std)
    train = [s for s in splits["train"] if s["history"]]
    val = [s for s in splits.get("val", []) if s["history"]]
    if 0 <= val_users < len(val):
        log.info("validation on the first %d of %d validation users (srec.val_users=%d)", val_users, len(val), val_users)
        val = val[:val_users]
    else:
        log.info("validation on all %d validation users", len(val))
    if positions == "all":
        inputs, nexts = user_sequences(train, model.max_len)
        x, lengths = model.pad(inputs)
        y, _ = model.pad(nexts)
    else:
        x, lengths = model.pad([s["history"] for s in train])
        y = torch.as_tensor([s["target"] for s in train])
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, srec.adam_beta2), weight_decay=srec.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, best_ndcg, best_state, bad, history, stopped = -1.0, -1.0, None, 0, [], "epochs"
    bar = tqdm(range(epochs), desc=f"pretraining {arch}", disable=not progress)
    try:
        for epoch in bar:
            mean_loss = train_one_epoch(model, opt, x, lengths, y, num_items, batch_size, gen, loss, negatives, positions,
                                        progress=progress, desc=f"epoch {epoch + 1}/{epochs}")
            m = (evaluate(model, val, num_items, seed=seed, mask_history=eval_mask_history) if val
                 else dict.fromkeys(STOP_METRICS, 0.0))
            history.append({"epoch": epoch, "loss": mean_loss, "val_hr@10": m["hr@10"], "val_ndcg@10": m["ndcg@10"],
                            f"val_{stop_metric}": m[stop_metric]})
            bar.set_postfix(loss=f"{mean_loss:.4f}", val_ndcg10=f"{m['ndcg@10']:.4f}")
            log.info("%s epoch %d  loss %.4f  val HR@10 %.4f  NDCG@10 %.4f", arch, epoch, mean_loss, m["hr@10"], m["ndcg@10"])
            if m[stop_metric] > best:
                best, best_state, bad = m[stop_metric], copy.deepcopy(model.state_dict()), 0
                best_ndcg = m["ndcg@10"]
            else:
                bad += 1
                if bad >= patience:
                    stopped = "early stopping"
                    break
    except KeyboardInterrupt:  # Ctrl-C (SIGINT): keep the best epoch so far instead of losing the run
        if best_state is None:
            raise
        stopped = "interrupted"
        log.warning("interrupted after %d epochs: keeping the best one (validation %s %.4f)", len(history),
                    stop_metric, best)
    model.load_state_dict(best_state)
    model.eval().requires_grad_(False)
    return model, {"arch": arch, "best_val_ndcg@10": best_ndcg, "stop_metric": stop_metric, "best_val": best,
                   "full_ranking": protocol(eval_mask_history),
                   "stopped": stopped, "val_users": len(val), "epochs": history}


def train_one_epoch(model, opt, x, lengths, y, num_items, batch_size, gen, loss, negatives, positions,
                    progress: bool = False, desc: str = "") -> float:
    model.train()
    perm = torch.randperm(len(x), generator=gen)
    total, seen = 0.0, 0
    batches = tqdm(range(0, len(x), batch_size), desc=desc, unit="batch", leave=False, disable=not progress)
    for i in batches:
        idx = perm[i:i + batch_size]
        if positions == "all":
            batch_loss = all_positions_loss(model, x[idx], y[idx], num_items, gen, loss)
        elif loss == "ce":
            batch_loss = F.cross_entropy(model.scores(x[idx], lengths[idx]), y[idx])
        elif loss == "bce":  # only the target's and the negatives' scores are computed
            state = model.user_state(x[idx], lengths[idx])
            neg = torch.randint(0, num_items, (len(idx), negatives), generator=gen)
            pos_s = (state * model.item_vectors(y[idx])).sum(-1, keepdim=True)
            neg_s = (state[:, None] * model.item_vectors(neg)).sum(-1)
            batch_loss = F.binary_cross_entropy_with_logits(pos_s, torch.ones_like(pos_s)) + \
                F.binary_cross_entropy_with_logits(neg_s, torch.zeros_like(neg_s))
        else:  # check_pretrain_args refused it before
            raise AssertionError(loss)
        opt.zero_grad()
        batch_loss.backward()
        opt.step()
        total += batch_loss.item() * len(idx)
        seen += len(idx)
        batches.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
    return total / len(x)
