"""Teacher side of FedDALE: unsupervised LoRA next-token training and session scoring.

A teacher learns what its client's (masked, unlabeled) sessions look like by plain
next-token prediction. It then scores sessions by top-k next-token accuracy: a token is a
*hit* when it is among the k tokens the model ranked highest at the previous position. Normal
sessions are predictable (score near 1), unusual ones are not. Scores are the only thing a
client uploads about the public set, so they must not depend on batching, padding, duplicate
texts or the model's context length — hence the care taken below.

Token ids are built per message (each message tokenized alone, joined with the tokenized
separator, after one start token) so every predicted token belongs to exactly one message;
separator tokens belong to the message they introduce. Training and scoring share this
encoding, so the model is scored on exactly the token stream it was trained on.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from feddale.method.config import Autocast, ScoreConfig, TeacherTrainConfig
from feddale.method.models import autocast
from feddale.method.preprocess import SEPARATOR, as_view, window, window_spans


# Largest logits block (elements) materialised at once while scoring: 32M fp32 = 128 MB.
_LOGIT_BUDGET = 32 * 1024 * 1024
# Mean token log-probability (nats) at which a message's surprise score reaches 0.
SURPRISE_SCALE = 10.0


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Encoded:
    """Token ids of one session and, per token, the index of the message it belongs to."""

    ids: np.ndarray
    message: np.ndarray
    n_messages: int


class _Encoder:
    """Per-message tokenization with a cache: log sessions repeat the same few messages."""

    def __init__(self, tokenizer, end_marker: bool = True):
        self.tokenizer = tokenizer
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        # The start token makes the first real token a prediction target too.
        self.start = [] if start is None else [int(start)]
        # The end token makes "the session stops here" a prediction target of its own: a session
        # that stops early (a write abandoned after allocateBlock) is otherwise a perfectly
        # predictable prefix of a normal one. It counts as one extra message.
        eos = tokenizer.eos_token_id
        self.end = [int(eos)] if end_marker and eos is not None else []
        self.separator = self._tokenize([SEPARATOR])[0]
        self._cache: dict[str, list[int]] = {}

    def _tokenize(self, messages: list[str]) -> list[list[int]]:
        return self.tokenizer(messages, add_special_tokens=False)["input_ids"]

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        split = [text.split(SEPARATOR) for text in texts]
        todo = list(dict.fromkeys(m for messages in split for m in messages if m not in self._cache))
        if todo:
            self._cache.update(zip(todo, self._tokenize(todo)))
        return [self._join(messages) for messages in split]

    def _join(self, messages: list[str]) -> Encoded:
        ids: list[int] = list(self.start)
        owner: list[int] = [0] * len(self.start)
        for i, message in enumerate(messages):
            piece = (self.separator if i else []) + self._cache[message]
            ids.extend(piece)
            owner.extend([i] * len(piece))
        ids.extend(self.end)
        owner.extend([len(messages)] * len(self.end))
        n_messages = len(messages) + (1 if self.end else 0)
        return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(owner, dtype=np.int64), n_messages)


# --------------------------------------------------------------------------- helpers


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad(rows: Sequence[np.ndarray], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows; with causal attention, right padding cannot affect real positions."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; load it with feddale.method.models.load_causal_lm")
    return int(tokenizer.pad_token_id)


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    texts = list(texts)
    if not texts:
        raise ValueError(f"no texts to {what}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text {i} is {type(text).__name__}, expected str")
        if not text.strip():
            raise ValueError(f"text {i} is empty: there are no tokens to {what}")
    return texts


@contextlib.contextmanager
def _mode(model, training: bool):
    """Switch train/eval for the duration of a call and restore the caller's mode."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- training


