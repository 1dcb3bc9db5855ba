"""Activation capture: one call, any back-end, any position policy, in memory or streamed to disk."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from repe.activations import ActivationMeta, ActivationSet, Shard, ShardWriter
from repe.backends import get_backend
from repe.backends.hf import first_tensor
from repe.batching import Encoded, Inputs, TokenBatch, batches, encode, fingerprint
from repe.models import LoadedModel
from repe.positions import PositionPolicy, PositionSpec, as_policy
from repe.remote import RemoteError, RemoteJob, RemoteRequest, check_remote, refuse_weightless
from repe.sites import Site, SiteSpec, resolve_sites

DEFAULT_SITES = "blocks.*.hook_resid_post"


def _gather_plan(
    batch: TokenBatch, policy: PositionPolicy
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Index tensors that pick the selected rows out of ``[B, T, ...]`` and reduce them.

    Returns (batch_idx, pos_idx, out_row_of_each_selected, counts or None, per-example offsets)."""
    b_idx: list[int] = []
    p_idx: list[int] = []
    seg: list[int] = []
    counts: list[int] = []
    offsets: list[int] = [0]
    needs_mean = False
    out_row = 0
    for b, (off, length, a_start) in enumerate(
        zip(batch.offsets, batch.lengths, batch.assistant_starts, strict=True)
    ):
        sel = policy.select(length, a_start)
        b_idx.extend([b] * len(sel.positions))
        p_idx.extend(off + p for p in sel.positions)
        if sel.reduce == "mean":
            needs_mean = True
            seg.extend([out_row] * len(sel.positions))
            counts.append(len(sel.positions))
            out_row += 1
        else:
            seg.extend(range(out_row, out_row + len(sel.positions)))
            counts.extend([1] * len(sel.positions))
            out_row += len(sel.positions)
        offsets.append(out_row)
    to = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return (
        to(b_idx),
        to(p_idx),
        to(seg),
        torch.tensor(counts, dtype=torch.float32) if needs_mean else None,
        to(offsets),
    )


_Plan = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]


