"""feddale.method.adapters: LoRA state extraction, strict loading, defensive safetensors decoding."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save

from feddale.method import adapters, models
from feddale.method.adapters import AdapterError


@pytest.fixture(scope="module")
def lora_model():
    base, _ = models.load_causal_lm("tiny:llama", seed=0)
    model = models.add_lora(base, rank=4)
    with torch.no_grad():  # lora_B starts at zero; give the adapter non-trivial values
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.fixture(scope="module")
def state(lora_model):
    return adapters.adapter_state(lora_model)


@pytest.fixture(scope="module")
def meta(lora_model):
    return models.lora_meta(lora_model)


def test_state_holds_only_lora_tensors_with_stable_names(lora_model, state):
    assert len(state) == 2 * 4 * lora_model.config.num_hidden_layers  # A and B for q,k,v,o per layer
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in state
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    assert not any("default" in k or k.startswith("base_model") for k in state)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    # peft's adapter name must not leak into the keys
    other = get_peft_model(
        models.load_causal_lm("tiny:llama")[0],
        LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        adapter_name="client7",
    )
    assert set(adapters.adapter_state(other)) == set(state)
    assert adapters.adapter_shapes(lora_model) == {k: tuple(v.shape) for k, v in state.items()}


def test_state_is_a_copy(lora_model, state):
    first = next(iter(state))
    before = state[first].clone()
    with torch.no_grad():
        dict(adapters._lora_parameters(lora_model))[first].add_(1.0)
    try:
        assert torch.equal(state[first], before)
    finally:
        with torch.no_grad():
            dict(adapters._lora_parameters(lora_model))[first].sub_(1.0)


def test_round_trip_within_fp16(state, meta, lora_model):
    blob = adapters.adapter_to_bytes(state, meta)
    back, back_meta = adapters.adapter_from_bytes(blob, expected=adapters.adapter_shapes(lora_model))
    assert back_meta == meta
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert back[key].dtype == torch.float32
        torch.testing.assert_close(back[key], tensor, rtol=1e-3, atol=1e-4)
    # fp16 on the wire: about half the bytes of the fp32 payload
    assert len(blob) < sum(t.numel() for t in state.values()) * 2 + 4096


def test_load_adapter_state_changes_the_model_and_is_strict(state):
    fresh = models.add_lora(models.load_causal_lm("tiny:llama", seed=0)[0], rank=4)
    ids = torch.tensor([[1, 400, 500, 600, 700]])
    with torch.no_grad():
        before = fresh(input_ids=ids).logits
        adapters.load_adapter_state(fresh, state)
        after = fresh(input_ids=ids).logits
    assert not torch.allclose(before, after)
    loaded = adapters.adapter_state(fresh)
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    first = next(iter(state))
    with pytest.raises(AdapterError, match="1 missing"):
        adapters.load_adapter_state(fresh, {k: v for k, v in state.items() if k != first})
    with pytest.raises(AdapterError, match="1 unexpected"):
        adapters.load_adapter_state(fresh, {**state, "model.extra.lora_A.weight": torch.zeros(1)})
    with pytest.raises(AdapterError, match="has shape"):
        adapters.load_adapter_state(fresh, {**state, first: torch.zeros(3, 3)})


def test_rank_mismatch_is_rejected(state, meta):
    rank8 = models.add_lora(models.load_causal_lm("tiny:llama")[0], rank=8)
    blob = adapters.adapter_to_bytes(state, meta)
    with pytest.raises(AdapterError, match="has shape"):
        adapters.adapter_from_bytes(blob, expected=adapters.adapter_shapes(rank8))


def test_model_without_lora_has_no_state():
    with pytest.raises(AdapterError, match="no LoRA layers"):
        adapters.adapter_state(models.load_causal_lm("tiny:llama")[0])


# --------------------------------------------------------------------------- hostile blobs


def _forge(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> bytes:
    metadata = None if meta is None else {adapters.META_KEY: json.dumps(meta)}
    return save(tensors, metadata=metadata)


def test_truncated_and_garbage_blobs(state, meta):
    blob = adapters.adapter_to_bytes(state, meta)
    for bad in (b"", b"\x00" * 7, blob[: len(blob) // 2], blob[:-1], b"not safetensors at all, clearly"):
        with pytest.raises(AdapterError):
            adapters.adapter_from_bytes(bad)
    with pytest.raises(AdapterError, match="must be bytes"):
        adapters.adapter_from_bytes("a string")  # type: ignore[arg-type]


def test_forged_header(state, meta):
    blob = adapters.adapter_to_bytes(state, meta)
    (size,) = struct.unpack("<Q", blob[:8])
    with pytest.raises(AdapterError, match="header claims"):
        adapters.adapter_from_bytes(struct.pack("<Q", 10**12) + blob[8:])
    with pytest.raises(AdapterError, match="not valid JSON"):
        adapters.adapter_from_bytes(blob[:8] + b"{" * size + blob[8 + size :])
    # a header whose offsets point outside the data section
    header = json.loads(blob[8 : 8 + size])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, 10**9]
    raw = json.dumps(header).encode()
    with pytest.raises(AdapterError, match="not valid safetensors"):
        adapters.adapter_from_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + size :])


def test_non_lora_keys_are_rejected(state, meta):
    smuggled = {**state, "model.embed_tokens.weight": torch.zeros(4, 4)}
    with pytest.raises(AdapterError, match="not a LoRA matrix"):
        adapters.adapter_from_bytes(_forge(smuggled, meta))
    with pytest.raises(AdapterError, match="not a LoRA matrix"):
        adapters.adapter_to_bytes(smuggled, meta)


def test_non_float_and_non_finite_tensors_are_rejected(state, meta):
    key = next(iter(state))
    with pytest.raises(AdapterError, match="dtype"):
        adapters.adapter_from_bytes(_forge({**state, key: torch.ones(2, 2, dtype=torch.int64)}, meta))
    for value in (float("nan"), float("inf")):
        poisoned = state[key].clone()
        poisoned[0, 0] = value
        with pytest.raises(AdapterError, match="NaN or Inf"):
            adapters.adapter_from_bytes(_forge({**state, key: poisoned.half()}, meta))
        with pytest.raises(AdapterError, match="NaN or Inf"):
            adapters.adapter_to_bytes({**state, key: poisoned}, meta)
    with pytest.raises(AdapterError, match="overflow fp16"):
        adapters.adapter_to_bytes({**state, key: state[key] + 1e6}, meta)


def test_expected_keys_and_limits(state, meta, lora_model):
    expected = adapters.adapter_shapes(lora_model)
    first = next(iter(state))
    partial = {k: v for k, v in state.items() if k != first}
    with pytest.raises(AdapterError, match="1 missing"):
        adapters.adapter_from_bytes(adapters.adapter_to_bytes(partial, meta), expected)
    blob = adapters.adapter_to_bytes(state, meta)
    with pytest.raises(AdapterError, match="exceeds the limit"):
        adapters.adapter_from_bytes(blob, max_bytes=len(blob) - 1)
    assert adapters.adapter_from_bytes(blob, max_bytes=len(blob))[1] == meta
    with pytest.raises(AdapterError, match="lacks"):
        adapters.adapter_from_bytes(_forge({k: v.half() for k, v in state.items()}))
    with pytest.raises(AdapterError, match="no tensors"):
        adapters.adapter_to_bytes({}, meta)
    with pytest.raises(AdapterError, match="JSON"):
        adapters.adapter_to_bytes(state, {"bad": object()})
