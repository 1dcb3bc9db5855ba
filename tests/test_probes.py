"""probes: readers on planted signals, sweeps and directions on the tiny model, scans, plots, runner."""

from __future__ import annotations

import html
import json
import math

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from probes import (
    LAT,
    Logistic,
    MeanDiff,
    PCADiff,
    RandomDirection,
    make_reader,
    probe_dataset,
    reader_names,
    resolve_concept,
    run_probe,
    scan,
    scan_html,
    sweep,
)
from probes.sweep import _auroc_rows, split_indices
from repe.capture import capture
from repe.datasets import ContrastDataset, ContrastPair
from repe.directions import Direction
from repe.errors import DataFormatError

ALL_READERS = ["mean_diff", "pca_diff", "pca_center", "lat", "logistic", "random"]


# ---- planted data ----------------------------------------------------------------------------
def planted(n: int, d: int, signal: float, seed: int = 0, smax: float = 2.0):
    """pos = noise + signal*u, neg = noise - signal*u; the noise is anisotropic (scales 0.2..smax in
    a random basis that holds u, with scale 1 along u) and independent between the two sides."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    u = Q[:, 0]
    scales = torch.linspace(0.2, smax, d, dtype=torch.float64)
    scales[0] = 1.0

    def noise() -> torch.Tensor:
        return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ Q.T

    return (noise() + signal * u).float(), (noise() - signal * u).float(), u.float()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


@pytest.fixture(scope="module")
def strong():
    return planted(1000, 32, 3.0)


@pytest.fixture(scope="module")
def overlapping():
    # logistic regression finds the Bayes direction, which is u only when the classes overlap
    # (on separable data it drifts toward a max-margin direction)
    return planted(4000, 16, 1.5, seed=1)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("mean_diff", {}),
        ("pca_diff", {}),
        ("pca_center", {}),
        ("lat", {}),
        ("lat", {"pairing": "random"}),
        ("logistic", {}),
    ],
)
def test_reader_recovers_planted_direction(name, params, strong, overlapping):
    P, N, u = overlapping if name == "logistic" else strong
    reader = make_reader(name, **params)
    assert reader.fit(P, N) is reader
    d = reader.direction_
    assert d.dtype == torch.float32 and d.shape == (P.shape[1],)
    assert abs(float(d.norm()) - 1.0) < 1e-6
    assert cos(d, u) > 0.99  # sign included: positive projection = concept present
    assert reader.mean_pos_ > reader.threshold_ > reader.mean_neg_
    assert reader.score(P, N) > 0.9


def test_lat_contrast_pairing_and_centered_pca_diff():
    # repeng's centred pca_diff only sees how the contrast varies between pairs: plant that
    g = torch.Generator().manual_seed(3)
    d, n = 24, 800
    u = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    base = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    amp = torch.rand(n, 1, generator=g, dtype=torch.float64) * 4 + 0.5
    P = base + amp * u + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    N = base - amp * u + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    assert cos(PCADiff(center=True).fit(P, N).direction_, u.float()) > 0.99
    assert cos(LAT().fit(P, N).direction_, u.float()) > 0.99
    assert cos(MeanDiff().fit(P, N).direction_, PCADiff().fit(P, N).direction_) > 0.99


def test_mean_diff_and_pca_diff_agree_on_clean_data():
    P, N, u = planted(200, 48, 3.0, seed=5, smax=0.3)
    md, pd = MeanDiff().fit(P, N).direction_, PCADiff().fit(P, N).direction_
    assert cos(md, pd) > 0.99
    assert cos(md, u) > 0.99


def test_random_baseline_is_near_chance_on_held_out_data():
    P, N, u = planted(600, 256, 3.0, seed=2)
    accs, aurocs = [], []
    for seed in range(20):
        r = RandomDirection(seed=seed).fit(P[:300], N[:300])
        accs.append(r.score(P[300:], N[300:]))
        s = torch.cat([r.project(P[300:]), r.project(N[300:])]).numpy()
        aurocs.append(roc_auc_score(np.r_[np.ones(300), np.zeros(300)], s))
        assert abs(cos(r.direction_, u)) < 0.3
    assert 0.4 < float(np.mean(accs)) < 0.6
    assert 0.35 < float(np.mean(aurocs)) < 0.65
    # ... while a real reader on the same split is far above it
    assert MeanDiff().fit(P[:300], N[:300]).score(P[300:], N[300:]) > 0.95


@pytest.mark.parametrize("name", ALL_READERS)
def test_sign_calibration_survives_shuffles_and_flips_when_swapped(name, strong):
    P, N, _ = strong
    P, N = P[:400], N[:400]
    reader = make_reader(name).fit(P, N)
    d = reader.direction_
    assert float(reader.project(P).mean()) > float(reader.project(N).mean())
    perm = torch.randperm(len(P), generator=torch.Generator().manual_seed(7))
    shuffled = make_reader(name).fit(P[perm], N[perm]).direction_
    swapped = make_reader(name).fit(N, P)
    assert float(swapped.project(N).mean()) > float(swapped.project(P).mean())
    if name == "random":  # same vector, sign decided by the data
        assert torch.equal(shuffled, d) and torch.equal(swapped.direction_, -d)
    else:
        assert cos(shuffled, d) > 0.99
        assert cos(swapped.direction_, d) < -0.99


@pytest.mark.parametrize("name", ALL_READERS)
def test_same_data_and_seed_give_bit_identical_directions(name, strong):
    P, N, _ = strong
    P, N = P[:300], N[:300]
    a = make_reader(name).fit(P, N)
    b = make_reader(name).fit(P.clone(), N.clone())
    assert torch.equal(a.direction_, b.direction_)
    assert a.threshold_ == b.threshold_
    assert torch.equal(clone(a).fit(P, N).direction_, a.direction_)


def test_seeds_matter_for_seeded_readers(strong):
    P, N, _ = strong
    assert not torch.equal(
        RandomDirection(seed=0).fit(P, N).direction_, RandomDirection(seed=1).fit(P, N).direction_
    )
    for pairing in ("contrast", "random"):
        a = LAT(pairing=pairing, seed=0).fit(P, N).direction_
        assert not torch.equal(a, LAT(pairing=pairing, seed=1).fit(P, N).direction_)


def test_numpy_input_and_decision_rule(strong):
    P, N, _ = strong
    r = MeanDiff().fit(P.numpy(), N.numpy())
    dec = r.decision_function(P[:5])
    assert torch.allclose(dec, P[:5].double() @ r.direction_.double() - r.threshold_)
    assert torch.equal(r.predict(P[:5]), (dec > 0).long())
    assert r.threshold_ == pytest.approx(0.5 * (r.mean_pos_ + r.mean_neg_))
    assert 0.0 <= r.pair_accuracy(P, N) <= 1.0


def test_logistic_threshold_is_its_own_boundary(overlapping):
    P, N, _ = overlapping
    r = Logistic(Cs=4, cv=3).fit(P[:500], N[:500])
    assert r.C_ > 0
    assert r.score(P[500:], N[500:]) > 0.9
    assert r.mean_pos_ > r.threshold_ > r.mean_neg_


def test_estimator_conventions():
    r = LAT(seed=3)
    assert r.get_params() == {"pairing": "contrast", "center": True, "seed": 3}
    assert not hasattr(r, "direction_")
    assert "LAT(seed=3)" in repr(r)
    c = clone(r).set_params(seed=4)
    assert c.seed == 4 and r.seed == 3
    with pytest.raises(NotFittedError):
        r.decision_function(torch.zeros(2, 3))
    assert reader_names() == ALL_READERS


# ---- errors ----------------------------------------------------------------------------------
def test_clear_errors():
    P, N = torch.randn(10, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"same shape .*\(10, 8\) and \(9, 8\)"):
        MeanDiff().fit(P, N[:9])
    with pytest.raises(ValueError, match="X_neg must be 2-D"):
        MeanDiff().fit(P, N[0])
    bad = P.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"X_pos contains NaN or inf \(first at row 3\)"):
        MeanDiff().fit(bad, N)
    with pytest.raises(ValueError, match="at least 2 contrast pairs to fit a reader; got 1"):
        MeanDiff().fit(P[:1], N[:1])
    with pytest.raises(TypeError, match="X_pos must be a torch.Tensor"):
        MeanDiff().fit(P.tolist(), N)
    with pytest.raises(ValueError, match=r"unknown reader 'svm'; valid names: mean_diff, pca_diff"):
        make_reader("svm")
    with pytest.raises(ValueError, match=r"reader 'mean_diff' has no parameter\(s\) \['seed'\]"):
        make_reader("mean_diff", seed=1)
    with pytest.raises(
        ValueError,
        match=r"LAT: parameter 'pairing' must be one of \('random', 'contrast'\); got 'pairs'",
    ):
        LAT(pairing="pairs").fit(P, N)
    with pytest.raises(ValueError, match="parameter 'cv' must be an integer >= 2; got 1"):
        Logistic(cv=1).fit(P, N)
    with pytest.raises(ValueError, match="no direction"):
        MeanDiff().fit(P, P)
    r = MeanDiff().fit(P, N)
    with pytest.raises(ValueError, match="X has 7 features; MeanDiff was fitted on 8"):
        r.decision_function(torch.randn(4, 7))


# ---- sweeps on the tiny model ----------------------------------------------------------------
SUBJECTS = [
    "The cat",
    "A dog",
    "My friend",
    "The teacher",
    "Our neighbour",
    "The river",
    "This car",
]
VERBS = ["likes", "sees", "finds", "wants", "makes"]


@pytest.fixture(scope="module")
def toy_dataset() -> ContrastDataset:
    pairs = [
        ContrastPair(f"{s} {v} it, yes", f"{s} {v} it, no", meta={"group": i})
        for i, s in enumerate(SUBJECTS)
        for v in VERBS
    ]
    return ContrastDataset("toy/yesno", pairs)


@pytest.fixture(scope="module")
def toy_sweep(tiny_lm, toy_dataset):
    return probe_dataset(
        tiny_lm,
        toy_dataset,
        readers=["mean_diff", "pca_diff", "lat", Logistic(Cs=3, cv=3), "random"],
        n_boot=300,
        progress=False,
        batch_size=8,
        threads=1,
    )


def test_split_respects_groups(toy_dataset):
    tr, te = split_indices(toy_dataset, 0.7, seed=0)
    assert sorted(tr + te) == list(range(len(toy_dataset)))
    groups_tr = {toy_dataset[i].meta["group"] for i in tr}
    groups_te = {toy_dataset[i].meta["group"] for i in te}
    assert groups_tr and groups_te and not groups_tr & groups_te


def test_sweep_scores_every_reader_and_site_with_cis(toy_sweep, tiny_lm):
    res = toy_sweep
    assert res.sites == [f"blocks.{i}.hook_resid_post" for i in range(tiny_lm.n_layers)]
    assert res.readers == ["mean_diff", "pca_diff", "lat", "logistic", "random"]
    assert len(res.scores) == 5 * len(res.sites)
    for s in res.scores:
        assert s.accuracy_ci is not None and s.auroc_ci is not None
        assert s.accuracy_ci[0] <= s.accuracy <= s.accuracy_ci[1]
        assert s.auroc_ci[0] <= s.auroc <= s.auroc_ci[1]
        assert 0.0 <= s.auroc <= 1.0 and 0.0 <= s.accuracy <= 1.0
        assert s.n_train + s.n_test == 35
    best = res.best()
    assert best.reader != "random" and best.site in res.sites
    assert best.auroc == max(s.auroc for s in res.scores if s.reader != "random")
    assert best.auroc > 0.9  # the last token differs ("yes" vs "no"): easy even for random weights
    for r in res.readers:
        assert res.best_site(r) in res.sites
    rows = res.rows()
    assert len(rows) == len(res.scores) and {"reader", "site", "auroc_lo"} <= set(rows[0])
    text = res.table()
    assert "best:" in text and all(s in text for s in res.sites)
    assert "95% CI" in res.table("lat")


def test_sweep_is_deterministic(tiny_lm, toy_dataset, toy_sweep):
    again = probe_dataset(
        tiny_lm,
        toy_dataset,
        readers=["mean_diff", "pca_diff", "lat", Logistic(Cs=3, cv=3), "random"],
        n_boot=300,
        progress=False,
        batch_size=8,
    )
    assert again.rows() == toy_sweep.rows()


def test_sweep_on_site_reports_each_site_and_can_stop_it(tiny_lm, toy_dataset):
    tr, te = split_indices(toy_dataset, 0.7, seed=0)
    sites = [f"blocks.{i}.hook_resid_post" for i in range(tiny_lm.n_layers)]
    pos = capture(tiny_lm, toy_dataset.positives(), sites, progress=False)
    neg = capture(tiny_lm, toy_dataset.negatives(), sites, progress=False)
    seen: list[tuple[int, int]] = []
    sweep(pos, neg, tr, te, ["mean_diff"], n_boot=0, on_site=lambda i, n: seen.append((i, n)))
    assert seen == [(i, len(sites)) for i in range(1, len(sites) + 1)]

    def stop(i: int, n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(pos, neg, tr, te, ["mean_diff"], n_boot=0, on_site=stop)


def test_bootstrap_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    sp, sn = rng.normal(0.5, 1, 40), rng.normal(0, 1, 40)
    sp[:5] = sn[:5]  # ties
    ref = roc_auc_score(np.r_[np.ones(40), np.zeros(40)], np.r_[sp, sn])
    assert _auroc_rows(sp[None], sn[None])[0] == pytest.approx(ref, abs=1e-12)


def test_sweep_input_errors(tiny_lm, toy_dataset):
    texts = [p.positive for p in toy_dataset][:6]
    pos = capture(tiny_lm, texts, "blocks.1.hook_resid_post", progress=False)
    neg = capture(tiny_lm, [t + "!" for t in texts], "blocks.1.hook_resid_post", progress=False)
    with pytest.raises(ValueError, match="overlap"):
        sweep(pos, neg, [0, 1, 2], [2, 3])
    with pytest.raises(ValueError, match="out of range"):
        sweep(pos, neg, [0, 1, 2], [9])
    with pytest.raises(ValueError, match="train_idx needs at least 2 pairs"):
        sweep(pos, neg, [0], [2, 3])
    with pytest.raises(ValueError, match="unknown reader"):
        sweep(pos, neg, [0, 1, 2], [3, 4], ["nope"])
    with pytest.raises(ValueError, match="appears twice"):
        sweep(pos, neg, [0, 1, 2], [3, 4], ["lat", LAT(seed=2)])
    other = capture(tiny_lm, texts[:5], "blocks.1.hook_resid_post", progress=False)
    with pytest.raises(ValueError, match="same number of examples"):
        sweep(pos, other, [0, 1, 2], [3, 4])
    with pytest.raises(ValueError, match="threads must be None or an integer >= 1; got 0"):
        probe_dataset(tiny_lm, toy_dataset, threads=0)
    with pytest.raises(ValueError, match="n_boot must be an integer >= 0; got -1"):
        sweep(pos, neg, [0, 1, 2], [3, 4], n_boot=-1)
    res = sweep(pos, neg, [0, 1, 2], [3, 4, 5], ["mean_diff"], n_boot=0)
    assert res.scores[0].auroc_ci is None
    with pytest.raises(ValueError, match="reader 'lat' was not part of this sweep"):
        res.to_direction("lat")


def test_to_direction_round_trips_exactly(toy_sweep, tiny_lm, toy_dataset, tmp_path):
    d = toy_sweep.to_direction("mean_diff", name="yesno")
    assert isinstance(d, Direction)
    assert d.sites == toy_sweep.sites
    assert d.best_site == toy_sweep.best_site("mean_diff")
    assert d.dataset_fingerprint == toy_dataset.fingerprint()
    assert d.method == "mean_diff" and d.params["reader"] == "mean_diff"
    for site in d.sites:
        assert torch.equal(d[site], toy_sweep.fitted["mean_diff"][site].direction_)
        assert abs(float(d[site].norm()) - 1.0) < 1e-6
        assert set(d.stats[site]) == {"mean_diff_norm", "contrast_norm", "threshold"}
        assert d.stats[site]["mean_diff_norm"] > 0 and d.stats[site]["contrast_norm"] > 0
        assert d.metrics[site]["auroc"] == toy_sweep.score("mean_diff", site).auroc
    d.save(tmp_path / "yesno")
    back = Direction.load(tmp_path / "yesno", model=tiny_lm)
    assert back.sites == d.sites
    for site in d.sites:
        assert torch.equal(back[site], d[site])
    assert back.metadata() == d.metadata()
    only_best = toy_sweep.to_direction("lat", sites="best")
    assert only_best.sites == [toy_sweep.best_site("lat")] == [only_best.best_site]
    some = toy_sweep.to_direction("lat", sites=["blocks.0.hook_resid_post"])
    assert some.sites == ["blocks.0.hook_resid_post"]
    with pytest.raises(ValueError, match="not among"):
        toy_sweep.to_direction("lat", sites=["blocks.9.hook_resid_post"])


def test_tables_to_files(toy_sweep, tmp_path):
    toy_sweep.write_csv(tmp_path / "t.csv")
    data = json.loads(toy_sweep.write_json(tmp_path / "t.json").read_text())
    lines = (tmp_path / "t.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + len(toy_sweep.scores)
    assert data["best"]["site"] == toy_sweep.best_site()
    assert len(data["rows"]) == len(toy_sweep.scores)


# ---- scans -----------------------------------------------------------------------------------
def test_scan_gives_one_projection_per_token_and_html_escapes(toy_sweep, tiny_lm):
    d = toy_sweep.to_direction("mean_diff")
    text = "Is 3 < 4? <b>yes</b> & no"
    res = scan(tiny_lm, text, d)
    ids = tiny_lm.tokenizer(text)["input_ids"]
    assert len(res) == len(ids) == len(res.values) == len(res.raw)
    assert res.site == d.best_site
    assert "".join(res.tokens) == text
    acts = capture(tiny_lm, [text], d.best_site, positions="all", progress=False)
    expect = acts.example(d.best_site, 0).double() @ d[d.best_site].double()
    assert torch.allclose(torch.tensor(res.raw, dtype=torch.float64), expect)
    tok, val = res[0]
    assert tok == res.tokens[0] and val == res.values[0]
    page = scan_html(res)
    assert "<b>" not in page and "</b>" not in page and " < " not in page
    assert "&lt;" in page and "&amp;" in page
    for tok in res.tokens:
        assert f">{html.escape(tok)}</span>" in page
    centred = scan(tiny_lm, text, d, site="blocks.0.hook_resid_post", center="mean", scale="std")
    assert abs(float(np.mean(centred.values))) < 1e-9
    assert abs(float(np.std(centred.values, ddof=1)) - 1.0) < 1e-9
    thr = scan(tiny_lm, text, d, center="threshold")
    assert thr.center == d.stats[d.best_site]["threshold"]


def test_scan_chat_and_errors(toy_sweep, tiny_lm):
    d = toy_sweep.to_direction("lat")
    conv = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]
    res = scan(tiny_lm, conv, d)
    assert res.assistant_start is not None and 0 < res.assistant_start < len(res)
    assert "<|im_start|>" in "".join(res.tokens)
    with pytest.raises(ValueError, match="center must be"):
        scan(tiny_lm, "hi", d, center="median")
    with pytest.raises(KeyError, match="has no vector"):
        scan(tiny_lm, "hi", d, site="blocks.3.hook_resid_pre")
    no_best = d.select(d.sites)
    object.__setattr__(no_best, "best_site", None)
    with pytest.raises(ValueError, match="pass site="):
        scan(tiny_lm, "hi", no_best)


# ---- plots -----------------------------------------------------------------------------------
def test_plot_builders(toy_sweep, tiny_lm, toy_dataset):
    go = pytest.importorskip("plotly.graph_objects")
    from probes.plots import pca_scatter, sweep_figure
    from probes.scan import scan_figure

    fig = sweep_figure(toy_sweep)
    assert isinstance(fig, go.Figure)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == toy_sweep.readers
    assert list(lines[0].x) == [0, 1, 2, 3]
    assert any(t.fill == "toself" for t in fig.data)  # CI bands
    assert sweep_figure(toy_sweep, "accuracy").layout.yaxis.title.text == "held-out accuracy"
    with pytest.raises(ValueError, match="metric must be one of"):
        sweep_figure(toy_sweep, "f1")
    site = toy_sweep.sites[1]
    pos = capture(tiny_lm, toy_dataset.positives(), site, progress=False)
    neg = capture(tiny_lm, toy_dataset.negatives(), site, progress=False)
    sc = pca_scatter(pos, neg, site)
    assert [t.name for t in sc.data] == ["positive", "negative"]
    assert len(sc.data[0].x) == len(toy_dataset)
    res = scan(tiny_lm, "a <b> c", toy_sweep.to_direction("mean_diff"))
    hm = scan_figure(res, width=4)
    assert isinstance(hm.data[0], go.Heatmap)
    flat = [t for row in hm.data[0].text for t in row if t]
    assert len(flat) == len([t for t in res.tokens if t.replace("\n", "\\n")])
    assert all("<" not in t for t in flat)


# ---- runner ----------------------------------------------------------------------------------
def test_resolve_concept():
    assert resolve_concept("honesty") == "facts/honesty"
    assert resolve_concept("facts/honesty") == "facts/honesty"
    assert resolve_concept("sycophancy") == "caa/sycophancy"
    assert resolve_concept("happiness") == "emotions/happiness"
    with pytest.raises(ValueError, match="unknown concept 'bravery'"):
        resolve_concept("bravery")


def test_run_probe_on_a_pairs_file(tiny_lm, tmp_path):
    rows = [
        {"positive": f"{s} {v} it, yes", "negative": f"{s} {v} it, no"}
        for s in SUBJECTS
        for v in VERBS[:3]
    ]
    data = tmp_path / "yesno.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    report = run_probe(
        tiny_lm,
        data_file=data,
        out_dir=out,
        readers=["mean_diff", "random"],
        max_pairs=15,
        n_boot=100,
        batch_size=8,
        progress=False,
    )
    assert report.n_pairs == 15 and report.reader == "mean_diff"
    for key in ("direction", "direction_json", "table_json", "table_csv", "figure"):
        assert report.paths[key].is_file(), key
    assert report.paths["direction"] == out / "yesno.safetensors"
    html = (out / "sweep.html").read_text()
    # plotly.js is inlined (no <script src=...cdn...>), so the page works offline
    assert "<script src=" not in html and len(html) > 1_000_000
    d = Direction.load(out / "yesno", model=tiny_lm)
    assert d.best_site == report.best_site and d.method == "mean_diff"
    assert json.loads((out / "sweep.json").read_text())["best"]["reader"] == "mean_diff"
    text = report.text()
    assert "yesno" in text and report.best_site in text and "held-out AUROC" in text
    with pytest.raises(ValueError, match="exactly one of concept and data_file"):
        run_probe(tiny_lm, "honesty", data_file=data, out_dir=out)
    with pytest.raises(ValueError, match="exactly one of concept and data_file"):
        run_probe(tiny_lm, out_dir=out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"positive": "a"}\n')
    with pytest.raises(DataFormatError):
        run_probe(tiny_lm, data_file=bad, out_dir=out)


def test_nan_free_metrics(toy_sweep):
    for s in toy_sweep.scores:
        assert all(math.isfinite(v) for v in (s.accuracy, s.auroc, s.pair_accuracy, s.cohens_d))


def test_scan_colour_scale_leaves_the_attention_sink_out() -> None:
    """The first token's huge activation (the attention sink) must not set the colour scale: on
    SmolLM2 it is ~2.5e3 while the others are ~1, and every other token looked neutral."""
    from probes.scan import ScanResult, colour_scale

    values = [2500.0, 1.0, -0.8, 0.5, -1.2, 0.9, 0.1, -0.3, 0.7, 1.1]
    res = ScanResult(
        tokens=[f"t{i}" for i in range(len(values))],
        values=values,
        raw=values,
        site="blocks.1.hook_resid_post",
        direction="d",
        center=0.0,
        scale=1.0,
    )
    top = colour_scale(values)
    assert 1.0 <= top <= 1.2, top
    page = scan_html(res)
    # the second token (value 1.0) is strongly green, not near-white as under a 2500 scale
    marker = 'title="&#x27;t1&#x27;: +1.000" style="background:#'
    assert marker in page
    colour = page.split(marker)[1][:6]
    r, g, b = (int(colour[i : i + 2], 16) for i in (0, 2, 4))
    assert g - r > 80, colour
    # the legend chips are readable: white bold text on the saturated colours
    assert page.count("color:#fff;font-weight:600") == 2
    assert "the first token is left out of the scale" in page


def test_a_stored_sweep_comes_back_the_same(toy_sweep, tiny_lm, tmp_path):
    """save_sweep / load_sweep: same scores, directions, thresholds and scan; malformed stores are a
    DataFormatError naming the file."""
    from probes.sweep_store import load_sweep, save_sweep
    from repe.errors import DataFormatError

    save_sweep(toy_sweep, tmp_path / "s")
    again = load_sweep(tmp_path / "s")
    assert again.rows() == toy_sweep.rows()
    assert again.best() == toy_sweep.best() and again.readers == toy_sweep.readers
    for reader in toy_sweep.readers:
        a, b = toy_sweep.to_direction(reader), again.to_direction(reader)
        assert a.sites == b.sites and a.stats == b.stats and a.metrics == b.metrics
        for s in a.sites:
            assert torch.equal(a[s], b[s])
    text = "I told the truth."
    d1, d2 = toy_sweep.to_direction("mean_diff"), again.to_direction("mean_diff")
    assert (
        scan(tiny_lm, text, d1, center="threshold").values
        == scan(tiny_lm, text, d2, center="threshold").values
    )
    save_sweep(again, tmp_path / "s")  # replacing a stored sweep works
    (tmp_path / "s" / "sweep.json").write_text('{"kind": "probe_sweep_store", "format_version": 1}')
    with pytest.raises(DataFormatError, match="sweep.json"):
        load_sweep(tmp_path / "s")
    with pytest.raises(DataFormatError, match="no stored sweep"):
        load_sweep(tmp_path / "nothing")
