"""The teacher pipeline on the real bundled weights: SmolLM2-135M (GGUF) and MiniLM.

Slow (about a minute on 2 cores): two GGUF loads and a few CPU training steps. Run with
``pytest -m real``; deselect with ``-m "not real"``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from feddale.method import adapters, models, teacher
from feddale.method.preprocess import join_messages, mask

pytestmark = pytest.mark.real

RAW_SESSIONS = [
    [
        "Receiving block blk_-1608999687919862906 src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
        "BLOCK* NameSystem.allocateBlock: /mnt/hadoop/mapred/system/job_200811092030_0001/job.jar. blk_-1608999687919862906",
        "PacketResponder 1 for block blk_-1608999687919862906 terminating",
        "Received block blk_-1608999687919862906 of size 91178 from /10.250.10.6",
    ],
    [
        "Receiving block blk_7503483334202473044 src: /10.251.215.16:55695 dest: /10.251.215.16:50010",
        "PacketResponder 0 for block blk_7503483334202473044 terminating",
        "Received block blk_7503483334202473044 of size 233217 from /10.251.215.16",
        "BLOCK* NameSystem.addStoredBlock: blockMap updated: 10.251.215.16:50010 is added to blk_7503483334202473044 size 233217",
    ],
    [
        "Receiving block blk_-3544583377289625738 src: /10.250.19.102:39325 dest: /10.250.19.102:50010",
        "writeBlock blk_-3544583377289625738 received exception java.io.IOException: Could not read from stream",
        "PacketResponder 2 for block blk_-3544583377289625738 Interrupted.",
    ],
]


def test_smollm2_train_score_export_reload():
    texts = [join_messages(mask(line) for line in session) for session in RAW_SESSIONS]
    assert "blk_<*>" in texts[0] and "10.250" not in texts[0]

    base, tok = models.load_causal_lm("builtin:smollm2-135m", quantization="none")
    assert base.config.model_type == "llama" and base.config.feddale_ref == "builtin:smollm2-135m"
    model = models.add_lora(base, rank=8, seed=0)
    stats = teacher.train_teacher(
        model, tok, texts[:2] * 2, teacher.TeacherTrainConfig(steps=2, batch_size=2, micro_batch=2, max_len=64), progress=False
    )
    assert np.isfinite([stats["loss_first"], stats["loss_last"]]).all()

    cfg = teacher.ScoreConfig(max_len=64, overlap=16, kind="mean_worst")
    trained_scores = teacher.score_texts(model, tok, texts, cfg, progress=False)
    assert ((trained_scores > 0) & (trained_scores <= 1)).all()

    meta = models.lora_meta(model)
    blob = adapters.adapter_to_bytes(adapters.adapter_state(model), meta)
    state, got_meta = adapters.adapter_from_bytes(blob, expected=adapters.adapter_shapes(model))
    assert got_meta["base"] == "builtin:smollm2-135m" and got_meta["rank"] == 8
    n_values = sum(t.numel() for t in state.values())
    assert n_values == 30 * 8 * (576 + 576 + 576 + 192 + 576 + 192 + 576 + 576)  # q, k, v, o: A and B
    assert 2 * n_values < len(blob) < 2 * n_values + 64_000  # fp16 on the wire, ~1.8 MB

    fresh_base, fresh_tok = models.load_causal_lm("builtin:smollm2-135m", quantization="none")
    fresh = models.add_lora(fresh_base, rank=8, seed=1)  # another init: the upload must overwrite it
    adapters.load_adapter_state(fresh, state)
    reloaded = teacher.score_texts(fresh, fresh_tok, texts, cfg, progress=False)
    adapters.load_adapter_state(model, state)  # the sender with the same fp16-rounded adapter
    np.testing.assert_array_equal(reloaded, teacher.score_texts(model, tok, texts, cfg, progress=False))
    np.testing.assert_allclose(reloaded, trained_scores, atol=0.05)  # fp16 rounding barely matters


def test_minilm_classifier_loads_and_batches():
    model, tok = models.load_classifier("builtin:minilm-l6", num_labels=2, seed=0)
    lora = models.add_lora(model, task="classifier")
    batch = tok(["Receiving block blk_<*>", "PacketResponder <*> for block blk_<*> terminating"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = lora(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert models.describe(lora)["trainable_params"] < 0.05 * models.describe(lora)["params"]
