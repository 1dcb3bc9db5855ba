"""Where a study's independent steps run: in this process, in local processes, or on a Dask cluster.

The study file never names an engine: the same file runs on a laptop (``repe study run S``), in local
processes (``--jobs 2``) and on a cluster (``--engine dask --scheduler tcp://host:8786``). Every engine
computes a step with the same function (:func:`studies.runner.compute_step`) into the same cache, so a
step computed anywhere is found by every later run.

Dask (``pip install 'repe-workbench[cluster]'``) was chosen over Ray because a step is one coarse Python
call (seconds to hours) that writes its result to a shared folder: what is needed is a scheduler that
places such calls on workers and re-runs the ones whose worker died, and Dask's ``distributed`` does
exactly that as a small pure-Python install, with one-line local clusters and launchers for SLURM/PBS
(``dask-jobqueue``), Kubernetes (``dask-kubernetes``) and clouds. Ray brings a C++ runtime (object store,
raylet, GCS) of several hundred MB whose strengths (actors, shared-memory objects) a step does not use.

On a cluster every worker must see the study's output folder at the same path (a shared filesystem):
the runner checks this before the first step is sent and says which worker cannot see it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studies.spec import StudyError

ENGINES = ("local", "dask")


@dataclass
class Engine:
    """How a run computes its steps. ``slots``: steps in flight at once (None: the cluster's size)."""

    name: str = "local"
    slots: int | None = 1
    scheduler: str | None = None
    threads_per_worker: int = 1
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def in_process(self) -> bool:
        return self.name == "local" and (self.slots or 1) <= 1

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "slots": self.slots, "scheduler": self.scheduler, **self.info}


def make_engine(
    name: str = "local",
    *,
    jobs: int | None = None,
    scheduler: str | None = None,
    threads_per_worker: int = 1,
) -> Engine:
    """``local`` (``jobs`` processes; 1: in this process) or ``dask`` (``scheduler``: a running
    cluster's address, else ``$DASK_SCHEDULER_ADDRESS``, else a local cluster of ``jobs`` workers)."""
    if name not in ENGINES:
        raise StudyError(f"engine must be one of {', '.join(ENGINES)}; got {name!r}")
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be >= 1; got {jobs!r}")
    if threads_per_worker < 1:
        raise ValueError(f"threads_per_worker must be >= 1; got {threads_per_worker!r}")
    if name == "local":
        if scheduler is not None:
            raise StudyError("a scheduler address needs engine 'dask'")
        return Engine("local", jobs or 1)
    scheduler = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    return Engine("dask", jobs, scheduler, threads_per_worker)


@contextlib.contextmanager
def executor(engine: Engine, cache: Path) -> Iterator[tuple[cf.Executor, int]]:
    """A ``concurrent.futures`` executor for ``engine`` and the number of steps to keep in flight."""
    if engine.name == "local":
        ctx = multiprocessing.get_context("spawn")
        slots = engine.slots or 1
        with cf.ProcessPoolExecutor(max_workers=slots, mp_context=ctx) as pool:
            yield pool, slots
        return
    with _dask_client(engine) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        _check_shared_cache(client, cache)
        slots = engine.slots or sum(int(w.get("nthreads", 1)) for w in workers.values()) or 1
        import distributed

        engine.info.update(
            {
                "address": client.scheduler.address,
                "workers": len(workers),
                "distributed": distributed.__version__,
            }
        )
        # pure=False: a step is never deduplicated by argument hash (the cache does that); no retries
        # for a step that raises (it would raise again); a step whose worker dies is re-run by the
        # scheduler (distributed.scheduler.allowed-failures, 3 by default)
        ex = client.get_executor(pure=False)
        try:
            yield ex, slots
        finally:
            ex.shutdown(wait=False)


@contextlib.contextmanager
def _dask_client(engine: Engine) -> Iterator[Any]:
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise StudyError(
            "engine 'dask' needs Dask's distributed scheduler: pip install 'repe-workbench[cluster]'"
        ) from exc
    if engine.scheduler:
        try:
            client = Client(engine.scheduler)
        except OSError as exc:
            raise StudyError(
                f"could not reach the Dask scheduler at {engine.scheduler!r}: {exc}"
            ) from exc
        with client:
            yield client
        return
    n = engine.slots or 2
    import dask

    with (
        _without_dasks_malloc_setting(),
        dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ(engine)}),
        LocalCluster(
            n_workers=n,
            threads_per_worker=engine.threads_per_worker,
            processes=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        engine.info["local_cluster"] = True
        yield client


def worker_environ(engine: Engine) -> dict[str, Any]:
    """The environment a local cluster's worker processes start with: as many math-library threads as
    the worker has threads, and, unlike Dask's default, no ``MALLOC_TRIM_THRESHOLD_``. Setting that
    variable switches off glibc's dynamic mmap threshold, so every large tensor PyTorch allocates on the
    CPU is a fresh ``mmap`` with its page faults; a capture ran about 30% slower with it (measured:
    2.97 s vs 2.26 s, the embedded model, one thread). Workers of a cluster you start yourself should
    be started without it too (docs/scale.md)."""
    n = engine.threads_per_worker
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


@contextlib.contextmanager
def _without_dasks_malloc_setting() -> Iterator[None]:
    """A Dask nanny writes its pre-spawn variables into the environment of the process that runs it,
    so after any local cluster with Dask's defaults (a user's own, another library's) this process
    holds ``MALLOC_TRIM_THRESHOLD_=65536`` and every worker started from it would inherit it. While
    our cluster lives, that value (Dask's default, and only that value) is taken out; it is put back
    after."""
    import dask

    default = (dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}).get(
        "MALLOC_TRIM_THRESHOLD_", 65536
    )
    key = "MALLOC_TRIM_THRESHOLD_"
    saved = os.environ.get(key)
    if saved is not None and saved == str(default):
        del os.environ[key]
    try:
        yield
    finally:
        if saved is not None and key not in os.environ:
            os.environ[key] = saved


def _probe_folder(folder: str, token: str) -> str | None:
    """Run on a worker: None when ``folder`` holds the token file the client wrote, else why not."""
    p = Path(folder)
    if not (p / token).exists():
        return f"{folder} is not visible there (or is another folder of the same name)"
    if not os.access(p, os.W_OK):
        return f"{folder} is not writable there"
    return None


def _check_shared_cache(client: Any, cache: Path) -> None:
    """Every worker must see the cache folder the client sees (a shared filesystem), or fail now."""
    token = f".engine-probe-{uuid.uuid4().hex}"
    probe = cache / token
    probe.write_text("")
    try:
        answers = client.run(_probe_folder, str(cache.resolve()), token)
    finally:
        probe.unlink(missing_ok=True)
    bad = {w: why for w, why in answers.items() if why}
    if bad:
        w, why = next(iter(sorted(bad.items())))
        raise StudyError(
            f"the study cache must be on a filesystem every Dask worker shares: on worker {w}, "
            f"{why} ({len(bad)} of {len(answers)} workers); pass --output on a shared folder"
        )
    if not answers:
        raise StudyError("the Dask cluster has no workers")
