"""feddale.method.teacher: LoRA next-token training and top-k session scoring on a tiny Llama."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from feddale.method import adapters, models, teacher
from feddale.method.preprocess import compact_view
from feddale.method.teacher import ScoreConfig, TeacherTrainConfig

SEP = " ;-; "
NORMAL = [
    "Receiving block blk_<*> src: /<*> dest: /<*>",
    "BLOCK* NameSystem.addStoredBlock: blockMap updated: /<*> is added to blk_<*> size <*>",
    "PacketResponder <*> for block blk_<*> terminating",
    "Received block blk_<*> of size <*> from /<*>",
]
ODD = "zebra quantum marmalade violin hurricane telescope"
NORMAL_TEXT = SEP.join(NORMAL)
RANDOM_TEXT = SEP.join(["purple elephants juggle", "seven onions dance wildly", "the moon owes me money"])


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama whose LoRA has learned the repetitive NORMAL session."""
    base, tok = models.load_causal_lm("tiny:llama?layers=1", seed=0)
    model = models.add_lora(base, rank=16)
    cfg = TeacherTrainConfig(steps=20, batch_size=2, micro_batch=2, lr=5e-2, lr_min=1e-3)
    stats = teacher.train_teacher(model, tok, [NORMAL_TEXT] * 8, cfg, progress=False)
    return model, tok, stats


def test_config_validation():
    with pytest.raises(ValidationError, match="lr_min"):
        TeacherTrainConfig(lr=1e-4, lr_min=1e-3)
    with pytest.raises(ValidationError, match="overlap"):
        ScoreConfig(max_len=64, overlap=64)
    with pytest.raises(ValidationError):
        ScoreConfig(kind="median")
    with pytest.raises(ValidationError):
        TeacherTrainConfig(stepz=3)


# --------------------------------------------------------------------------- encoding


def test_encoding_is_per_message_and_separator_tokens_belong_to_the_next_message(trained):
    _, tok, _ = trained
    (enc,) = teacher._Encoder(tok).encode(["Receiving block" + SEP + "Deleting block"])
    first = tok("Receiving block", add_special_tokens=False)["input_ids"]
    sep = tok(SEP, add_special_tokens=False)["input_ids"]
    second = tok("Deleting block", add_special_tokens=False)["input_ids"]
    assert enc.ids.tolist() == [tok.bos_token_id] + first + sep + second + [tok.eos_token_id]
    assert enc.message.tolist() == [0] * (1 + len(first)) + [1] * (len(sep) + len(second)) + [2]
    assert enc.n_messages == 3  # two messages and the end-of-session marker


def test_end_marker_can_be_switched_off_for_the_papers_recipe(trained):
    _, tok, _ = trained
    (enc,) = teacher._Encoder(tok, end_marker=False).encode(["Receiving block" + SEP + "Deleting block"])
    assert enc.ids.tolist()[-1] != tok.eos_token_id
    assert enc.n_messages == 2


def test_end_marker_flags_a_session_that_stops_early(trained):
    """A normal prefix that stops early scores as normal without the marker, as odd with it."""
    model, tok, _ = trained
    prefix = SEP.join(NORMAL[:2])
    with_end = teacher.score_texts(model, tok, [prefix], ScoreConfig(kind="worst_message", top_k=1), progress=False)
    without = teacher.score_texts(
        model, tok, [prefix], ScoreConfig(kind="worst_message", top_k=1, end_marker=False), progress=False
    )
    assert with_end[0] < without[0]


# --------------------------------------------------------------------------- training


def test_training_reduces_loss_and_reports_stats(trained):
    _, _, stats = trained
    assert stats["steps"] == 20 and stats["windows"] == 8 and stats["texts"] == 8
    assert stats["tokens"] > 0 and stats["seconds"] >= 0
    assert stats["loss_last"] < 0.6 * stats["loss_first"]


def test_training_is_seeded_and_windows_long_sessions():
    def run(seed):
        base, tok = models.load_causal_lm("tiny:llama", seed=0)
        model = models.add_lora(base)
        cfg = TeacherTrainConfig(steps=2, batch_size=2, micro_batch=1, max_len=16, seed=seed)
        stats = teacher.train_teacher(model, tok, [NORMAL_TEXT, RANDOM_TEXT], cfg, progress=False)
        return stats, adapters.adapter_state(model)

    (s1, a), (_, b), (_, c) = run(0), run(0), run(1)
    assert s1["windows"] > 2  # sessions longer than max_len were cut into windows
    assert s1["tokens"] <= 2 * 2 * 15
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_dedup_option():
    base, tok = models.load_causal_lm("tiny:llama")
    model = models.add_lora(base)
    cfg = TeacherTrainConfig(steps=1, batch_size=1, dedup=True)
    assert teacher.train_teacher(model, tok, [NORMAL_TEXT] * 5, cfg, progress=False)["texts"] == 1


