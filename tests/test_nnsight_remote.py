"""Remote runs on NDIF through nnsight, tested with no network.

What would be sent is built for real (nnsight's own ``RequestModel.serialize`` through its
``RemoteBackend``); the network layer (``httpx`` for the POST / poll / download and ``websocket`` for a
blocking job's status stream) is replaced by a fake NDIF that does what NDIF's model actor does with a
request: ``RequestModel.deserialize`` against its model's persistent objects, ``tracer.execute`` inside
a trace scope, and only the ``nnsight.save()``-marked values back. The fake server refuses to load
anything of this workbench (NDIF does not have it) and runs the tiny model with real weights; the
client holds the same model without weights (``meta``), named by a hub id. Every real socket is
refused.

Parity is relative, ``|a - b| <= 1e-4 * max|a|`` (see ARCHITECTURE.md).
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import linecache
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import repe
from repe.backends.nnsight import _MODELS, NNsightBackend, get_nnsight_model
from repe.batching import TokenBatch, encode, make_batch
from repe.capture import capture_request, submit_capture
from repe.directions import Direction
from repe.errors import RepeError
from repe.models import LoadedModel
from repe.remote import OnHost, RemoteError, is_weightless, load_remote_model, remote_backend
from repe.sites import resolve_sites
from steering import SteeringSpec
from steering.backends import steered_logits, steered_logits_request, submit_steered_logits
from steering.operators import OPERATORS, Operator
from steering.spec import resolve

nnsight = pytest.importorskip("nnsight")
zstd = pytest.importorskip("zstandard")
httpx = pytest.importorskip("httpx")
websocket = pytest.importorskip("websocket")

from nnsight.intervention.serialization import CustomCloudUnpickler  # noqa: E402
from nnsight.schema.request import RequestModel  # noqa: E402
from nnsight.schema.response import ResponseModel, Status  # noqa: E402
from nnsight.tracing.globals import BLOCKS, SOURCES  # noqa: E402
from nnsight.tracing.tracer import _saves, dec, inc  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = "test-org/tiny-random-llama"
KEY = "ndif-test-key-0123"
HOST = "https://ndif.invalid"
TEXTS = [
    "The weather today is",
    "Hi",
    "A long sentence about the history of rivers and the people who lived by them",
]
CAPTURE_SITES = [
    "blocks.0.hook_resid_pre",
    "blocks.0.attn.hook_z",
    "blocks.1.hook_attn_out",
    "blocks.2.hook_mlp_out",
    "blocks.3.hook_resid_post",
]
STEER_SITES = [
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_attn_out",
    "blocks.2.hook_mlp_out",
    "blocks.3.hook_resid_post",
]
# what NDIF does not have: the workbench and its tests
OURS = ("repe", "probes", "steering", "app", "studies", "tests", "conftest")
MODEL_KEY = "nnsight.modeling.transformers.TransformersModel:" + json.dumps(
    {"repo_id": REPO, "revision": None, "task": "text-generation"}
)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp(min=1e-6))


# ---- the client: the tiny model as NDIF would serve it, held without weights ------------------------


@pytest.fixture(scope="module")
def remote_lm(tiny_lm: LoadedModel) -> Iterator[LoadedModel]:
    """``load_remote_model`` of a hub id whose configuration and tokenizer are the tiny model's (read
    from fakes: nothing is downloaded, and loading weights is refused)."""
    import transformers

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("load_remote_model must not load weights")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            transformers.AutoConfig,
            "from_pretrained",
            lambda *a, **k: copy.deepcopy(tiny_lm.model.config),
        )
        mp.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_lm.tokenizer)
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
        lm = load_remote_model(REPO)
    yield lm


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's key and host come from the environment; the hub id resolves without the Hub."""
    import nnsight.modeling.huggingface as hf_models

    monkeypatch.setenv("NDIF_API_KEY", KEY)
    monkeypatch.setenv("NDIF_HOST", HOST)
    monkeypatch.setitem(hf_models._ID_CACHE, REPO, REPO)
    monkeypatch.setattr(nnsight.CONFIG.APP, "REMOTE_LOGGING", False)


