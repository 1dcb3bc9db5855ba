"""Remote models on NDIF (the National Deep Inference Fabric) through nnsight.

A remote run ships a *request*, never the model. nnsight serialises the body of the
``with model.trace(...)`` block by its source, together with only the values that body reads (token
ids, site paths, steering tensors: plain data and tensors); the model is named by a *model key* built
from its hub id, and NDIF runs the body against its own copy of that model. Only the values the body
marks with ``.save()`` come back.

This module holds what every remote run needs, on top of nnsight's own machinery (its
``RemoteBackend`` does the sending, waiting and polling; nothing here is a protocol of its own):

* :func:`api_key`: the user's NDIF key, from ``NDIF_API_KEY`` (or nnsight's own configuration); a run
  without one stops with a one-line error before any request is built;
* :func:`hub_id` and :func:`load_remote_model`: the model as NDIF serves it, held here on the ``meta``
  device (configuration and tokenizer, no weights);
* :func:`remote_backend`: nnsight's ``RemoteBackend`` for a model, or a dry run that builds the
  :class:`RemoteRequest` and sends nothing;
* :class:`RemoteJob`: a submitted non-blocking job, polled with ``status()`` and ``result()``.

``repe.capture`` (``capture(..., remote=True)``, ``submit_capture``, ``capture_request``) and
``steering.backends`` (``steered_logits(..., remote=True)``, ``submit_steered_logits``,
``steered_logits_request``) are the user-facing calls.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from repe.errors import ModelNotAvailableError, RepeError, require
from repe.models import DEFAULT_LAYERS_TEMPLATE, LoadedModel, identity_of

API_KEY_ENV = "NDIF_API_KEY"
HOST_ENV = "NDIF_HOST"
KEY_URL = "https://login.ndif.us"
# a hub repo id: "owner/name" (or a legacy single name such as "gpt2")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# how far a job has got, in nnsight's Status names (LOG is a message, not a stage)
_STAGES = ("RECEIVED", "QUEUED", "PROVISIONING", "DEPLOYING", "DISPATCHED", "RUNNING", "COMPLETED")

T = TypeVar("T")


class RemoteError(RepeError):
    """A remote run cannot start (no API key, no hub id), or its job failed on NDIF."""


def api_key() -> str:
    """The NDIF API key: ``NDIF_API_KEY`` from the environment, else nnsight's configured key (its
    config file or ``nnsight.CONFIG.set_default_api_key``). Raises a one-line :class:`RemoteError`
    naming the variable to set when there is none."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if key:
        return key
    nnsight = require("nnsight", "backends")
    key = (nnsight.CONFIG.API.APIKEY or "").strip()
    if key:
        return key
    raise RemoteError(
        f"remote=True needs an NDIF API key: set the environment variable {API_KEY_ENV} "
        f"(get a key at {KEY_URL})"
    )


def host() -> str:
    """The NDIF address: ``NDIF_HOST`` from the environment, else nnsight's configured host
    (``https://api.ndif.us``)."""
    value = os.environ.get(HOST_ENV, "").strip()
    if value:
        return value
    return str(require("nnsight", "backends").CONFIG.API.HOST)


def _check_hub_id(name: str, what: str) -> str:
    if not name or not _HUB_ID.match(name) or Path(name).exists():
        raise RemoteError(
            f"remote=True needs a model named by its hub id, the name NDIF serves it under "
            f"(e.g. repe.remote.load_remote_model('meta-llama/Llama-3.1-8B')); {what} {name!r}"
        )
    return name


def hub_id(lm: LoadedModel) -> str:
    """The hub repo id ``lm`` was loaded by (``load_model('owner/name')`` or
    :func:`load_remote_model`); a model loaded from a local folder (the embedded one included) has
    none, and a remote run is refused in one line."""
    return _check_hub_id(lm.source, "this model was loaded from")


def check_remote(lm: LoadedModel) -> None:
    """Everything a remote run needs before any request is built: an API key and a hub id."""
    api_key()
    hub_id(lm)


