"""Who answered? Identify the source of single QA records, as UniVaR's evaluation does: kNN over the
training questions' records (k = 50 in the paper) and a linear probe, on the trained head, the frozen
encoder or a bag-of-words (TF-IDF) baseline; acc@1, acc@3 and weighted F1, with bootstrap intervals
over *questions* (a question's records move together). Train and test never share a question."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from jaxtyping import Float
from torch import Tensor

from probes.readers import Rows


def split_questions(
    qids: Sequence[str], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> tuple[set[str], set[str], set[str]]:
    """Disjoint train / validation / test sets of question ids (seeded shuffle of the distinct ids)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1; got {fractions}"
        )
    unique = sorted(set(qids))
    if len(unique) < 3:
        raise ValueError(f"splitting needs >= 3 distinct questions; got {len(unique)}")
    random.Random(seed).shuffle(unique)
    n_train = max(1, round(fractions[0] * len(unique)))
    n_val = round(fractions[1] * len(unique))
    n_train = min(n_train, len(unique) - 1 - (n_val > 0))
    train = set(unique[:n_train])
    val = set(unique[n_train : n_train + n_val])
    test = set(unique[n_train + n_val :])
    return train, val, test


@dataclass
class IdentifyScores:
    """Source identification on held-out records. ``ci1``: 95% bootstrap interval of acc@1 over test
    questions; ``correct`` / ``qids``: per test record (for paired comparisons)."""

    method: str
    acc1: float
    acc3: float
    f1: float
    ci1: tuple[float, float]
    n_records: int
    n_questions: int
    chance: float
    labels: list[str]
    confusion: list[list[int]]
    correct: np.ndarray = field(repr=False)
    qids: list[str] = field(repr=False)

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "acc1": self.acc1,
            "acc3": self.acc3,
            "f1_weighted": self.f1,
            "acc1_ci95": list(self.ci1),
            "n_records": self.n_records,
            "n_questions": self.n_questions,
            "chance": self.chance,
        }


def _np(x: Rows) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, Tensor) else np.asarray(x, float)


def _group_means(correct: np.ndarray, qids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per question: the sum of correct and the record count."""
    index: dict[str, int] = {}
    for q in qids:
        index.setdefault(q, len(index))
    g = np.array([index[q] for q in qids])
    sums = np.bincount(g, weights=correct.astype(float), minlength=len(index))
    counts = np.bincount(g, minlength=len(index)).astype(float)
    return sums, counts


def bootstrap_ci(
    correct: np.ndarray, qids: Sequence[str], n: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of the accuracy, resampling questions with replacement."""
    sums, counts = _group_means(correct, qids)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(sums), size=(n, len(sums)))
    accs = sums[pick].sum(1) / counts[pick].sum(1)
    return float(np.percentile(accs, 2.5)), float(np.percentile(accs, 97.5))


def bootstrap_difference(
    a: IdentifyScores, b: IdentifyScores, n: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """acc@1 of ``a`` minus that of ``b`` with a 95% bootstrap interval over questions: paired (the
    same resampled questions for both) when both scored the same records, else each side resampled
    on its own questions."""
    rng = np.random.default_rng(seed)
    sa, ca = _group_means(a.correct, a.qids)
    sb, cb = _group_means(b.correct, b.qids)
    if a.qids == b.qids:
        pick = rng.integers(0, len(sa), size=(n, len(sa)))
        diffs = sa[pick].sum(1) / ca[pick].sum(1) - sb[pick].sum(1) / cb[pick].sum(1)
    else:
        pa = rng.integers(0, len(sa), size=(n, len(sa)))
        pb = rng.integers(0, len(sb), size=(n, len(sb)))
        diffs = sa[pa].sum(1) / ca[pa].sum(1) - sb[pb].sum(1) / cb[pb].sum(1)
    point = a.acc1 - b.acc1
    return point, float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def _scores(
    method: str,
    class_scores: np.ndarray,
    labels: list[str],
    test_src: Sequence[str],
    test_qids: Sequence[str],
    seed: int,
) -> IdentifyScores:
    from sklearn.metrics import f1_score

    index = {s: i for i, s in enumerate(labels)}
    unknown = sorted(set(test_src) - set(index))
    if unknown:
        raise ValueError(f"test sources never seen in training: {unknown}")
    y = np.array([index[s] for s in test_src])
    ranked = np.argsort(-class_scores, axis=1, kind="stable")
    top1 = ranked[:, 0]
    correct = top1 == y
    acc3 = float((ranked[:, : min(3, len(labels))] == y[:, None]).any(1).mean())
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(confusion, (y, top1), 1)
    return IdentifyScores(
        method=method,
        acc1=float(correct.mean()),
        acc3=acc3,
        f1=float(f1_score(y, top1, labels=range(len(labels)), average="weighted", zero_division=0)),
        ci1=bootstrap_ci(correct, test_qids, seed=seed),
        n_records=len(y),
        n_questions=len(set(test_qids)),
        chance=1.0 / len(labels),
        labels=labels,
        confusion=confusion.tolist(),
        correct=correct,
        qids=list(test_qids),
    )


def _check(
    train: np.ndarray, test: np.ndarray, train_src: Sequence[str], test_src: Sequence[str]
) -> None:
    if len(train) != len(train_src) or len(test) != len(test_src):
        raise ValueError("embeddings and source labels differ in length")
    if len(train) == 0 or len(test) == 0:
        raise ValueError("identification needs training and test records")
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train and test embeddings differ in width: {train.shape[1]} vs {test.shape[1]}"
        )
    if not (np.isfinite(train).all() and np.isfinite(test).all()):
        raise ValueError("the embeddings contain NaN or inf")


