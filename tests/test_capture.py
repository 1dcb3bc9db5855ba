"""Capture on the hf back-end: padding invariance, positions, streaming, errors."""

from __future__ import annotations

import pytest
import torch

from repe import ActivationSet, capture, messages
from repe.errors import SiteError
from repe.hooks import leftover_hooks
from repe.positions import FromAssistant, Index, as_policy

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "Paris is the capital of France and home to the Louvre museum.",
    "One two three",
    "Water boils at one hundred degrees Celsius at sea level, most of the time.",
]
SITES = [
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_resid_post",
    "blocks.3.hook_resid_post",
    "blocks.2.attn.hook_z",
    "blocks.2.hook_attn_out",
    "blocks.2.hook_mlp_out",
]


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= rel * a.abs().max().clamp(min=1e-6))


def no_hooks(model: torch.nn.Module) -> bool:
    return leftover_hooks(model) == []


@pytest.mark.parametrize("positions", ["last", "mean", "all", (0, -1)])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_unbatched(tiny_lm, positions, padding_side):
    one = capture(tiny_lm, TEXTS, SITES, positions=positions, batch_size=1)
    many = capture(
        tiny_lm, TEXTS, SITES, positions=positions, batch_size=3, padding_side=padding_side
    )
    for s in SITES:
        a, ao = one.rows(s)
        b, bo = many.rows(s)
        assert torch.equal(ao, bo)
        assert a.shape == b.shape
        assert close(a, b), s


def test_batched_equals_unbatched_embedded(embedded_lm):
    sites = ["blocks.12.hook_resid_post", "blocks.29.hook_resid_post"]
    one = capture(embedded_lm, TEXTS, sites, batch_size=1)
    for side in ("left", "right"):
        many = capture(embedded_lm, TEXTS, sites, batch_size=5, padding_side=side)
        for s in sites:
            assert close(one[s], many[s]), (side, s)


def test_last_position_matches_a_plain_forward(tiny_lm):
    acts = capture(tiny_lm, TEXTS, "blocks.1.hook_resid_post", batch_size=2, padding_side="left")
    for i, text in enumerate(TEXTS):
        enc = tiny_lm.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hs = tiny_lm.model(**enc, output_hidden_states=True).hidden_states
        assert close(hs[2][0, -1], acts["blocks.1.hook_resid_post"][i])


def test_shapes_and_metadata(tiny_lm):
    acts = capture(tiny_lm, TEXTS, "blocks.*.hook_resid_post")
    assert acts.sites == [f"blocks.{i}.hook_resid_post" for i in range(4)]
    assert acts["blocks.0.hook_resid_post"].shape == (len(TEXTS), 64)
    assert acts.stack().shape == (len(TEXTS), 4, 64)
    assert acts.identity == tiny_lm.identity
    assert acts.meta.positions == "last"
    z = capture(tiny_lm, TEXTS, "blocks.1.attn.hook_z")
    assert z["blocks.1.attn.hook_z"].shape == (len(TEXTS), 4, 16)
    other = capture(tiny_lm, TEXTS[:-1], "blocks.0.hook_resid_post")
    assert other.fingerprint != acts.fingerprint


def test_all_tokens_is_ragged_and_mean_is_its_average(tiny_lm):
    allt = capture(tiny_lm, TEXTS, "blocks.2.hook_resid_post", positions="all", batch_size=2)
    mean = capture(tiny_lm, TEXTS, "blocks.2.hook_resid_post", positions="mean", batch_size=2)
    lengths = [len(tiny_lm.tokenizer(t)["input_ids"]) for t in TEXTS]
    _, offsets = allt.rows("blocks.2.hook_resid_post")
    assert offsets.diff().tolist() == lengths
    with pytest.raises(ValueError, match="rows"):
        allt["blocks.2.hook_resid_post"]
    for i in range(len(TEXTS)):
        ex = allt.example("blocks.2.hook_resid_post", i)
        assert close(ex.mean(0), mean["blocks.2.hook_resid_post"][i])


def test_assistant_positions_start_at_the_assistant_turn(tiny_lm):
    convs = [
        messages("What is 2+2?", assistant="It is four."),
        messages("Name a colour.", system="Be brief.", assistant="Blue"),
    ]
    allt = capture(tiny_lm, convs, "blocks.1.hook_resid_post", positions="all")
    asst = capture(tiny_lm, convs, "blocks.1.hook_resid_post", positions="assistant")
    tok = tiny_lm.tokenizer
    for i, conv in enumerate(convs):
        n_answer = len(tok(conv[-1]["content"], add_special_tokens=False)["input_ids"])
        a = asst.example("blocks.1.hook_resid_post", i)
        full = allt.example("blocks.1.hook_resid_post", i)
        assert a.shape[0] == n_answer
        assert close(full[-n_answer:], a)
    with pytest.raises(ValueError, match="assistant"):
        capture(tiny_lm, TEXTS, "blocks.1.hook_resid_post", positions="assistant")
    assert as_policy("assistant_mean") == FromAssistant("mean")
    assert as_policy([-2, -1]) == Index((-2, -1))