@pytest.fixture(autouse=True, scope="module")
def by_value_registry() -> Iterator[None]:
    """nnsight registers every importable non-installed module (the test files among them) with
    cloudpickle for by-value pickling before its first request, process-wide; undo that for the
    tests that run after these."""
    import nnsight.ndif
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES

    before, pulled = set(_PICKLE_BY_VALUE_MODULES), nnsight.ndif._PULLED_ENV
    yield
    _PICKLE_BY_VALUE_MODULES.clear()
    _PICKLE_BY_VALUE_MODULES.update(before)
    nnsight.ndif._PULLED_ENV = pulled


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Any attempt to open a real connection fails the test."""
    tried: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        tried.append(repr(args[:2]))
        raise OSError("the test suite has no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield tried
    assert tried == [], f"a real connection was attempted: {tried}"


# ---- the server: what NDIF's model actor does with a request ----------------------------------------


ROOT = Path(__file__).resolve().parents[1]


class NotOnNDIF(ModuleNotFoundError):
    """The payload needs code of the workbench, which NDIF does not have."""


def _ours(module: str | None) -> bool:
    return bool(module) and str(module).split(".")[0] in OURS


def _our_file(filename: str) -> bool:
    path = Path(filename.rsplit("] ", 1)[-1])
    return any(path.is_relative_to(ROOT / top) for top in OURS)


class WithoutWorkbench(CustomCloudUnpickler):
    """nnsight's unpickler on a server that has none of the workbench. A reference to one of its
    modules fails as it would on NDIF; so does its code shipped by value (a function rebuilt from its
    source, a class or function rebuilt by cloudpickle): under pytest the shape checker's import hook
    wraps the workbench's functions, and cloudpickle then ships them by value instead of failing.
    Records every module the payload references."""

    seen: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        WithoutWorkbench.seen.add(module)
        if _ours(module):
            raise NotOnNDIF(f"No module named {module!r} (NDIF does not have it)")
        found = super().find_class(module, name)
        if (module, name) == ("nnsight.intervention.serialization", "_load_function"):
            return _checked_load_function(found)
        if (module, name) == ("cloudpickle.cloudpickle", "_make_skeleton_class"):
            return _checked_skeleton_class(found)
        if (module, name) == ("cloudpickle.cloudpickle", "_make_function"):
            return _checked_make_function(found)
        return found


def _checked_load_function(load: Any) -> Any:
    def checked(source: str, name: str, *args: Any) -> Any:
        if _our_file(args[-2]):
            raise NotOnNDIF(f"the request ships {name}() from {args[-2]} (the workbench)")
        return load(source, name, *args)

    return checked


def _checked_skeleton_class(make: Any) -> Any:
    def checked(constructor: Any, name: str, bases: Any, type_kwargs: Any, *args: Any) -> Any:
        if _ours(type_kwargs.get("__module__")):
            raise NotOnNDIF(f"the request ships class {name} of {type_kwargs['__module__']}")
        return make(constructor, name, bases, type_kwargs, *args)

    return checked


def _checked_make_function(make: Any) -> Any:
    def checked(code: Any, glbls: Any, name: Any, *args: Any) -> Any:
        if _ours(glbls.get("__name__")) or _our_file(code.co_filename):
            raise NotOnNDIF(f"the request ships {code.co_name}() of {glbls.get('__name__')}")
        return make(code, glbls, name, *args)

    return checked


def execute(server: Any, payload: bytes, compress: bool) -> dict[str, Any]:
    """Deserialise and run a request as NDIF's model actor does, returning what it would send back."""
    snapshot = (dict(linecache.cache), dict(SOURCES), dict(BLOCKS))
    _, lock = _MODELS.get(server.lm)
    try:
        with lock:
            tracer = RequestModel.deserialize(
                payload,
                server.model._remoteable_persistent_objects(),
                compress=compress,
                unpickler=WithoutWorkbench,
            )
            inc()
            try:
                tracer.execute(tracer.info.code)
                marked = _saves()
                return {
                    name: value
                    for name, value in tracer.info.frame.f_locals.items()
                    if id(value) in marked
                }
            finally:
                dec()
    finally:  # the block's source was registered under the client's file name: put things back
        linecache.cache.clear()
        linecache.cache.update(snapshot[0])
        SOURCES.clear()
        SOURCES.update(snapshot[1])
        BLOCKS.clear()
        BLOCKS.update(snapshot[2])