def test_training_errors():
    base, tok = models.load_causal_lm("tiny:llama")
    with pytest.raises(ValueError, match="no texts"):
        teacher.train_teacher(models.add_lora(base), tok, [], TeacherTrainConfig(), progress=False)
    base, tok = models.load_causal_lm("tiny:llama")
    with pytest.raises(ValueError, match="no trainable parameters"):
        for p in base.parameters():
            p.requires_grad_(False)
        teacher.train_teacher(base, tok, [NORMAL_TEXT], TeacherTrainConfig(steps=1), progress=False)


# --------------------------------------------------------------------------- scoring


def test_learned_sessions_score_higher_than_random_text(trained):
    model, tok, _ = trained
    scores = teacher.score_texts(model, tok, [NORMAL_TEXT, RANDOM_TEXT], ScoreConfig(), progress=False)
    assert scores.shape == (2,) and scores.dtype == np.float64
    assert ((0 <= scores) & (scores <= 1)).all()
    assert scores[0] > 0.6 and scores[1] < 0.2


def test_worst_message_exposes_one_odd_event(trained):
    model, tok, _ = trained
    text = SEP.join(NORMAL * 3 + [ODD])
    mean, per_message = teacher.score_texts(
        model, tok, [text], ScoreConfig(kind="mean"), progress=False, return_messages=True
    )
    worst = teacher.score_texts(model, tok, [text], ScoreConfig(kind="worst_message"), progress=False)
    both = teacher.score_texts(model, tok, [text], ScoreConfig(kind="mean_worst"), progress=False)
    assert per_message[0].shape == (len(NORMAL) * 3 + 1 + 1,)  # + the end marker
    assert int(np.argmin(per_message[0][:-1])) == len(NORMAL) * 3  # the odd message is the worst event
    assert worst[0] == pytest.approx(per_message[0].min())
    assert worst[0] < mean[0] - 0.3
    assert both[0] == pytest.approx((mean[0] + worst[0]) / 2)


def test_windowed_scoring_covers_the_whole_session(trained):
    model, tok, _ = trained
    long_text = SEP.join(NORMAL * 4 + [ODD])
    (enc,) = teacher._Encoder(tok).encode([long_text])
    length = len(enc.ids)
    full, full_msgs = teacher.score_texts(
        model, tok, [long_text], ScoreConfig(max_len=length, overlap=16), progress=False, return_messages=True
    )
    roomy = teacher.score_texts(model, tok, [long_text], ScoreConfig(max_len=4 * length), progress=False)
    # the end marker is an extra last "message"; the odd event is what the windows must still find
    full_msgs, = [m[:-1] for m in full_msgs]
    assert roomy[0] == full[0]
    short, short_msgs = teacher.score_texts(
        model, tok, [long_text], ScoreConfig(max_len=48, overlap=16), progress=False, return_messages=True
    )
    # every message, including the late odd one, is still scored
    assert not np.isnan(short_msgs[0]).any()
    assert int(np.argmin(short_msgs[0][:-1])) == int(np.argmin(full_msgs)) == len(NORMAL) * 4
    assert 0 <= short[0] <= 1
    assert abs(short[0] - full[0]) < 0.2


@settings(max_examples=60, deadline=None)
@given(length=st.integers(2, 300), max_len=st.integers(2, 64), data=st.data())
def test_windows_count_every_target_exactly_once(length, max_len, data):
    overlap = data.draw(st.integers(0, max_len - 1))
    counted = np.zeros(length, dtype=int)
    for chunk in teacher._chunks([length], max_len, overlap):
        assert chunk.end - chunk.start <= max_len
        # a counted target has `overlap` tokens of context (at least one) inside its window
        assert chunk.count_from - chunk.start == (max(overlap, 1) if chunk.start else 1)
        counted[chunk.count_from : chunk.end] += 1
    assert counted[0] == 0 and (counted[1:] == 1).all()


def test_padding_and_batch_neighbours_do_not_change_scores(trained):
    model, tok, _ = trained
    short = SEP.join(NORMAL[:2])
    others = [SEP.join(NORMAL * 3), RANDOM_TEXT + SEP + ODD, NORMAL_TEXT]
    cfg = ScoreConfig(micro_batch=8, kind="mean_worst")
    alone = teacher.score_texts(model, tok, [short], cfg, progress=False)
    batched = teacher.score_texts(model, tok, others + [short], cfg, progress=False)
    assert batched[-1] == alone[0]
    one_by_one = [teacher.score_texts(model, tok, [t], cfg.model_copy(update={"micro_batch": 1}), progress=False)[0] for t in others]
    np.testing.assert_array_equal(batched[:-1], one_by_one)