def knn_class_scores(
    train: np.ndarray, train_y: np.ndarray, test: np.ndarray, n_classes: int, k: int
) -> np.ndarray:
    """Votes of the k most cosine-similar training rows per test row (ties broken by summed
    similarity)."""
    tn = train / np.linalg.norm(train, axis=1, keepdims=True).clip(1e-12)
    sn = test / np.linalg.norm(test, axis=1, keepdims=True).clip(1e-12)
    sims = sn @ tn.T
    k = min(k, len(train))
    nn = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    out = np.zeros((len(test), n_classes))
    rows = np.arange(len(test))[:, None]
    np.add.at(out, (np.broadcast_to(rows, nn.shape), train_y[nn]), 1.0 + 1e-3 * sims[rows, nn])
    return out


def identify_knn(
    train_emb: Rows,
    train_src: Sequence[str],
    test_emb: Rows,
    test_src: Sequence[str],
    test_qids: Sequence[str],
    k: int = 50,
    method: str = "knn",
    seed: int = 0,
) -> IdentifyScores:
    """kNN source identification (cosine, majority vote of ``k`` neighbours)."""
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    train, test = _np(train_emb), _np(test_emb)
    _check(train, test, train_src, test_src)
    labels = sorted(set(train_src))
    index = {s: i for i, s in enumerate(labels)}
    y = np.array([index[s] for s in train_src])
    scores = knn_class_scores(train, y, test, len(labels), k)
    return _scores(method, scores, labels, test_src, test_qids, seed)


def identify_linear(
    train_emb: Rows,
    train_src: Sequence[str],
    test_emb: Rows,
    test_src: Sequence[str],
    test_qids: Sequence[str],
    method: str = "linear",
    seed: int = 0,
) -> IdentifyScores:
    """A logistic-regression probe (scikit-learn, L2, C=1) from embedding to source."""
    from sklearn.linear_model import LogisticRegression

    train, test = _np(train_emb), _np(test_emb)
    _check(train, test, train_src, test_src)
    labels = sorted(set(train_src))
    index = {s: i for i, s in enumerate(labels)}
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(train, np.array([index[s] for s in train_src]))
    proba = np.zeros((len(test), len(labels)))
    proba[:, clf.classes_] = clf.predict_proba(test)
    return _scores(method, proba, labels, test_src, test_qids, seed)


def tfidf_features(
    train_texts: Sequence[str], test_texts: Sequence[str]
) -> tuple[Float[np.ndarray, "n v"], Float[np.ndarray, "m v"]]:
    """TF-IDF vectors (vocabulary fitted on the training texts only)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(sublinear_tf=True)
    train = vec.fit_transform(train_texts).toarray()
    return train, vec.transform(test_texts).toarray()


def identify_tfidf(
    train_texts: Sequence[str],
    train_src: Sequence[str],
    test_texts: Sequence[str],
    test_src: Sequence[str],
    test_qids: Sequence[str],
    k: int = 50,
    seed: int = 0,
) -> IdentifyScores:
    """The bag-of-words baseline: kNN over TF-IDF vectors."""
    train, test = tfidf_features(train_texts, test_texts)
    return identify_knn(train, train_src, test, test_src, test_qids, k, "tfidf_knn", seed)
