"""The trainable projection head over frozen sentence embeddings, trained with UniVaR's objective.

Each training *view* joins ``k ~ U{1, lambda}`` QA records of one source; two views of the same source
are a positive pair and the other sources' views in the batch are the negatives (symmetric InfoNCE with a
fixed logit scale, 50 in UniVaR). The encoder is frozen, so every record is encoded once; a view is the
head applied to the mean of its records' embeddings (UniVaR encodes the joined text instead).

By default the two views of every source in a step are drawn from the *same* questions for all sources
(``matched_questions``): the negatives then share the positives' questions, so what the question is says
nothing about who answered and the head has to learn from the answers. Early stopping watches the loss
on validation *questions* that training never sees.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from repe.artifacts import check_version, register


@dataclass(frozen=True)
class HeadConfig:
    """``dim``: output size; 0 (the default) keeps the encoder's width with a *residual* linear map
    ``x + W x`` whose ``W`` starts at zero, so training starts from the frozen encoder and weight decay
    pulls back towards it; ``hidden``: 0 for a linear map, else one GELU hidden layer of this size;
    ``max_views``: UniVaR's lambda; ``batch_sources``: sources per step (capped at the number of
    sources); ``whiten``: shrinkage of the ZCA whitening fitted on the training records before the
    map (the question's topic dominates a sentence embedding; whitening lets the rarer directions
    that tell sources apart count; off by default: on planted data it hurt); ``ensemble``: members
    trained independently (seeds ``seed``, ``seed + 1``, ...; each with its own early stopping),
    whose unit outputs are joined and renormalised (``ensemble * dim`` wide): on 8 sources x 32-token
    answers one head's accuracy moved by +-0.03 with its seed, which an ensemble of 5 averages out."""

    dim: int = 0
    hidden: int = 0
    max_views: int = 5
    logit_scale: float = 50.0
    batch_sources: int = 32
    matched_questions: bool = True
    lr: float = 3e-3
    weight_decay: float = 1e-2
    max_epochs: int = 60
    steps_per_epoch: int = 25
    patience: int = 8
    val_batches: int = 8
    whiten: float = 0.0
    ensemble: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 0 or self.hidden < 0:
            raise ValueError(
                f"HeadConfig.dim and hidden must be >= 0; got {self.dim}, {self.hidden}"
            )
        for name in ("max_views", "batch_sources", "max_epochs", "steps_per_epoch", "ensemble"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeadConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.logit_scale <= 0:
            raise ValueError(f"HeadConfig.logit_scale must be > 0; got {self.logit_scale}")


class ValueHead(nn.Module):
    """Frozen embedding -> unit vector in the value space."""

    def __init__(self, d_in: int, config: HeadConfig | None = None) -> None:
        super().__init__()
        self.config = config or HeadConfig()
        c = self.config
        dim = c.dim or d_in
        self.residual = c.dim == 0
        self.net = self._make(d_in, dim)
        # members 2.. of an ensemble (member 1 is ``net``, so a single head keeps its tensor names)
        self.more = nn.ModuleList(self._make(d_in, dim) for _ in range(c.ensemble - 1))
        self.d_in = d_in
        self.d_out = dim * c.ensemble
        self.register_buffer("center", torch.zeros(d_in))
        # empty without whitening: an identity d_in x d_in would be 21 MB of the artifact on the
        # six-layer features
        self.register_buffer("whitener", torch.eye(d_in) if c.whiten > 0 else torch.empty(0))
        self.history: list[dict[str, float]] = []
        self.best_epoch = 0

    def _make(self, d_in: int, dim: int) -> nn.Module:
        c = self.config
        last = nn.Linear(c.hidden or d_in, dim)
        net: nn.Module = (
            last if c.hidden == 0 else nn.Sequential(nn.Linear(d_in, c.hidden), nn.GELU(), last)
        )
        if self.residual:  # start as the frozen encoder itself
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        return net

    def members(self) -> list[nn.Module]:
        return [self.net, *self.more]

    def fit_whitening(self, x: Float[Tensor, "n d_in"]) -> None:
        """ZCA whitening with shrinkage ``config.whiten`` from the training records."""
        c = self.config.whiten
        if c <= 0:
            return
        mu = x.mean(0)
        cov = torch.cov((x - mu).T)
        cov = (1 - c) * cov + c * cov.trace() / x.shape[1] * torch.eye(x.shape[1])
        vals, vecs = torch.linalg.eigh(cov)
        self.center: Tensor
        self.whitener: Tensor
        self.center.copy_(mu)
        self.whitener.copy_(vecs @ torch.diag(vals.clamp(min=1e-12).rsqrt()) @ vecs.T)

    def forward(self, x: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_out"]:
        center: Tensor = self.center
        whitener: Tensor = self.whitener
        if whitener.numel():
            x = (x - center) @ whitener
        outs = [
            nn.functional.normalize(x + net(x) if self.residual else net(x), dim=-1)
            for net in self.members()
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1) / math.sqrt(len(outs))

    @torch.no_grad()
    def embed(self, x: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_out"]:
        self.eval()
        return self(x.float())


def info_nce(
    a: Float[Tensor, "b d"], b: Float[Tensor, "b d"], scale: float = 50.0
) -> Float[Tensor, ""]:
    """Symmetric InfoNCE: row i of ``a`` should match row i of ``b`` against every other row (both
    directions, averaged). Inputs are unit vectors; ``scale`` multiplies the cosine similarities."""
    if a.shape != b.shape or a.shape[0] < 2:
        raise ValueError(f"info_nce needs two [B, D] batches with B >= 2; got {a.shape}, {b.shape}")
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return (
        nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)
    ) / 2


@dataclass
class _Pool:
    """Row indices of the records, by source and question."""

    by_source: dict[str, list[int]] = field(default_factory=dict)
    by_pair: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    questions: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, sources: Sequence[str], qids: Sequence[str], keep: set[str]) -> _Pool:
        pool = cls()
        seen: dict[str, None] = {}
        for i, (s, q) in enumerate(zip(sources, qids, strict=True)):
            if q in keep:
                pool.by_source.setdefault(s, []).append(i)
                pool.by_pair.setdefault((s, q), []).append(i)
                seen.setdefault(q)
        pool.questions = list(seen)
        return pool


def _views(
    pool: _Pool, names: list[str], c: HeadConfig, rng: random.Random
) -> tuple[list[list[int]], list[list[int]]]:
    """Two views (lists of record rows) for each source in ``names``."""
    k1, k2 = rng.randint(1, c.max_views), rng.randint(1, c.max_views)
    va: list[list[int]] = []
    vb: list[list[int]] = []
    if c.matched_questions and len(pool.questions) >= 2:
        qs = rng.sample(pool.questions, min(len(pool.questions), k1 + k2))
        cut = max(1, min(k1, len(qs) - 1))
        qa, qb = qs[:cut], qs[cut:]
        for s in names:
            rows_a = [r for q in qa for r in pool.by_pair.get((s, q), [])[:1]]
            rows_b = [r for q in qb for r in pool.by_pair.get((s, q), [])[:1]]
            if not rows_a or not rows_b:  # this source lacks those questions: fall back
                rows = rng.sample(pool.by_source[s], min(len(pool.by_source[s]), k1 + k2))
                rows_a, rows_b = rows[: max(1, len(rows) // 2)], rows[max(1, len(rows) // 2) :]
                rows_b = rows_b or rows_a
            va.append(rows_a)
            vb.append(rows_b)
        return va, vb
    for s in names:
        rows = pool.by_source[s]
        pick = rng.sample(rows, min(len(rows), k1 + k2))
        cut = max(1, min(k1, len(pick) - 1))
        va.append(pick[:cut])
        vb.append(pick[cut:] or pick[:cut])
    return va, vb


def _pooled(emb: Tensor, views: list[list[int]]) -> Tensor:
    return torch.stack([emb[rows].mean(0) for rows in views])


def _batches(pool: _Pool, c: HeadConfig, rng: random.Random) -> list[list[str]]:
    names = list(pool.by_source)
    rng.shuffle(names)
    n = min(c.batch_sources, len(names))
    return [names[i : i + n] for i in range(0, len(names) - n + 1, n)] or [names]


def train_head(
    emb: Float[Tensor, "n d"],
    sources: Sequence[str],
    qids: Sequence[str],
    train_questions: set[str],
    val_questions: set[str] | None = None,
    config: HeadConfig | None = None,
    progress: bool = False,
) -> ValueHead:
    """Train a :class:`ValueHead` on the records whose question is in ``train_questions``; early
    stopping (and the kept weights) by the InfoNCE loss on ``val_questions`` (fixed, seeded views).
    ``emb`` holds the frozen encoder's embeddings of every record, row-aligned with ``sources`` and
    ``qids``. Raises when the two question sets overlap."""
    c = config or HeadConfig()
    if len(emb) != len(sources) or len(emb) != len(qids):
        raise ValueError(
            f"emb, sources and qids differ in length: {len(emb)}, {len(sources)}, {len(qids)}"
        )
    if not torch.isfinite(emb).all():
        raise ValueError("the embeddings contain NaN or inf")
    if val_questions and train_questions & val_questions:
        raise ValueError("train and validation questions overlap: a question must be in one split")
    train = _Pool.build(sources, qids, train_questions)
    if len(train.by_source) < 2:
        raise ValueError(
            f"training needs >= 2 sources with training records; got {len(train.by_source)}"
        )
    val = _Pool.build(sources, qids, val_questions) if val_questions else None
    if val is not None and len(val.by_source) < 2:
        val = None
    emb = emb.float()
    whiten_on = emb[[i for i, q in enumerate(qids) if q in train_questions]]
    if c.ensemble == 1:
        return _train_one(emb, whiten_on, train, val, c, progress, "train value head")
    heads = [
        _train_one(
            emb,
            whiten_on,
            train,
            val,
            replace(c, ensemble=1, seed=c.seed + i),
            progress,
            f"train value head {i + 1}/{c.ensemble}",
        )
        for i in range(c.ensemble)
    ]
    head = ValueHead(emb.shape[1], c)
    head.load_state_dict(heads[0].state_dict(), strict=False)  # net and the whitening buffers
    for slot, member in zip(head.more, heads[1:], strict=True):
        slot.load_state_dict(member.net.state_dict())
    head.history = [{"member": float(i), **row} for i, h in enumerate(heads) for row in h.history]
    head.best_epoch = heads[0].best_epoch
    head.eval()
    return head


def _train_one(
    emb: Float[Tensor, "n d"],
    whiten_on: Float[Tensor, "m d"],
    train: _Pool,
    val: _Pool | None,
    c: HeadConfig,
    progress: bool,
    desc: str,
) -> ValueHead:
    torch.manual_seed(c.seed)
    head = ValueHead(emb.shape[1], c)
    head.fit_whitening(whiten_on)
    opt = torch.optim.AdamW(head.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    rng = random.Random(c.seed)
    fixed_val: list[tuple[list[list[int]], list[list[int]]]] = []
    if val is not None:
        vrng = random.Random(c.seed + 1)
        for _ in range(c.val_batches):
            for names in _batches(val, c, vrng):
                if len(names) >= 2:
                    fixed_val.append(_views(val, names, c, vrng))

    def val_loss() -> float:
        head.eval()
        with torch.no_grad():
            losses = [
                info_nce(head(_pooled(emb, a)), head(_pooled(emb, b)), c.logit_scale).item()
                for a, b in fixed_val
            ]
        return sum(losses) / len(losses)

    best = math.inf
    if fixed_val:  # epoch 0: the head as initialised (the frozen encoder, for the residual head)
        best = val_loss()
        head.history.append({"epoch": 0.0, "val_loss": best})
    best_state = copy.deepcopy(head.state_dict())
    bad = 0
    bar = tqdm(range(1, c.max_epochs + 1), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        head.train()
        total, steps = 0.0, 0
        for _ in range(c.steps_per_epoch):
            for names in _batches(train, c, rng):
                if len(names) < 2:
                    continue
                a, b = _views(train, names, c, rng)
                loss = info_nce(head(_pooled(emb, a)), head(_pooled(emb, b)), c.logit_scale)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item()
                steps += 1
        row = {"epoch": float(epoch), "train_loss": total / max(steps, 1)}
        watched = row["train_loss"]
        if fixed_val:
            row["val_loss"] = watched = val_loss()
        head.history.append(row)
        bar.set_postfix(loss=f"{watched:.3f}")
        if watched < best - 1e-4:
            best, bad = watched, 0
            best_state = copy.deepcopy(head.state_dict())
            head.best_epoch = epoch
        else:
            bad += 1
            if bad >= c.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return head


@register("value_head")
class ValueEmbedder:
    """The saved value-embedding head: its weights plus what it was trained on (encoder identity,
    question sets with fingerprints, sources, the answering model) and its metrics."""

    KIND = "value_head"
    FORMAT_VERSION = 1

    RESERVED = ("config", "d_in", "history", "best_epoch")

    def __init__(self, head: ValueHead, info: dict[str, Any] | None = None) -> None:
        clash = sorted(set(info or {}) & set(self.RESERVED))
        if clash:
            raise ValueError(f"info keys {clash} are reserved for the head itself")
        self.head = head
        self.info = dict(info or {})

    def tensors(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    def metadata(self) -> dict[str, Any]:
        return {
            "config": asdict(self.head.config),
            "d_in": self.head.d_in,
            "history": self.head.history,
            "best_epoch": self.head.best_epoch,
            **self.info,
        }

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> ValueEmbedder:
        check_version(meta, cls.KIND, cls.FORMAT_VERSION)
        head = ValueHead(int(meta["d_in"]), HeadConfig(**meta["config"]))
        if head.config.whiten <= 0 and "whitener" in tensors:  # saved as an identity before
            tensors = {**tensors, "whitener": torch.empty(0)}
        missing = set(head.state_dict()) ^ set(tensors)
        if missing:
            from repe.errors import DataFormatError

            raise DataFormatError(f"value_head tensors do not match its config: {sorted(missing)}")
        head.load_state_dict(tensors)
        head.history = list(meta.get("history", []))
        head.best_epoch = int(meta.get("best_epoch", 0))
        head.eval()
        info = {
            k: v for k, v in meta.items() if k not in ("config", "d_in", "history", "best_epoch")
        }
        return cls(head, info)

    def check_encoder(self, identity: dict[str, Any]) -> None:
        """Refuse an encoder other than the one the head was trained on."""
        from repe.errors import ArtifactMismatchError

        made = self.info.get("encoder", {})
        # heads saved before the "layers" option read the last layer
        made, identity = {"layers": "last", **made}, {"layers": "last", **identity}
        diffs = [
            f"{k}: {made.get(k)!r} vs {identity.get(k)!r}"
            for k in ("name", "dim", "weights_hash", "layers")
            if made.get(k) != identity.get(k)
        ]
        if diffs:
            raise ArtifactMismatchError(
                "value_head was trained on another encoder: " + "; ".join(diffs)
            )