def result_blob(saved: dict[str, Any], compress: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    data = buffer.getvalue()
    return zstd.ZstdCompressor(level=3).compress(data) if compress else data


class Server:
    """The tiny model with real weights, as NDIF's copy of ``REPO``."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.model = get_nnsight_model(lm)

    def run(self, payload: bytes, compress: bool) -> dict[str, Any]:
        return execute(self, payload, compress)


@pytest.fixture(scope="module")
def server(tiny_lm: LoadedModel) -> Server:
    return Server(tiny_lm)


class FakeResponse:
    def __init__(self, status: int = 200, text: str = "", content: bytes = b"") -> None:
        self.status_code = status
        self.text = text
        self.content = content
        self.headers = {"Content-Length": str(len(content))}

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise httpx.HTTPStatusError(
                f"{self.status_code}",
                request=None,
                response=self,  # type: ignore[arg-type]
            )

    def json(self) -> Any:
        return json.loads(self.text)

    def iter_bytes(self, chunk_size: int = 1024) -> Iterator[bytes]:
        for i in range(0, len(self.content), chunk_size):
            yield self.content[i : i + chunk_size]

    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class FakeNDIF:
    """NDIF's HTTP and websocket endpoints, in process. A blocking job (posted with the session id of
    an open ``/subscribe`` socket) runs at once and its result comes back on that socket; a
    non-blocking one waits until :meth:`finish` (its status is polled at ``/response/{id}``)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.posts: list[dict[str, Any]] = []
        self.subscribes: list[dict[str, Any]] = []
        self.gets: list[dict[str, Any]] = []
        self.status: dict[str, str] = {}
        self.results: dict[str, bytes] = {}
        self.pending: dict[str, tuple[bytes, bool]] = {}
        self.sockets: dict[str, list[Any]] = {}
        self.fail: str | None = None

    # -- httpx --------------------------------------------------------------------------------------

    def client(self) -> type:
        ndif = self

        class Client:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                pass

            def __enter__(self) -> Client:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def post(
                self, url: str, data: Any = None, files: Any = None, headers: Any = None
            ) -> Any:
                return ndif.post(url, data, files, headers or {})

            def get(self, url: str, headers: Any = None) -> Any:
                return ndif.get(url, headers or {})

            def stream(self, method: str, url: str) -> Any:
                return ndif.download(url)

        return Client

    def post(self, url: str, data: dict[str, str], files: Any, headers: dict[str, str]) -> Any:
        envelope = RequestModel.model_validate_json(data["data"])
        payload = files["blob"][1]
        job = f"job-{len(self.posts)}"
        self.posts.append(
            {
                "url": url,
                "headers": dict(headers),
                "request": envelope,
                "payload": payload,
                "id": job,
            }
        )
        self.status[job] = "RECEIVED"
        if envelope.session_id:  # blocking: run now, the result goes out on the socket
            saved = self.server.run(payload, envelope.compress)
            self.status[job] = "COMPLETED"
            done = ResponseModel(
                id=job, status=Status.COMPLETED, data=result_blob(saved, envelope.compress)
            )
            self.sockets[envelope.session_id].append(done.pickle())
        else:
            self.pending[job] = (payload, envelope.compress)
        return FakeResponse(text=ResponseModel(id=job, status=Status.RECEIVED).model_dump_json())

    def get(self, url: str, headers: dict[str, str]) -> Any:
        job = url.rsplit("/", 1)[1]
        self.gets.append({"url": url, "headers": dict(headers)})
        if job not in self.status:
            return FakeResponse(status=404)
        state = self.status[job]
        data = f"{HOST}/results/{job}" if state == "COMPLETED" else None
        description = (self.fail or "") if state == "ERROR" else ""
        response = ResponseModel(id=job, status=Status(state), description=description, data=data)
        return FakeResponse(text=response.model_dump_json())

    def download(self, url: str) -> Any:
        return FakeResponse(content=self.results[url.rsplit("/", 1)[1]])

    def advance(self, state: str) -> None:
        for job in self.pending:
            self.status[job] = state

    def finish(self) -> None:
        for job, (payload, compress) in list(self.pending.items()):
            self.results[job] = result_blob(self.server.run(payload, compress), compress)
            self.status[job] = "COMPLETED"
            del self.pending[job]

    # -- websocket ----------------------------------------------------------------------------------

    def connect(self, url: str, header: Any = None) -> Any:
        session = f"session-{len(self.subscribes)}"
        self.subscribes.append({"url": url, "headers": dict(header or {})})
        frames = self.sockets.setdefault(session, [json.dumps({"session_id": session})])

        class Socket:
            def recv(self) -> Any:
                if not frames:
                    raise AssertionError("the client waited for a status that was never sent")
                return frames.pop(0)

            def settimeout(self, t: float) -> None:
                pass

            def close(self) -> None:
                pass

        return Socket()