def test_streaming_to_disk_equals_in_memory(tiny_lm, tmp_path):
    texts = TEXTS * 5
    mem = capture(tiny_lm, texts, SITES, positions="all", batch_size=4)
    disk = capture(
        tiny_lm, texts, SITES, positions="all", batch_size=4, out_dir=tmp_path / "a", shard_size=6
    )
    assert len(list((tmp_path / "a").glob("shard_*.safetensors"))) > 1
    reloaded = ActivationSet.load(tmp_path / "a")
    for s in SITES:
        for other in (disk, reloaded):
            a, ao = mem.rows(s)
            b, bo = other.rows(s)
            assert torch.equal(a, b) and torch.equal(ao, bo)
    assert reloaded.meta.to_json() == mem.meta.to_json()
    # a saved in-memory set loads back identically
    mem.save(tmp_path / "b")
    again = ActivationSet.load(tmp_path / "b")
    assert torch.equal(again.rows(SITES[0])[0], mem.rows(SITES[0])[0])


def test_interrupted_capture_is_not_loadable(tiny_lm, tmp_path):
    class Boom(Exception):
        pass

    def bad_sink(*_a):
        raise Boom

    from repe.backends.hf import HFBackend
    from repe.batching import encode, make_batch

    batch = make_batch(encode(tiny_lm.tokenizer, TEXTS[:2]), tiny_lm.tokenizer.pad_token_id)
    with pytest.raises(Boom):
        HFBackend().run(tiny_lm, batch, [__import__("repe").parse_site(SITES[1])], bad_sink)
    assert no_hooks(tiny_lm.model)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ActivationSet.load(tmp_path)


def test_no_hooks_left_after_capture(tiny_lm):
    capture(tiny_lm, TEXTS, SITES)
    assert no_hooks(tiny_lm.model)


def test_on_batch_reports_progress_and_raising_stops_cleanly(tiny_lm):
    seen: list[tuple[int, int]] = []
    capture(tiny_lm, TEXTS, SITES, batch_size=2, on_batch=lambda d, n: seen.append((d, n)))
    n = len(TEXTS)
    assert seen == [(min(i + 2, n), n) for i in range(0, n, 2)]

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt  # what a UI's cancel looks like from inside the loop

    with pytest.raises(KeyboardInterrupt):
        capture(tiny_lm, TEXTS, SITES, batch_size=2, on_batch=stop)
    assert no_hooks(tiny_lm.model)


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"sites": "blocks.1.hook_resid_middle"}, SiteError, "unknown site"),
        ({"sites": "blocks.4.hook_resid_post"}, SiteError, "out of range"),
        ({"sites": "blocks.9*.hook_resid_post"}, SiteError, "matched no site"),
        ({"sites": []}, SiteError, "no sites"),
        ({"positions": "first"}, ValueError, "positions must be one of"),
        ({"backend": "jax"}, ValueError, "backend must be one of"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"padding_side": "middle"}, ValueError, "padding_side"),
    ],
)
def test_bad_arguments(tiny_lm, kwargs, err, match):
    args = {"sites": "blocks.0.hook_resid_post", **kwargs}
    with pytest.raises(err, match=match):
        capture(tiny_lm, TEXTS, **args)


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ([], "empty"),
        ("a single string", "single string"),
        (["ok", ""], "empty string"),
        (["text", [{"role": "user", "content": "x"}]], "mixes"),
    ],
)
def test_bad_inputs(tiny_lm, inputs, match):
    with pytest.raises(ValueError, match=match):
        capture(tiny_lm, inputs, "blocks.0.hook_resid_post")


def test_index_out_of_range(tiny_lm):
    with pytest.raises(IndexError, match="out of range"):
        capture(tiny_lm, ["Hi"], "blocks.0.hook_resid_post", positions=[40])


def test_concurrent_captures_on_one_model_do_not_mix(tiny_lm):
    import threading

    texts_a, texts_b = TEXTS, [t + " and more words here" for t in TEXTS]
    sites = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    want_a = capture(tiny_lm, texts_a, sites, batch_size=1)
    want_b = capture(tiny_lm, texts_b, sites[:1], batch_size=1)
    got: dict[str, list] = {"a": [], "b": []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(key, texts, s):
        try:
            barrier.wait()
            for _ in range(5):
                got[key].append(capture(tiny_lm, texts, s, batch_size=1))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=("a", texts_a, sites)),
        threading.Thread(target=work, args=("b", texts_b, sites[:1])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for acts in got["a"]:
        for s in sites:
            assert torch.equal(acts[s], want_a[s])
    for acts in got["b"]:
        assert torch.equal(acts[sites[0]], want_b[sites[0]])