class _WindowSampler:
    """Seeded epochs over all windows: every window is seen before any is repeated."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.queue: list[int] = []

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if not self.queue:
                self.queue = self.rng.permutation(self.n).tolist()
            out.append(self.queue.pop())
        return out


def train_teacher(model, tokenizer, texts: Sequence[str], cfg: TeacherTrainConfig, progress: bool = True) -> dict:
    """Fine-tune the model's trainable (LoRA) parameters by next-token prediction on ``texts``.

    Sessions longer than ``cfg.max_len`` tokens are cut into windows and windows are sampled
    (seeded) without replacement per epoch. Each optimizer step averages the loss over all
    non-pad target tokens of ``cfg.batch_size`` windows, accumulated in micro-batches.
    Returns stats: steps, windows, tokens, loss_first, loss_last, seconds.
    """
    texts = [as_view(t, cfg.view) for t in _check_texts(texts, "train on")]
    if cfg.dedup:
        texts = list(dict.fromkeys(texts))
    windows = [
        np.asarray(w)
        for enc in _Encoder(tokenizer, cfg.end_marker).encode(texts)
        for w in window(enc.ids.tolist(), cfg.max_len)
        if len(w) >= 2
    ]
    if not windows:
        raise ValueError("texts contain no tokens to learn from")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters; wrap it with feddale.method.models.add_lora first")

    device = _device(model)
    pad_id = _pad_id(tokenizer)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps, eta_min=cfg.lr_min)
    sampler = _WindowSampler(len(windows), cfg.seed)
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), _mode(model, training=True):
        torch.manual_seed(cfg.seed)  # dropout masks
        bar = tqdm(range(cfg.steps), desc="teacher", disable=not progress, leave=False)
        for _ in bar:
            batch = sorted((windows[i] for i in sampler.take(cfg.batch_size)), key=len)
            targets = sum(len(w) - 1 for w in batch)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for start in range(0, len(batch), cfg.micro_batch):
                ids, mask = _pad(batch[start : start + cfg.micro_batch], pad_id, device)
                with autocast(device, cfg.autocast):
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                loss = F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                ) / targets
                loss.backward()
                step_loss += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            losses.append(step_loss)
            tokens += targets
            bar.set_postfix(loss=f"{step_loss:.3f}")
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"teacher training diverged (losses {losses}); lower lr")
    return {
        "steps": cfg.steps,
        "texts": len(texts),
        "windows": len(windows),
        "tokens": tokens,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "seconds": round(time.perf_counter() - started, 3),
    }


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class _Chunk:
    """One model input: tokens [start, end) of text ``text``; hits counted for targets >= count_from."""

    text: int
    start: int
    end: int
    count_from: int


def _chunks(lengths: Sequence[int], max_len: int, overlap: int) -> list[_Chunk]:
    """Windows whose counted targets partition each text's targets 1..L-1 exactly once.

    A later window counts only the targets after its first ``overlap`` tokens, so every
    counted target has at least ``overlap`` tokens of context (or all of them, in the first).
    At least one token always overlaps: a window's first token is context, never a target.
    """
    context = max(overlap, 1)
    chunks = []
    for t, length in enumerate(lengths):
        for k, (start, end) in enumerate(window_spans(length, max_len, context)):
            chunks.append(_Chunk(t, start, end, start + (context if k else 1)))
    return chunks


def _head_and_body(model):
    """Split an (optionally peft-wrapped) causal LM into transformer body and LM head.

    Running the head over slices of positions keeps at most one slice of vocabulary-sized
    logits alive instead of [batch, seq, vocab] at once.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def _ranks(
    model, ids: torch.Tensor, mask: torch.Tensor, precision: Autocast, with_logp: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per position p: the rank of token p+1 among the predictions ([batch, seq-1]), and its log-prob.

    The rank is the number of vocabulary entries scored strictly higher than the true next
    token, so "a top-k hit" is ``rank < k`` for every k at once: one pass serves any top-k.
    The log-softmax over the vocabulary is a pass of its own over every logit, so it is only
    computed when asked for (``with_logp``); otherwise the log-probs come back as zeros.
    """
    body, head = _head_and_body(model)
    with autocast(ids.device, precision):
        hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        vocab = head.weight.shape[0]
        step = max(1, _LOGIT_BUDGET // (ids.shape[0] * vocab))
        out, logps = [], []
        for a in range(0, ids.shape[1] - 1, step):
            b = min(a + step, ids.shape[1] - 1)
            logits = head(hidden[:, a:b]).float()
            target = logits.gather(-1, ids[:, a + 1 : b + 1, None])
            out.append((logits > target).sum(-1, dtype=torch.int32))
            if with_logp:
                logps.append(target.squeeze(-1) - logits.logsumexp(-1))
            else:
                logps.append(torch.zeros(logits.shape[:2], device=logits.device))
    return torch.cat(out, dim=1).cpu().numpy(), torch.cat(logps, dim=1).cpu().numpy()


def surprise_score(mean_logp: float) -> float:
    """Map a message's mean token log-probability to [0, 1]: 0 nats -> 1, -SURPRISE_SCALE or less -> 0.

    Linear in log-probability so the 1-byte payload keeps 255 even steps of surprise.
    """
    return float(np.clip(1.0 + mean_logp / SURPRISE_SCALE, 0.0, 1.0))


def _combine(encoded: Encoded, hits: np.ndarray, logp: np.ndarray, kind: str) -> tuple[float, np.ndarray, np.ndarray]:
    """Session score, per-message hit rates and per-message mean log-probs (NaN: no predicted token)."""
    owner = encoded.message[1:]
    counts = np.bincount(owner, minlength=encoded.n_messages)

    def per_message(values: np.ndarray) -> np.ndarray:
        sums = np.bincount(owner, weights=values, minlength=encoded.n_messages)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    hit = hits[1:].astype(np.float64)
    rates, logps = per_message(hit), per_message(logp[1:].astype(np.float64))
    mean = float(hit.mean())
    worst = float(np.nanmin(rates))
    score = {
        "mean": lambda: mean,
        "worst_message": lambda: worst,
        "mean_worst": lambda: (mean + worst) / 2,
        "surprise": lambda: surprise_score(float(np.nanmin(logps))),
    }[kind]()
    return score, rates, logps


def _score_pass(
    model, tokenizer, texts: Sequence[str], cfg: ScoreConfig, progress: bool, with_logp: bool
) -> tuple[list[str], list[str], list[Encoded], list[np.ndarray], list[np.ndarray]]:
    """Run the model once over every distinct text (in ``cfg.view``); per-token target ranks and log-probs."""
    texts = [as_view(t, cfg.view) for t in _check_texts(texts, "score")]
    distinct = list(dict.fromkeys(texts))
    encoded = _Encoder(tokenizer, cfg.end_marker).encode(distinct)
    for i, enc in enumerate(encoded):
        if len(enc.ids) < 2:
            raise ValueError(f"text {distinct[i]!r} has no tokens to score")
    chunks = sorted(
        _chunks([len(e.ids) for e in encoded], cfg.max_len, cfg.overlap), key=lambda c: c.end - c.start, reverse=True
    )
    ranks = [np.zeros(len(e.ids), dtype=np.int32) for e in encoded]
    logps = [np.zeros(len(e.ids), dtype=np.float32) for e in encoded]
    device = _device(model)
    pad_id = _pad_id(tokenizer)
    with torch.inference_mode(), _mode(model, training=False):
        bar = tqdm(total=len(chunks), desc="score", disable=not progress, leave=False)
        for i in range(0, len(chunks), cfg.micro_batch):
            group = chunks[i : i + cfg.micro_batch]
            ids, mask = _pad([encoded[c.text].ids[c.start : c.end] for c in group], pad_id, device)
            batch_ranks, batch_logps = _ranks(model, ids, mask, cfg.autocast, with_logp)
            for row, logp_row, c in zip(batch_ranks, batch_logps, group):
                # target position p (global) was predicted at local position p - start - 1
                local = slice(c.count_from - c.start - 1, c.end - c.start - 1)
                ranks[c.text][c.count_from : c.end] = row[local]
                logps[c.text][c.count_from : c.end] = logp_row[local]
            bar.update(len(group))
        bar.close()
    return texts, distinct, encoded, ranks, logps


def score_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    cfg: ScoreConfig,
    progress: bool = True,
    return_messages: bool = False,
    return_details: bool = False,
) -> np.ndarray | tuple[np.ndarray, list]:
    """Score sessions in [0, 1]; HIGH = normal-looking (the teacher predicted them well).

    ``kind``: ``mean`` = top-k hit rate over all predicted tokens (the paper's per-sample
    accuracy); ``worst_message`` = the lowest per-message hit rate, so one odd event is not
    drowned by a long normal session; ``mean_worst`` = their average; ``surprise`` = the
    lowest per-message mean token log-probability, mapped to [0, 1] by ``surprise_score``
    (graded where hit rates tie: a rare event's first token is far less likely than a
    common alternative even when neither is in the top k). Whole sessions are
    scored: longer ones in windows of ``max_len`` with ``overlap`` tokens of context, each
    token counted once. Each distinct text is scored once. With ``return_messages`` also
    returns, per text, its per-message hit rates; with ``return_details`` a dict per text
    with per-message ``hit_rate`` and mean ``logp``.
    """
    texts, distinct, encoded, ranks, logps = _score_pass(
        model, tokenizer, texts, cfg, progress, with_logp=cfg.kind == "surprise" or return_details
    )
    hits = [r < cfg.top_k for r in ranks]
    results = [_combine(enc, h, lp, cfg.kind) for enc, h, lp in zip(encoded, hits, logps)]
    where = {text: i for i, text in enumerate(distinct)}
    scores = np.asarray([results[where[t]][0] for t in texts], dtype=np.float64)
    if return_details:
        return scores, [{"hit_rate": results[where[t]][1], "logp": results[where[t]][2]} for t in texts]
    if return_messages:
        return scores, [results[where[t]][1].copy() for t in texts]
    return scores


def score_by_top_k(
    model, tokenizer, texts: Sequence[str], cfg: ScoreConfig, top_ks: Sequence[int], progress: bool = True
) -> dict[int, np.ndarray]:
    """Session scores as ``score_texts`` gives them, for several top-k at the cost of one pass.

    Why: the top-k of the accuracy metric is a hyper-parameter worth measuring (the paper's
    ablation), and scoring is the expensive part of a client's work.
    """
    if not top_ks or min(top_ks) < 1:
        raise ValueError(f"top_ks must be a non-empty list of integers >= 1, got {list(top_ks)}")
    texts, distinct, encoded, ranks, logps = _score_pass(
        model, tokenizer, texts, cfg, progress, with_logp=cfg.kind == "surprise"
    )
    where = {text: i for i, text in enumerate(distinct)}
    out = {}
    for k in top_ks:
        per_text = [_combine(enc, r < k, lp, cfg.kind)[0] for enc, r, lp in zip(encoded, ranks, logps)]
        out[int(k)] = np.asarray([per_text[where[t]] for t in texts], dtype=np.float64)
    return out