@pytest.fixture
def ndif(server: Server, monkeypatch: pytest.MonkeyPatch) -> FakeNDIF:
    fake = FakeNDIF(server)
    monkeypatch.setattr(httpx, "Client", fake.client())
    monkeypatch.setattr(websocket, "create_connection", fake.connect)
    return fake


def payload_of(request: Any, server: Server) -> tuple[Any, str, dict[str, Any], dict[str, Any]]:
    """(tracer, block source, its globals, its locals) of a request payload, loaded as the server
    would load it."""
    from nnsight.intervention.serialization import loads

    raw = request.payload
    if request.compress:
        raw = zstd.ZstdDecompressor().decompress(raw)
    persistent = server.model._remoteable_persistent_objects()
    tracer, (source, glbls, lcls) = loads(raw, persistent, WithoutWorkbench)
    return tracer, source, glbls, lcls


def batch_of(lm: LoadedModel, side: str = "right") -> TokenBatch:
    return make_batch(encode(lm.tokenizer, TEXTS), lm.tokenizer.pad_token_id, side)  # type: ignore[arg-type]


def lengths(lm: LoadedModel) -> list[int]:
    return [len(lm.tokenizer(t)["input_ids"]) for t in TEXTS]


def direction(identity: Any, sites: list[str] = STEER_SITES, seed: int = 0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    vecs = {s: torch.randn(64, generator=g) for s in sites}
    stats = {s: {"resid_norm": 10.0} for s in sites}
    return Direction(vecs, identity, name="d", stats=stats).normalized()


def specs(
    remote_lm: LoadedModel, tiny_lm: LoadedModel, **kwargs: Any
) -> tuple[SteeringSpec, SteeringSpec]:
    """The same steering for the remote model and for the local one (identities differ: one has
    weights, the other a hub id)."""
    return (
        SteeringSpec(direction(remote_lm.identity), **kwargs),
        SteeringSpec(direction(tiny_lm.identity), **kwargs),
    )


# ---- the model held for NDIF ---------------------------------------------------------------------------


def test_the_remote_model_has_no_weights_and_runs_only_remotely(
    remote_lm: LoadedModel, tiny_lm: LoadedModel
) -> None:
    tensors = [*remote_lm.model.parameters(), *remote_lm.model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert is_weightless(remote_lm) and not is_weightless(tiny_lm)
    assert remote_lm.source == REPO and remote_lm.identity.name == REPO
    assert remote_lm.identity.d_model == tiny_lm.identity.d_model
    assert remote_lm.identity.config_hash == tiny_lm.identity.config_hash
    for call in (
        lambda: repe.capture(remote_lm, TEXTS, "blocks.0.hook_resid_post"),
        lambda: repe.capture(remote_lm, TEXTS, "blocks.0.hook_resid_post", backend="nnsight"),
        lambda: steered_logits(remote_lm, None, TEXTS, backend="nnsight"),
    ):
        with pytest.raises(RepeError, match="without weights.*remote=True"):
            call()


# ---- what the request contains ------------------------------------------------------------------------


@pytest.fixture
def built(remote_lm: LoadedModel) -> Any:
    """A factory of dry-run requests (built for the remote model, not sent)."""

    def make(kind: str, **kwargs: Any) -> Any:
        if kind == "capture":
            reqs = capture_request(remote_lm, TEXTS, CAPTURE_SITES, **kwargs)
            assert len(reqs) == 1
            return reqs[0]
        return steered_logits_request(remote_lm, kwargs.pop("spec"), TEXTS, **kwargs)

    return make


def test_the_request_names_the_model_by_its_hub_id_and_holds_no_key(
    built: Any, server: Server
) -> None:
    req = built("capture")
    assert req.model_key == MODEL_KEY
    assert req.url == f"{HOST}/request"
    assert req.compress is True
    assert req.env == server.model._remoteable_get_env()
    envelope = json.loads(req.request.metadata())
    assert envelope["model_key"] == MODEL_KEY and envelope["session_id"] == ""
    raw = zstd.ZstdDecompressor().decompress(req.payload)
    assert KEY.encode() not in raw and KEY.encode() not in req.request.metadata().encode()
    # the model is never in the payload (its modules travel as ids): the tiny model's weights alone
    # are 13 MB
    assert len(raw) < 100_000


def test_a_capture_request_ships_plain_values_and_nothing_of_the_workbench(
    built: Any, server: Server, remote_lm: LoadedModel
) -> None:
    req = built("capture", positions="last")
    WithoutWorkbench.seen = set()
    tracer, source, glbls, lcls = payload_of(req, server)
    assert not {m for m in WithoutWorkbench.seen if m.split(".")[0] in OURS}
    assert {m.split(".")[0] for m in WithoutWorkbench.seen} <= {
        "nnsight",
        "torch",
        "collections",
        "cloudpickle",
        "builtins",
        "copyreg",
        "_codecs",
    }
    assert set(glbls) | set(lcls) <= {"model", "nnsight", "paths", "keep", "stop_early", "tracer"}
    assert lcls["paths"] == [
        "model.layers.0.input",
        "model.layers.0.self_attn.o_proj.input",
        "model.layers.1.self_attn.output",
        "model.layers.2.mlp.output",
        "model.layers.3.output",
    ]
    n = lengths(remote_lm)
    assert [t.tolist() for t in lcls["keep"]] == [[0, 1, 2], [k - 1 for k in n]]  # last tokens
    assert "repe" not in source and "steering" not in source
    ids = tracer.kwargs["input_ids"]
    assert ids.shape == (3, max(n)) and ids.device.type == "cpu"
    assert torch.equal(ids, batch_of(remote_lm).input_ids)


def test_the_server_emulation_refuses_what_ndif_could_not_load(
    remote_lm: LoadedModel, server: Server
) -> None:
    """The check is real: a body that calls into ``steering`` (as the local nnsight steering's
    closures do) is refused by the server-side load."""
    from steering.backends import _site_fns

    model, _ = _MODELS.get(remote_lm)
    spec = SteeringSpec(direction(remote_lm.identity), coeff=0.5)
    batch = batch_of(remote_lm, "left")
    fns = _site_fns(resolve(OnHost.of(remote_lm), spec), batch, torch.device("cpu"))
    # the function as a user's process has it (under pytest the shape checker wraps it, and the
    # wrapper's source-based pickling would drop its globals instead of referencing them)
    fn = inspect.unwrap(fns[-1][1])
    dry = remote_backend(remote_lm, model, dry_run=True)
    with model.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask, backend=dry):
        model.model.layers[3].output = fn(model.model.layers[3].output)
    assert dry.built is not None
    with pytest.raises(NotOnNDIF, match="steering"):
        server.run(dry.built.payload, dry.built.compress)


# ---- (a) only the requested sites come back, (b) with the local numbers -----------------------------


@pytest.mark.parametrize("positions", ["last", "mean", "all"])
def test_a_capture_request_saves_exactly_the_requested_sites(
    built: Any, server: Server, tiny_lm: LoadedModel, positions: str
) -> None:
    req = built("capture", positions=positions)
    saved = server.run(req.payload, req.compress)
    assert list(saved) == ["saved"]  # one value: the list of sites; no logits, nothing else
    values = saved["saved"]
    assert len(values) == len(CAPTURE_SITES)
    n_rows = {"last": 3, "mean": sum(lengths(tiny_lm)), "all": sum(lengths(tiny_lm))}[positions]
    widths = [64, 64, 64, 64, 64]
    for value, width in zip(values, widths, strict=True):
        assert isinstance(value, torch.Tensor) and value.shape == (n_rows, width)


@pytest.mark.parametrize(
    ("positions", "side"), [("last", "right"), ("mean", "left"), ("all", "right")]
)
def test_remote_capture_gives_the_local_activations(
    remote_lm: LoadedModel, tiny_lm: LoadedModel, ndif: FakeNDIF, positions: str, side: str
) -> None:
    got = repe.capture(
        remote_lm,
        TEXTS,
        CAPTURE_SITES,
        positions=positions,
        backend="nnsight",
        remote=True,
        batch_size=2,
        padding_side=side,
    )
    ref = repe.capture(tiny_lm, TEXTS, CAPTURE_SITES, positions=positions, backend="hf")
    assert got.sites == ref.sites
    for site in ref.sites:
        a, a_off = ref.rows(site)
        b, b_off = got.rows(site)
        assert torch.equal(a_off, b_off), site
        assert a.shape == b.shape, (site, a.shape, b.shape)
        assert max_rel_diff(a, b) <= 1e-4, (site, max_rel_diff(a, b))
    assert len(ndif.posts) == 2  # one job per batch
    assert [p["request"].model_key for p in ndif.posts] == [MODEL_KEY] * 2


# ---- (c) steered logits through the request equal the local hf ones --------------------------------


@pytest.mark.parametrize("positions", ["all", (0, 2)], ids=["all", "idx0,2"])
@pytest.mark.parametrize("op", ["add", "add_norm_preserving", "ablate", "ablate_add", "clamp"])
def test_remote_steering_gives_the_local_logits(
    remote_lm: LoadedModel,
    tiny_lm: LoadedModel,
    ndif: FakeNDIF,
    op: str,
    positions: str | tuple[int, ...],
) -> None:
    remote_spec, local_spec = specs(remote_lm, tiny_lm, coeff=0.5, operator=op, positions=positions)
    ref = steered_logits(tiny_lm, local_spec, TEXTS)
    assert (ref - steered_logits(tiny_lm, None, TEXTS)).abs().max() > 0.1, (
        "steering changed nothing"
    )
    got = steered_logits(remote_lm, remote_spec, TEXTS, backend="nnsight", remote=True)
    assert got.shape == ref.shape
    assert max_rel_diff(ref, got) <= 1e-4, (op, positions, max_rel_diff(ref, got))
    assert len(ndif.posts) == 1


def test_a_steering_request_ships_tensors_and_saves_only_the_logits(
    built: Any, server: Server, remote_lm: LoadedModel, tiny_lm: LoadedModel
) -> None:
    remote_spec, local_spec = specs(remote_lm, tiny_lm, coeff=0.5, operator="clamp")
    req = built("steer", spec=remote_spec, last_only=True)
    WithoutWorkbench.seen = set()
    _, source, glbls, lcls = payload_of(req, server)
    assert not {m for m in WithoutWorkbench.seen if m.split(".")[0] in OURS}
    assert set(glbls) == {"torch"} and set(lcls) == {"model", "steps", "select"}
    assert "steering" not in source and "apply_operator" not in source
    steps = lcls["steps"]
    assert [s[:2] for s in steps] == [
        ("model.layers.1", "input"),
        ("model.layers.1.self_attn", "output"),
        ("model.layers.2.mlp", "output"),
        ("model.layers.3", "output"),
    ]
    for _, _, ops in steps:
        (u, project, shift, renorm, mask), *more = ops
        assert not more and project and not renorm
        assert all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in (u, shift, mask))
        assert mask.shape == (3, max(lengths(remote_lm))) and mask.dtype == torch.bool
    saved = server.run(req.payload, req.compress)
    assert list(saved) == ["logits"]
    ref = steered_logits(tiny_lm, local_spec, TEXTS, last_only=True)
    assert saved["logits"].shape == ref.shape == (3, tiny_lm.identity.vocab_size)
    assert max_rel_diff(ref, saved["logits"]) <= 1e-4