class _Collector:
    def __init__(self, store_dtype: torch.dtype) -> None:
        self.store_dtype = store_dtype
        self.buffers: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.offsets: list[torch.Tensor] = []
        self.n_buffered = 0
        self.plan: _Plan | None = None

    def set_batch(self, batch: TokenBatch, policy: PositionPolicy) -> None:
        self.plan = _gather_plan(batch, policy)
        self.offsets.append(self.plan[4])
        self.n_buffered += len(batch.lengths)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch index, position index) of the selected tokens of the current batch."""
        assert self.plan is not None
        return self.plan[0], self.plan[1]

    def sink(self, site: Site, acts: torch.Tensor) -> None:
        assert self.plan is not None
        b_idx, p_idx = self.rows()
        dev = acts.device
        self.sink_rows(site, acts[b_idx.to(dev), p_idx.to(dev)])

    def sink_rows(self, site: Site, rows: torch.Tensor) -> None:
        """Like :meth:`sink`, for a back-end that gathered the selected tokens itself (``[N, ...]``,
        in the order of :meth:`rows`): a remote run sends back only those."""
        assert self.plan is not None
        _, _, seg, counts, offsets = self.plan
        dev = rows.device
        n_out = int(offsets[-1])
        if counts is not None:
            rows = rows.float()
            out = torch.zeros((n_out, *rows.shape[1:]), dtype=rows.dtype, device=dev)
            out.index_add_(0, seg.to(dev), rows)
            out /= counts.to(dev).view(-1, *([1] * (rows.dim() - 1)))
            rows = out
        self.buffers[site.name].append(rows.detach().to("cpu", self.store_dtype))

    def flush(self) -> Shard:
        data = {k: torch.cat(v) for k, v in self.buffers.items()}
        offs, base = [torch.zeros(1, dtype=torch.long)], 0
        for o in self.offsets:
            offs.append(o[1:] + base)
            base += int(o[-1])
        shard = Shard(data, torch.cat(offs))
        self.buffers.clear()
        self.offsets.clear()
        self.n_buffered = 0
        return shard


def capture(
    lm: LoadedModel,
    inputs: Inputs,
    sites: SiteSpec = DEFAULT_SITES,
    *,
    positions: PositionSpec = "last",
    batch_size: int = 16,
    backend: str = "hf",
    remote: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    shard_size: int = 1024,
    padding_side: str = "right",
    progress: bool | None = None,
    store_dtype: torch.dtype = torch.float32,
    max_length: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> ActivationSet:
    """Capture activations of ``sites`` for texts or chat conversations.

    Args:
        lm: a model from :func:`repe.load_model` (or, for ``remote=True``,
            :func:`repe.remote.load_remote_model`).
        inputs: a list of texts, or a list of conversations (lists of role/content messages).
        sites: canonical name(s), glob(s) or a predicate (default: every block's residual output).
        positions: ``"last"``, ``"mean"``, ``"all"``, ``"assistant"`` (from the assistant turn on),
            ``"assistant_mean"``, a token index or list of indices, or a PositionPolicy.
        batch_size: examples per forward pass.
        backend: ``"hf"`` (default, fastest), ``"transformer_lens"`` or ``"nnsight"``.
        remote: run each batch on NDIF through nnsight's remote execution (``backend="nnsight"``
            only; the model must be named by a hub id NDIF serves, the API key is read from
            ``NDIF_API_KEY``; see :mod:`repe.remote`). Only the selected tokens' activations come
            back. :func:`submit_capture` is the same without waiting.
        out_dir: when given, activations stream to safetensors shards there (memory does not grow with
            the dataset) and a disk-backed set is returned. The set is built in a temporary folder
            beside ``out_dir`` and renamed into place when complete; an interrupted capture leaves
            nothing there.
        overwrite: replace an activation set already in ``out_dir`` (never anything else).
        shard_size: examples per shard when streaming.
        padding_side: results do not depend on it; it is exposed so tests can prove that.
        progress: show a progress bar (default: when there is more than one batch).
        on_batch: called as ``on_batch(examples_done, total)`` after each batch (a UI's progress
            bar; raising from it stops the capture, and nothing is returned).
    """
    _check_args(batch_size, shard_size, padding_side)
    be = get_backend(backend, remote=remote)
    if remote:
        check_remote(lm)  # the API key first: nothing is built without one
    else:
        refuse_weightless(lm)
    site_list, policy, encoded = _prepare(lm, inputs, sites, positions, max_length)
    return _capture(
        lm,
        inputs,
        site_list,
        policy,
        encoded,
        be,
        backend,
        out_dir,
        overwrite,
        batch_size,
        shard_size,
        padding_side,
        progress,
        store_dtype,
        on_batch,
    )


def submit_capture(
    lm: LoadedModel,
    inputs: Inputs,
    sites: SiteSpec = DEFAULT_SITES,
    *,
    positions: PositionSpec = "last",
    batch_size: int = 16,
    shard_size: int = 1024,
    padding_side: str = "right",
    store_dtype: torch.dtype = torch.float32,
    max_length: int | None = None,
) -> RemoteJob[ActivationSet]:
    """``capture(..., backend="nnsight", remote=True)`` without waiting.

    One non-blocking NDIF job per batch is posted now; the returned :class:`repe.remote.RemoteJob`
    polls them (``status()``) and, once all are complete, ``result()`` assembles the in-memory
    :class:`ActivationSet` that ``capture`` would have returned.
    """
    from repe.backends.nnsight import NNsightBackend

    _check_args(batch_size, shard_size, padding_side)
    check_remote(lm)
    site_list, policy, encoded = _prepare(lm, inputs, sites, positions, max_length)
    be = NNsightBackend(remote=True)
    collector = _Collector(store_dtype)
    jobs = []
    for batch in _batches(lm, encoded, batch_size, padding_side):
        collector.set_batch(batch, policy)
        jobs.append(be.submit(lm, batch, site_list, rows=collector.rows()))

    def finish(results: list[dict[str, Any]]) -> ActivationSet:
        replay = _Replay([r.get("saved") for r in results])
        return _capture(
            lm,
            inputs,
            site_list,
            policy,
            encoded,
            replay,
            "nnsight",
            None,
            False,
            batch_size,
            shard_size,
            padding_side,
            False,
            store_dtype,
            None,
        )

    return RemoteJob(jobs, finish)


def capture_request(
    lm: LoadedModel,
    inputs: Inputs,
    sites: SiteSpec = DEFAULT_SITES,
    *,
    positions: PositionSpec = "last",
    batch_size: int = 16,
    padding_side: str = "right",
    max_length: int | None = None,
) -> list[RemoteRequest]:
    """The requests ``capture(..., backend="nnsight", remote=True)`` would send to NDIF, one per
    batch, built and not sent (:class:`repe.remote.RemoteRequest`: nnsight's serialised trace)."""
    from repe.backends.nnsight import NNsightBackend

    _check_args(batch_size, 1, padding_side)
    check_remote(lm)
    site_list, policy, encoded = _prepare(lm, inputs, sites, positions, max_length)
    be = NNsightBackend(remote=True)
    collector = _Collector(torch.float32)
    out = []
    for batch in _batches(lm, encoded, batch_size, padding_side):
        collector.set_batch(batch, policy)
        out.append(be.request(lm, batch, site_list, rows=collector.rows()))
    return out


class _Replay:
    """A back-end that hands out what finished remote jobs saved, batch by batch, in order."""

    name = "nnsight"
    gathers_rows = True

    def __init__(self, saved: list[Any]) -> None:
        self._saved = iter(saved)

    def run(
        self,
        lm: LoadedModel,
        batch: TokenBatch,
        sites: list[Site],
        sink: Callable[[Site, torch.Tensor], None],
        rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        from repe.backends.nnsight import NNsightBackend

        values = next(self._saved, None)
        if not isinstance(values, list):
            raise RemoteError(f"NDIF sent back no activations (got {type(values).__name__})")
        n = None if rows is None else int(rows[0].numel())
        for value in values:
            got = first_tensor(value).shape[0]
            if n is not None and got != n:
                raise RemoteError(f"NDIF sent back {got} tokens where this batch keeps {n}")
        NNsightBackend.deliver(lm, sites, values, sink)


def _check_args(batch_size: int, shard_size: int, padding_side: str) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1; got {shard_size}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")


def _prepare(
    lm: LoadedModel,
    inputs: Inputs,
    sites: SiteSpec,
    positions: PositionSpec,
    max_length: int | None,
) -> tuple[list[Site], PositionPolicy, list[Encoded]]:
    site_list = resolve_sites(sites, lm.n_layers)
    policy = as_policy(positions)
    return site_list, policy, encode(lm.tokenizer, inputs, max_length=max_length)


def _batches(
    lm: LoadedModel, encoded: list[Encoded], batch_size: int, padding_side: str
) -> list[TokenBatch]:
    side: Literal["left", "right"] = "left" if padding_side == "left" else "right"
    return [b for _, b in batches(encoded, batch_size, lm.tokenizer.pad_token_id, side)]


def _capture(
    lm: LoadedModel,
    inputs: Inputs,
    site_list: list[Site],
    policy: PositionPolicy,
    encoded: list[Encoded],
    be: Any,
    backend: str,
    out_dir: str | os.PathLike[str] | None,
    overwrite: bool,
    batch_size: int,
    shard_size: int,
    padding_side: str,
    progress: bool | None,
    store_dtype: torch.dtype,
    on_batch: Callable[[int, int], None] | None,
) -> ActivationSet:
    meta = ActivationMeta(
        identity=lm.identity,
        sites=[s.name for s in site_list],
        positions=policy.describe(),
        one_row=policy.one_row,
        fingerprint=fingerprint(inputs),
        n=len(encoded),
        backend=backend,
        padding_side=padding_side,
    )
    writer = ShardWriter(Path(out_dir), meta, overwrite=overwrite) if out_dir is not None else None
    try:
        return _run_capture(
            lm,
            encoded,
            site_list,
            policy,
            be,
            meta,
            writer,
            batch_size,
            shard_size,
            padding_side,
            progress,
            store_dtype,
            on_batch,
        )
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def _run_capture(
    lm: LoadedModel,
    encoded: list[Encoded],
    site_list: list[Site],
    policy: PositionPolicy,
    be: Any,
    meta: ActivationMeta,
    writer: ShardWriter | None,
    batch_size: int,
    shard_size: int,
    padding_side: str,
    progress: bool | None,
    store_dtype: torch.dtype,
    on_batch: Callable[[int, int], None] | None,
) -> ActivationSet:
    collector = _Collector(store_dtype)
    shards: list[Shard] = []
    n_batches = (len(encoded) + batch_size - 1) // batch_size
    show = progress if progress is not None else n_batches > 1
    pad_id = lm.tokenizer.pad_token_id
    side: Literal["left", "right"] = "left" if padding_side == "left" else "right"
    # a back-end that gathers the selected tokens itself (a remote one: only those come back)
    gathers = bool(getattr(be, "gathers_rows", False))
    done = 0
    with tqdm(total=len(encoded), disable=not show, desc="capture", unit="ex") as bar:
        for _start, batch in batches(encoded, batch_size, pad_id, side):
            collector.set_batch(batch, policy)
            if gathers:
                be.run(lm, batch, site_list, collector.sink_rows, rows=collector.rows())
            else:
                be.run(lm, batch, site_list, collector.sink)
            bar.update(len(batch.lengths))
            done += len(batch.lengths)
            if on_batch is not None:
                on_batch(done, len(encoded))
            if collector.n_buffered >= shard_size:
                shard = collector.flush()
                if writer is not None:
                    writer.write(shard)
                else:
                    shards.append(shard)
    if collector.n_buffered:
        shard = collector.flush()
        if writer is not None:
            writer.write(shard)
        else:
            shards.append(shard)
    if writer is not None:
        return writer.close()
    return ActivationSet(meta, shards)
