"""Value maps (issue 14): the InfoNCE head, source identification, the answer cache, the map, the
artifact. Tiny random models and synthetic embeddings; the embedded-model run is in
test_valuemap_integration.py."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from probes.valuemap import (
    HeadConfig,
    QARecord,
    ValueHead,
    bootstrap_difference,
    identify_knn,
    identify_linear,
    identify_tfidf,
    info_nce,
    project_sources,
    read_records,
    split_questions,
    train_head,
    value_map_figure,
    write_records,
)
from probes.valuemap.head import ValueEmbedder
from repe.artifacts import load_artifact, save_artifact
from repe.datasets.questions import Question, QuestionSet
from repe.errors import ArtifactMismatchError, DataFormatError
from repe.models import LoadedModel, tiny_model
from steering.evaluation.answers import AnswerCache, Source, collect_answers
from steering.generate import GenerationConfig, generate


def planted(
    n_sources: int = 6,
    n_questions: int = 60,
    d: int = 48,
    signal: float = 0.35,
    topic: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, list[str], list[str]]:
    """Embeddings = a strong per-question topic vector + a weak per-source vector in a few other
    dimensions + noise: the frozen geometry is dominated by the question, the source is learnable."""
    g = torch.Generator().manual_seed(seed)
    topics = topic * torch.randn(n_questions, d, generator=g)
    topics[:, :6] = 0.0
    src_vec = torch.zeros(n_sources, d)
    src_vec[:, :6] = signal * torch.randn(n_sources, 6, generator=g)
    rows, sources, qids = [], [], []
    for q in range(n_questions):
        for s in range(n_sources):
            rows.append(topics[q] + src_vec[s] + 0.3 * torch.randn(d, generator=g))
            sources.append(f"s{s}")
            qids.append(f"q{q}")
    emb = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
    return emb, sources, qids


def test_info_nce_at_initialisation_is_about_ln_batch() -> None:
    torch.manual_seed(0)
    head = ValueHead(64, HeadConfig(dim=32))
    for b in (4, 16, 64):
        losses = [
            info_nce(head(torch.randn(b, 64)), head(torch.randn(b, 64)), scale=1.0).item()
            for _ in range(20)
        ]
        assert abs(np.mean(losses) - math.log(b)) < 0.05 * math.log(b)


def test_identical_views_drive_info_nce_towards_zero() -> None:
    z = torch.eye(8)[:, :8]
    assert info_nce(z, z, scale=50.0).item() < 1e-6
    # training on sources whose records are all the same point: the train loss falls towards 0
    g = torch.Generator().manual_seed(1)
    # nearly the same point at first (loss about ln 6); training pulls them apart
    centres = torch.randn(1, 32, generator=g) + 0.05 * torch.randn(6, 32, generator=g)
    emb = torch.cat([centres] * 20)
    sources = [f"s{i % 6}" for i in range(len(emb))]
    qids = [f"q{i // 6}" for i in range(len(emb))]
    head = train_head(
        emb,
        sources,
        qids,
        {f"q{i}" for i in range(20)},
        None,
        HeadConfig(dim=16, max_epochs=30, patience=30, lr=1e-2, weight_decay=0.0, logit_scale=20.0),
    )
    unit = torch.nn.functional.normalize(centres, dim=-1)
    first = info_nce(unit, unit, scale=20.0).item()  # the residual head starts as the identity
    assert abs(first - math.log(6)) < 0.1
    assert head.history[-1]["train_loss"] < 0.05


def test_train_and_test_never_share_a_question() -> None:
    qids = [f"q{i}" for i in range(50)] * 3
    train, val, test = split_questions(qids, (0.6, 0.2, 0.2), seed=3)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(qids)
    emb, sources, q = planted(n_questions=10)
    with pytest.raises(ValueError, match="overlap"):
        train_head(emb, sources, q, {"q1", "q2"}, {"q2"}, HeadConfig())


def test_shuffled_source_labels_give_chance_accuracy() -> None:
    emb, sources, qids = planted(signal=1.0, topic=0.3)
    train_q, _, test_q = split_questions(qids, (0.5, 0.0, 0.5))
    tr = [i for i, q in enumerate(qids) if q in train_q]
    te = [i for i, q in enumerate(qids) if q in test_q]
    labels = [sources[i] for i in tr]
    real = identify_knn(
        emb[tr], labels, emb[te], [sources[i] for i in te], [qids[i] for i in te], k=15
    )
    assert real.acc1 > 0.8
    shuffled = labels[:]
    random.Random(0).shuffle(shuffled)
    accs = [
        identify_knn(
            emb[tr],
            random.Random(s).sample(shuffled, len(shuffled)),
            emb[te],
            [sources[i] for i in te],
            [qids[i] for i in te],
            k=15,
        ).acc1
        for s in range(5)
    ]
    assert abs(np.mean(accs) - 1 / 6) < 0.06


def test_the_head_learns_on_held_out_questions_with_an_interval_above_the_frozen_encoder() -> None:
    emb, sources, qids = planted()
    train_q, val_q, test_q = split_questions(qids, (0.6, 0.2, 0.2))
    head = train_head(emb, sources, qids, train_q, val_q, HeadConfig(max_epochs=40))
    tr = [i for i, q in enumerate(qids) if q in train_q]
    te = [i for i, q in enumerate(qids) if q in test_q]

    def ident(x: torch.Tensor, name: str):
        return identify_knn(
            x[tr],
            [sources[i] for i in tr],
            x[te],
            [sources[i] for i in te],
            [qids[i] for i in te],
            k=20,
            method=name,
        )

    frozen, trained = ident(emb, "frozen"), ident(head.embed(emb), "head")
    diff, lo, hi = bootstrap_difference(trained, frozen)
    assert lo > 0, (trained.acc1, frozen.acc1, lo, hi)
    assert trained.ci1[0] > 1 / 6
    assert head.best_epoch >= 1 and head.history[0]["epoch"] == 0.0


def test_linear_probe_and_tfidf_baseline_identify_planted_sources() -> None:
    emb, sources, qids = planted(signal=1.0, topic=0.3)
    tr = [i for i, q in enumerate(qids) if int(q[1:]) < 40]
    te = [i for i, q in enumerate(qids) if int(q[1:]) >= 40]
    lin = identify_linear(
        emb[tr], [sources[i] for i in tr], emb[te], [sources[i] for i in te], [qids[i] for i in te]
    )
    assert lin.acc1 > 0.8 and lin.acc3 >= lin.acc1 and len(lin.confusion) == 6
    words = {f"s{s}": f"marker{s}" for s in range(6)}
    texts = [
        f"Q: question {q} A: some answer {words[s]} filler"
        for s, q in zip(sources, qids, strict=True)
    ]
    tf = identify_tfidf(
        [texts[i] for i in tr],
        [sources[i] for i in tr],
        [texts[i] for i in te],
        [sources[i] for i in te],
        [qids[i] for i in te],
        k=5,
    )
    assert tf.acc1 == 1.0 and tf.f1 == 1.0
    with pytest.raises(ValueError, match="never seen"):
        identify_knn(
            emb[tr], [sources[i] for i in tr], emb[te], ["nobody"] * len(te), [qids[i] for i in te]
        )
    bad = emb[te].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        identify_knn(
            emb[tr], [sources[i] for i in tr], bad, [sources[i] for i in te], [qids[i] for i in te]
        )


def test_the_value_map_draws_sources_a_trajectory_and_sample_answers() -> None:
    emb, sources, qids = planted(signal=1.0, topic=0.3)
    names, xy, info = project_sources(emb, sources, "pca")
    assert names == [f"s{i}" for i in range(6)] and xy.shape == (6, 2)
    assert 0 < sum(info["explained_variance_ratio"]) <= 1
    fig = value_map_figure(names, xy, {"s0": ["I like tradition."]}, [["s0", "s1", "s2"]])
    kinds = [t.name for t in fig.data]
    assert "steering sweep" in kinds and "sources" in kinds
    assert "I like tradition." in fig.data[-1].hovertext[0]
    names_t, xy_t, _ = project_sources(emb, sources, "tsne")
    assert xy_t.shape == (6, 2) and np.isfinite(xy_t).all()
    with pytest.raises(ValueError, match="method"):
        project_sources(emb, sources, "umap")


def test_the_head_artifact_round_trips_and_refuses_another_encoder(tmp_path) -> None:
    emb, sources, qids = planted(n_questions=20)
    head = train_head(
        emb, sources, qids, {f"q{i}" for i in range(15)}, None, HeadConfig(max_epochs=3)
    )
    enc = {"name": "minilm", "dim": 48, "weights_hash": "abc"}
    path = save_artifact(
        ValueEmbedder(head, {"encoder": enc, "questions": {"fingerprint": "f00"}}), tmp_path / "vh"
    )
    loaded = load_artifact(path)
    assert isinstance(loaded, ValueEmbedder)
    assert torch.allclose(loaded.head.embed(emb), head.embed(emb))
    assert loaded.info["questions"]["fingerprint"] == "f00"
    loaded.check_encoder(enc)
    with pytest.raises(ArtifactMismatchError, match="weights_hash"):
        loaded.check_encoder({**enc, "weights_hash": "other"})
    with pytest.raises(
        ValueError, match="reserved"
    ):  # a pipeline's own "config" must not shadow the head's
        ValueEmbedder(head, {"config": {"batch_size": 64}})
    # a head saved before the encoder's "layers" option read the last layer
    loaded.check_encoder({**enc, "layers": "last"})
    with pytest.raises(ArtifactMismatchError, match="layers"):
        loaded.check_encoder({**enc, "layers": "all"})


def test_an_ensemble_head_joins_members_trained_alone_and_round_trips(tmp_path) -> None:
    """``ensemble=3``: member i is exactly the head trained alone with seed ``seed + i`` (its block of
    the joined output, times sqrt(3)); the output is a unit vector ``3 * dim`` wide; the artifact
    round-trips; a single head keeps the old tensor names (artifacts saved before the option load)."""
    emb, sources, qids = planted(n_questions=20)
    train_q, val_q = {f"q{i}" for i in range(12)}, {f"q{i}" for i in range(12, 16)}
    base = HeadConfig(dim=16, max_epochs=4, patience=4, seed=3)
    joined = train_head(emb, sources, qids, train_q, val_q, replace(base, ensemble=3))
    out = joined.embed(emb)
    assert out.shape == (len(emb), 48) and joined.d_out == 48
    assert torch.allclose(out.norm(dim=-1), torch.ones(len(emb)), atol=1e-5)
    for i in range(3):
        alone = train_head(emb, sources, qids, train_q, val_q, replace(base, seed=3 + i))
        assert torch.allclose(
            out[:, 16 * i : 16 * (i + 1)] * math.sqrt(3), alone.embed(emb), atol=1e-6
        )
    assert {row["member"] for row in joined.history} == {0.0, 1.0, 2.0}
    single = train_head(emb, sources, qids, train_q, val_q, base)
    assert not any(k.startswith("more.") for k in single.state_dict())
    path = save_artifact(ValueEmbedder(joined, {"encoder": {"name": "x"}}), tmp_path / "ens")
    loaded = load_artifact(path)
    assert isinstance(loaded, ValueEmbedder)
    assert torch.equal(loaded.head.embed(emb), out)
    with pytest.raises(ValueError, match="ensemble"):
        HeadConfig(ensemble=0)
    # no d_in x d_in identity is stored without whitening; an artifact saved with one still loads
    assert single.state_dict()["whitener"].numel() == 0
    wrapped = ValueEmbedder(single)
    old = {**wrapped.tensors(), "whitener": torch.eye(emb.shape[1])}
    meta = {**wrapped.metadata(), "kind": "value_head", "format_version": 1}
    assert torch.equal(ValueEmbedder.from_parts(old, meta).head.embed(emb), single.embed(emb))
    # with whitening the fitted whitener is kept and used
    white = train_head(emb, sources, qids, train_q, val_q, replace(base, whiten=0.1))
    assert white.state_dict()["whitener"].shape == (48, 48)
    path = save_artifact(ValueEmbedder(white), tmp_path / "white")
    assert torch.equal(load_artifact(path).head.embed(emb), white.embed(emb))


def test_the_all_layers_encoder_joins_every_layer_and_shares_the_model() -> None:
    """``layers="all"``: each layer mean-pooled and normalised, joined, normalised again; the last
    block of the joined vector is the usual sentence embedding (scaled by 1/sqrt(layers)). It shares
    the model (no second copy) and says what it reads in its identity."""
    from probes.valuemap.encoder import SentenceEncoder

    last = SentenceEncoder()
    every = last.with_layers("all")
    n, width = last.model.config.num_hidden_layers, last.dim
    assert every.model is last.model and last.with_layers("last") is last
    assert every.identity["layers"] == "all" and every.dim == n * width
    assert last.identity["layers"] == "last"
    texts = ["I would tell the truth.", "Happiness is a warm day.", "No."]
    a, b = last.embed(texts), every.embed(texts)
    assert b.shape == (3, n * width)
    assert torch.allclose(b.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(b[:, -width:] * math.sqrt(n), a, atol=1e-5)
    # the first layer's block is not the last one's: the joined vector holds more than the last layer
    assert not torch.allclose(b[:, :width], b[:, -width:], atol=1e-2)
    with pytest.raises(ValueError, match="layers"):
        last.with_layers("middle")


def test_records_file_survives_an_interrupted_append_and_names_a_bad_line(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    recs = [QARecord("a", f"q{i}", "Q?", f"answer {i}") for i in range(3)]
    write_records(recs, path)
    assert read_records(path) == recs
    with path.open("a") as f:
        f.write('{"source": "a", "qid": "q3", "que')  # a crash mid-line
    assert read_records(path) == recs
    path.write_text(path.read_text().replace('"answer 1"', "oops", 1) + "\n")
    with pytest.raises(DataFormatError, match=r"r\.jsonl:2:"):
        read_records(path)


# --- answers per source (tiny random model) -------------------------------------------------------
QS = QuestionSet(
    "t",
    tuple(
        Question(f"t/{i}", f"Question number {i} about {w}?", "t", "value")
        for i, w in enumerate(["cats", "rain", "maps", "tea", "law", "art", "war", "sea"])
    ),
    "test",
)
SAMPLE = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0, seed=0)


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny_model()


def test_a_row_samples_the_same_answer_whatever_its_batch(lm: LoadedModel) -> None:
    prompts = [q.text for q in QS.questions]
    seeds = list(range(len(prompts)))
    full = generate(lm, prompts, None, SAMPLE, seeds=seeds)
    part = generate(lm, prompts[3:5], None, SAMPLE, seeds=seeds[3:5])
    assert part == full[3:5]
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(lm, prompts, None, SAMPLE, seeds=[1])


def test_the_answer_cache_returns_identical_records_and_regenerates_when_a_key_changes(
    lm: LoadedModel, tmp_path
) -> None:
    from repe.directions import Direction
    from steering.spec import SteeringSpec

    cache = AnswerCache(tmp_path)
    base = Source("base", None, None, SAMPLE)
    first = collect_answers(lm, [base], QS, cache=cache, progress=False)
    assert first.generated == len(QS) and first.complete
    again = collect_answers(
        lm, [Source("renamed", None, None, SAMPLE)], QS, cache=cache, progress=False
    )
    assert again.generated == 0
    assert [(r.qid, r.answer) for r in again.records] == [(r.qid, r.answer) for r in first.records]
    assert {r.source for r in again.records} == {"renamed"}
    v = torch.ones(lm.identity.d_model)
    spec = SteeringSpec(
        Direction({"blocks.1.hook_resid_post": v}, lm.identity, name="v"), 4.0, scale="unit"
    )
    changed = {
        "persona": (Source("p", "You are terse.", None, SAMPLE), QS, lm),
        "spec": (Source("s", None, spec, SAMPLE), QS, lm),
        "sampling": (
            Source("x", None, None, GenerationConfig(max_new_tokens=6, do_sample=True, seed=1)),
            QS,
            lm,
        ),
        "questions": (base, QS.sample(5, seed=1), lm),
        "model": (base, QS, tiny_model(seed=1)),
    }
    for what, (src, qs, model) in changed.items():
        out = collect_answers(model, [src], qs, cache=cache, progress=False)
        assert out.generated == len(qs), what
    # the coefficient is part of the spec's key
    out = collect_answers(
        lm,
        [Source("s2", None, SteeringSpec(spec.direction, 2.0, scale="unit"), SAMPLE)],
        QS,
        cache=cache,
        progress=False,
    )
    assert out.generated == len(QS)


def test_cancel_keeps_what_is_done_and_a_resumed_run_matches_an_uninterrupted_one(
    lm: LoadedModel, tmp_path
) -> None:
    calls = iter([False, True])
    src = [Source("a", None, None, SAMPLE)]
    part = collect_answers(
        lm,
        src,
        QS,
        cache=AnswerCache(tmp_path / "c1"),
        batch_size=3,
        progress=False,
        should_stop=lambda: next(calls),
    )
    assert not part.complete and len(part.records) == 3
    rest = collect_answers(
        lm, src, QS, cache=AnswerCache(tmp_path / "c1"), batch_size=3, progress=False
    )
    assert rest.generated == len(QS) - 3 and rest.complete
    whole = collect_answers(
        lm, src, QS, cache=AnswerCache(tmp_path / "c2"), batch_size=8, progress=False
    )
    assert [r.answer for r in rest.records] == [r.answer for r in whole.records]


def test_two_sources_differing_only_in_the_seed_are_not_separable(
    lm: LoadedModel, tmp_path
) -> None:
    qs = QuestionSet(
        "many",
        tuple(Question(f"m/{i}", f"Tell me about item {i}.", "many", "value") for i in range(80)),
        "test",
    )
    srcs = [
        Source(f"seed{s}", None, None, GenerationConfig(max_new_tokens=8, do_sample=True, seed=s))
        for s in (1, 2)
    ]
    recs = collect_answers(lm, srcs, qs, cache=AnswerCache(tmp_path), progress=False).records
    tr = [r for r in recs if int(r.qid[2:]) < 40]
    te = [r for r in recs if int(r.qid[2:]) >= 40]
    acc = identify_tfidf(
        [r.text() for r in tr],
        [r.source for r in tr],
        [r.text() for r in te],
        [r.source for r in te],
        [r.qid for r in te],
        k=15,
    )
    assert acc.ci1[0] <= 0.5 <= acc.ci1[1] or abs(acc.acc1 - 0.5) < 0.12


def test_sources_need_unique_one_line_names(lm: LoadedModel, tmp_path) -> None:
    with pytest.raises(ValueError, match="one-line"):
        Source("a\nb")
    with pytest.raises(ValueError, match="unique"):
        collect_answers(
            lm, [Source("a"), Source("a")], QS, cache=AnswerCache(tmp_path), progress=False
        )