def load_remote_model(
    repo_id: str,
    *,
    layers_template: str = DEFAULT_LAYERS_TEMPLATE,
    dtype: torch.dtype | None = None,
    allow_download: bool = True,
) -> LoadedModel:
    """The hub model ``repo_id`` as NDIF serves it, held here without weights (``meta`` device).

    Only its configuration and tokenizer are read (a few small files, from the local Hugging Face
    cache or, with ``allow_download``, the hub); no weight is downloaded. Use it with
    ``remote=True``: a local run on it is refused. ``dtype`` only sets the dtype steering vectors are
    rounded to before they are sent (default: the dtype the configuration declares).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_hub_id(repo_id, "got")
    local = not allow_download
    try:
        config = AutoConfig.from_pretrained(repo_id, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(
            f"could not read the configuration and tokenizer of {repo_id!r} (no weights are "
            f"needed, but these files are; pass allow_download=True or fill the Hugging Face "
            f"cache). Cause: {exc}"
        ) from exc
    with torch.device("meta"):
        if dtype is None:
            model = AutoModelForCausalLM.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        identity=identity_of(model, repo_id),
        layers_template=layers_template,
        source=repo_id,
    )


def is_weightless(lm: LoadedModel) -> bool:
    """Whether ``lm`` holds no weights at all: every tensor on ``meta`` and no accelerate hook that
    would bring offloaded ones in (a model from :func:`load_remote_model`)."""
    model = lm.model
    tensors = itertools.chain(model.parameters(), model.buffers())
    if not all(t.device.type == "meta" for t in tensors):
        return False
    return not any(hasattr(m, "_hf_hook") for m in model.modules())


def refuse_weightless(lm: LoadedModel) -> None:
    """A model without weights (from :func:`load_remote_model`) runs only remotely."""
    if is_weightless(lm):
        raise RepeError(
            f"{lm.identity.name!r} is held without weights (meta device, for NDIF): "
            f"pass backend='nnsight', remote=True"
        )


class OnHost(LoadedModel):
    """``lm`` as the client of a remote run sees it: tensors that travel in a request (steering
    vectors, masks) are built on the CPU, whatever device (``meta`` included) the model is on."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def input_device(self) -> torch.device:
        return torch.device("cpu")

    def layer_device(self, layer: int) -> torch.device:
        return torch.device("cpu")

    @classmethod
    def of(cls, lm: LoadedModel) -> OnHost:
        fields = {f.name: getattr(lm, f.name) for f in dataclasses.fields(lm) if f.init}
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class RemoteRequest:
    """What a remote run would send to NDIF, built and not sent.

    ``payload`` is nnsight's serialised trace (``RequestModel.serialize``: the body's source, the values
    it reads, the tracer with the model call's inputs; zstd-compressed when ``compress``), the file
    part of ``POST {host}/request``; ``request`` is nnsight's ``RequestModel`` whose JSON
    (``request.metadata()``) is the form field beside it. The API key travels only in the
    ``ndif-api-key`` header at send time and is not held here.
    """

    host: str
    model_key: str
    request: Any
    payload: bytes

    @property
    def compress(self) -> bool:
        return bool(self.request.compress)

    @property
    def env(self) -> dict[str, Any]:
        return dict(self.request.env)

    @property
    def url(self) -> str:
        return f"{self.host}/request"


class DryRun:
    """An nnsight trace backend that builds the request exactly as ``RemoteBackend`` would
    (``RequestModel.serialize`` after registering local modules) and sends nothing."""

    def __init__(self, model_key: str, env: dict[str, Any], address: str) -> None:
        nnsight = require("nnsight", "backends")
        self.model_key = model_key
        self.env = env
        self.host = address
        self.compress = bool(nnsight.CONFIG.API.COMPRESS)
        self.built: RemoteRequest | None = None

    def __call__(self, tracer: Any) -> None:
        from nnsight.ndif import pull_env
        from nnsight.schema.request import RequestModel

        pull_env()
        payload = RequestModel.serialize(tracer, self.compress)
        request = RequestModel(model_key=self.model_key, compress=self.compress, env=self.env)
        self.built = RemoteRequest(self.host, self.model_key, request, payload)