def test_duplicates_are_scored_once_and_mapped_back(trained, monkeypatch):
    model, tok, _ = trained
    rows = []
    real_ranks = teacher._ranks

    def counting(model, ids, *args):
        rows.append(ids.shape[0])
        return real_ranks(model, ids, *args)

    monkeypatch.setattr(teacher, "_ranks", counting)
    texts = [NORMAL_TEXT, RANDOM_TEXT, NORMAL_TEXT, NORMAL_TEXT, RANDOM_TEXT]
    scores, msgs = teacher.score_texts(model, tok, texts, ScoreConfig(), progress=False, return_messages=True)
    assert sum(rows) == 2
    assert scores[0] == scores[2] == scores[3] and scores[1] == scores[4] and scores[0] != scores[1]
    assert len(msgs) == 5 and msgs[2] is not msgs[0]
    np.testing.assert_array_equal(msgs[0], msgs[3])


def test_larger_top_k_never_scores_lower(trained):
    model, tok, _ = trained
    texts = [NORMAL_TEXT, RANDOM_TEXT, SEP.join(NORMAL + [ODD])]
    k1 = teacher.score_texts(model, tok, texts, ScoreConfig(top_k=1), progress=False)
    k10 = teacher.score_texts(model, tok, texts, ScoreConfig(top_k=10), progress=False)
    assert (k10 >= k1).all() and (k10 > k1).any()


def test_scoring_leaves_model_mode_and_grads_alone(trained):
    model, tok, _ = trained
    model.train()
    teacher.score_texts(model, tok, [NORMAL_TEXT], ScoreConfig(), progress=False)
    assert model.training
    model.eval()


def test_scoring_errors(trained):
    model, tok, _ = trained
    with pytest.raises(ValueError, match="no texts"):
        teacher.score_texts(model, tok, [], ScoreConfig(), progress=False)
    with pytest.raises(ValueError, match="expected str"):
        teacher.score_texts(model, tok, [None], ScoreConfig(), progress=False)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no tokens to score"):
        teacher.score_texts(model, tok, [NORMAL_TEXT, " "], ScoreConfig(), progress=False)


def test_surprise_is_the_worst_message_log_probability(trained):
    model, tok, _ = trained
    text = SEP.join(NORMAL * 2 + [ODD])
    surprise = teacher.score_texts(model, tok, [text], ScoreConfig(kind="surprise"), progress=False)
    _, details = teacher.score_texts(model, tok, [text], ScoreConfig(), progress=False, return_details=True)
    logp = details[0]["logp"]
    assert (logp < 0).all()  # real log-probs are computed when details are asked for
    assert int(np.argmin(logp[:-1])) == len(NORMAL) * 2  # the odd message is the most surprising
    assert surprise[0] == pytest.approx(teacher.surprise_score(float(np.nanmin(logp))))


def test_compact_view_scores_each_session_as_its_compact_text(trained):
    model, tok, _ = trained
    repeated = SEP.join(NORMAL + NORMAL[:2])
    compact_cfg = ScoreConfig(view="compact", micro_batch=2)
    full_cfg = ScoreConfig(view="full", micro_batch=2)
    got = teacher.score_texts(model, tok, [repeated, NORMAL_TEXT], compact_cfg)
    want = teacher.score_texts(model, tok, [compact_view(repeated), NORMAL_TEXT], full_cfg)
    np.testing.assert_allclose(got, want)
    # the compact form differs from the full one: the view really changed what was scored
    assert compact_view(repeated) != repeated
    assert teacher.score_texts(model, tok, [repeated], full_cfg)[0] != pytest.approx(got[0])


def test_compact_view_training_sees_fewer_tokens():
    base, tok = models.load_causal_lm("tiny:llama?layers=1", seed=0)
    model = models.add_lora(base, rank=4)
    texts = [SEP.join(NORMAL * 4)] * 4
    stats = {
        view: teacher.train_teacher(
            model, tok, texts, TeacherTrainConfig(steps=1, batch_size=2, max_len=4096, view=view), progress=False
        )
        for view in ("full", "compact")
    }
    assert stats["compact"]["tokens"] < stats["full"]["tokens"] / 2


def test_one_pass_scores_every_top_k_like_separate_passes(trained):
    model, tok, _ = trained
    texts = [NORMAL_TEXT, RANDOM_TEXT, SEP.join([NORMAL[0], ODD])]
    many = teacher.score_by_top_k(model, tok, texts, ScoreConfig(micro_batch=2), [1, 3, 5], progress=False)
    for k in (1, 3, 5):
        alone = teacher.score_texts(model, tok, texts, ScoreConfig(top_k=k, micro_batch=2), progress=False)
        np.testing.assert_allclose(many[k], alone)
    assert (many[1] <= many[5]).all() and (many[1] < many[5]).any()
    with pytest.raises(ValueError, match="top_ks"):
        teacher.score_by_top_k(model, tok, texts, ScoreConfig(), [0])