def test_unsteered_and_chat_inputs_match_too(
    remote_lm: LoadedModel, tiny_lm: LoadedModel, ndif: FakeNDIF
) -> None:
    base = steered_logits(remote_lm, None, TEXTS, backend="nnsight", remote=True)
    assert max_rel_diff(steered_logits(tiny_lm, None, TEXTS), base) <= 1e-4
    chats = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    ]
    remote_spec, local_spec = specs(remote_lm, tiny_lm, coeff=0.5, positions="assistant")
    got = steered_logits(remote_lm, remote_spec, chats, backend="nnsight", remote=True)
    assert max_rel_diff(steered_logits(tiny_lm, local_spec, chats), got) <= 1e-4


def test_custom_operators_are_refused_remotely(
    remote_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(OPERATORS, "double", Operator("double", lambda h, d, u, v: 2 * h, "2h"))
    spec = SteeringSpec(direction(remote_lm.identity), coeff=0.5, operator="double")
    with pytest.raises(NotImplementedError, match="'double' cannot run remotely"):
        steered_logits_request(remote_lm, spec, TEXTS)


# ---- (d) the API key ------------------------------------------------------------------------------------


def test_the_key_from_the_environment_is_in_the_request_headers(
    remote_lm: LoadedModel, ndif: FakeNDIF, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NDIF_API_KEY", "key-set-after-import")  # read at call time
    repe.capture(remote_lm, TEXTS[:1], "blocks.1.hook_resid_post", backend="nnsight", remote=True)
    (post,) = ndif.posts
    assert post["url"] == f"{HOST}/request"
    assert post["headers"]["ndif-api-key"] == "key-set-after-import"
    (sub,) = ndif.subscribes
    assert sub["url"] == "wss://ndif.invalid/subscribe"
    assert sub["headers"]["ndif-api-key"] == "key-set-after-import"
    assert post["request"].session_id == "session-0"


def test_nnsights_configured_key_is_used_when_the_variable_is_unset(
    remote_lm: LoadedModel, ndif: FakeNDIF, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NDIF_API_KEY")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", "key-from-nnsight-config")
    steered_logits(remote_lm, None, TEXTS[:1], backend="nnsight", remote=True)
    assert ndif.posts[0]["headers"]["ndif-api-key"] == "key-from-nnsight-config"


def test_a_missing_key_is_one_line_before_any_request_is_built(
    remote_lm: LoadedModel, ndif: FakeNDIF, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NDIF_API_KEY")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    built: list[object] = []
    real = RequestModel.serialize

    def spy(cls: type, *args: Any, **kwargs: Any) -> bytes:
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(RequestModel, "serialize", classmethod(spy))
    spec = SteeringSpec(direction(remote_lm.identity), coeff=0.5)
    calls = [
        lambda: repe.capture(remote_lm, TEXTS, backend="nnsight", remote=True),
        lambda: submit_capture(remote_lm, TEXTS),
        lambda: capture_request(remote_lm, TEXTS),
        lambda: steered_logits(remote_lm, spec, TEXTS, backend="nnsight", remote=True),
        lambda: submit_steered_logits(remote_lm, spec, TEXTS),
        lambda: steered_logits_request(remote_lm, spec, TEXTS),
    ]
    for call in calls:
        with pytest.raises(RemoteError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        assert "set the environment variable NDIF_API_KEY" in message
    assert built == [] and ndif.posts == [] and ndif.subscribes == []


def test_remote_runs_are_refused_clearly(tiny_lm: LoadedModel, remote_lm: LoadedModel) -> None:
    for backend in ("hf", "transformer_lens"):
        with pytest.raises(ValueError, match="remote=True runs on NDIF through nnsight") as info:
            repe.capture(remote_lm, TEXTS, backend=backend, remote=True)
        assert "\n" not in str(info.value)
        with pytest.raises(ValueError, match="pass backend='nnsight'"):
            steered_logits(remote_lm, None, TEXTS, backend=backend, remote=True)
    # a model loaded from a folder (no hub id) cannot be named to NDIF
    with pytest.raises(RemoteError, match="hub id") as refused:
        repe.capture(tiny_lm, TEXTS, backend="nnsight", remote=True)
    assert "\n" not in str(refused.value)
    with pytest.raises(RemoteError, match="hub id"):
        load_remote_model("/tmp")


# ---- (e) non-blocking jobs are polled --------------------------------------------------------------------


def test_a_non_blocking_steered_forward_is_polled_to_its_result(
    remote_lm: LoadedModel, tiny_lm: LoadedModel, ndif: FakeNDIF
) -> None:
    remote_spec, local_spec = specs(remote_lm, tiny_lm, coeff=0.5, operator="ablate")
    job = submit_steered_logits(remote_lm, remote_spec, TEXTS, last_only=True)
    (post,) = ndif.posts
    assert post["request"].session_id == "" and ndif.subscribes == []  # no websocket
    assert post["headers"]["ndif-api-key"] == KEY
    assert job.job_ids == ["job-0"]
    assert job.status() == "RECEIVED" and not job.done()
    ndif.advance("RUNNING")
    assert job.status() == "RUNNING"
    with pytest.raises(TimeoutError, match="job-0"):
        job.result(timeout=0)
    assert ndif.gets[-1]["url"] == f"{HOST}/response/job-0"
    assert ndif.gets[-1]["headers"]["ndif-api-key"] == KEY
    ndif.finish()
    assert job.status() == "COMPLETED"
    got = job.result(timeout=5)
    ref = steered_logits(tiny_lm, local_spec, TEXTS, last_only=True)
    assert got.shape == ref.shape and max_rel_diff(ref, got) <= 1e-4
    assert job.result() is got  # polled once, kept


def test_a_non_blocking_capture_is_one_job_per_batch(
    remote_lm: LoadedModel, tiny_lm: LoadedModel, ndif: FakeNDIF
) -> None:
    job = submit_capture(remote_lm, TEXTS, CAPTURE_SITES, positions="mean", batch_size=2)
    assert job.job_ids == ["job-0", "job-1"]
    ndif.advance("QUEUED")
    assert job.status() == "QUEUED"
    ndif.finish()
    got = job.result(timeout=5, poll_interval=0.01)
    ref = repe.capture(tiny_lm, TEXTS, CAPTURE_SITES, positions="mean")
    for site in ref.sites:
        assert max_rel_diff(ref[site], got[site]) <= 1e-4, site


def test_a_failed_job_raises_with_the_servers_message(
    remote_lm: LoadedModel, ndif: FakeNDIF
) -> None:
    job = submit_steered_logits(remote_lm, None, TEXTS)
    ndif.fail = "CUDA out of memory"
    ndif.advance("ERROR")
    with pytest.raises(RemoteError, match="job-0 failed: CUDA out of memory"):
        job.result(timeout=5)


# ---- the local nnsight path is unchanged ------------------------------------------------------------------


def test_the_backend_gathers_rows_only_when_remote(tiny_lm: LoadedModel) -> None:
    assert NNsightBackend(remote=True).gathers_rows and not NNsightBackend().gathers_rows
    sites = resolve_sites(["blocks.1.hook_resid_post"], tiny_lm.n_layers)
    batch = batch_of(tiny_lm)
    full: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}
    keep = (torch.tensor([0, 2, 2]), torch.tensor([1, 0, 5]))
    NNsightBackend().run(tiny_lm, batch, sites, lambda s, t: full.__setitem__(s.name, t))
    NNsightBackend().run(tiny_lm, batch, sites, lambda s, t: rows.__setitem__(s.name, t), rows=keep)
    name = sites[0].name
    assert torch.equal(rows[name], full[name][keep[0], keep[1]])