class Keep:
    """Wraps a blocking ``RemoteBackend``: keeps the dict of saved values it returns (nnsight also
    writes them into the caller's frame)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.result: dict[str, Any] | None = None

    def __call__(self, tracer: Any) -> Any:
        self.result = self.inner(tracer)
        return self.result


def remote_backend(
    lm: LoadedModel, model: Any, *, blocking: bool = True, dry_run: bool = False
) -> Any:
    """nnsight's ``RemoteBackend`` for ``lm`` (wrapped by nnsight model ``model``), configured from
    the environment: API key, host, the model key of ``lm``'s hub id; or, with ``dry_run``, a
    :class:`DryRun`. The key is checked first, so nothing is built without one."""
    key = api_key()
    repo = hub_id(lm)
    model.repo_id = repo  # the wrapper was built over a module; the key names the hub model
    try:
        model_key = model.to_model_key()  # nnsight canonicalises the id on the hub (cached)
    except Exception as exc:
        raise RemoteError(
            f"could not resolve {repo!r} on the Hugging Face Hub to name it for NDIF "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    env = model._remoteable_get_env()
    if dry_run:
        return DryRun(model_key, env, host())
    from nnsight.intervention.backends.remote import RemoteBackend

    return RemoteBackend(model_key, host=host(), api_key=key, env=env, blocking=blocking)


class RemoteJob(Generic[T]):
    """Submitted non-blocking NDIF jobs (one per batch) and what to make of their saved values.

    Wraps nnsight's own non-blocking mechanism: each job is a ``RemoteBackend(blocking=False)`` that
    has posted its request and holds the ``job_id`` NDIF assigned; ``status()`` polls NDIF
    (``GET {host}/response/{job_id}``) and ``result()`` polls until every job is complete, downloads
    the saved values and turns them into the result. The handle lives in this process: it cannot be
    re-attached from another one.
    """

    def __init__(self, backends: list[Any], finish: Callable[[list[dict[str, Any]]], T]) -> None:
        self._backends = backends
        self._finish = finish
        self._results: list[dict[str, Any] | None] = [None] * len(backends)
        self._value: tuple[T] | None = None

    @property
    def job_ids(self) -> list[str]:
        return [str(b.job_id) for b in self._backends]

    def _poll(self, i: int) -> None:
        from nnsight.intervention.backends.remote import RemoteError as NNsightRemoteError

        backend = self._backends[i]
        try:
            result = backend.poll()
        except NNsightRemoteError as exc:
            raise RemoteError(f"NDIF job {backend.job_id} failed: {exc}") from exc
        if result is not None:
            self._results[i] = result

    def status(self) -> str:
        """Poll NDIF once for each job not complete yet; the least advanced stage among them
        (``RECEIVED``, ``QUEUED``, ..., ``RUNNING``, ``COMPLETED``). A failed job raises."""
        for i, result in enumerate(self._results):
            if result is None:
                self._poll(i)
        stages = []
        for backend, result in zip(self._backends, self._results, strict=True):
            if result is not None:
                stages.append("COMPLETED")
                continue
            name = getattr(backend.status, "value", backend.status) or "RECEIVED"
            stages.append(name if name in _STAGES else "RECEIVED")
        return min(stages, key=_STAGES.index)

    def done(self) -> bool:
        return self.status() == "COMPLETED"

    def result(self, timeout: float | None = None, poll_interval: float = 2.0) -> T:
        """Wait (polling every ``poll_interval`` s, at most ``timeout`` s) for every job, then return
        the result. Raises ``TimeoutError`` when time runs out (call again later)."""
        if self._value is not None:
            return self._value[0]
        start = time.monotonic()
        while True:
            stage = self.status()
            if stage == "COMPLETED":
                break
            if timeout is not None and time.monotonic() - start >= timeout:
                raise TimeoutError(
                    f"NDIF jobs {', '.join(self.job_ids)} not complete after {timeout} s "
                    f"(least advanced: {stage}); call result() again later"
                )
            time.sleep(poll_interval)
        done = [r for r in self._results if r is not None]
        self._value = (self._finish(done),)
        return self._value[0]
