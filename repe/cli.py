"""The ``repe`` command line (also ``python -m repe``). It parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``repe steer: error: argument --coeff: ...``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers; got {text!r}"
        ) from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers; got {text!r}"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def _existing_file(text: str) -> str:
    """A file that exists (an artifact may be named without its .json / .safetensors extension)."""
    from pathlib import Path

    p = Path(text)
    if p.is_file() or any(Path(text + ext).is_file() for ext in (".json", ".safetensors")):
        return text
    raise argparse.ArgumentTypeError(f"no such file: {text}")


class _FlagError(Exception):
    """A failure attributed to one command-line flag or file."""


def _flag(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn``; a failure becomes one line that names ``name`` (the flag or file it came from)."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, KeyError, OSError, LookupError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise _FlagError(f"{name}: {msg}") from exc
    except Exception as exc:  # the library's own errors (RepeError and subclasses)
        from repe.errors import RepeError

        if isinstance(exc, RepeError):
            raise _FlagError(f"{name}: {exc}") from exc
        raise


def _operator_names() -> list[str]:
    """The steering operators' registry (``steering.operators``: no torch import at start-up)."""
    import ast
    from pathlib import Path

    src = (Path(__file__).resolve().parents[1] / "steering" / "operators.py").read_text()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "OPERATORS":
            assert isinstance(node.value, ast.Dict)
            return [str(k.value) for k in node.value.keys if isinstance(k, ast.Constant)]
    raise RuntimeError("steering/operators.py has no OPERATORS registry")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF folder or hub id (default: embedded)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, mps")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument(
        "--device-map",
        default=None,
        help="spread a big model over devices with accelerate: auto, balanced, sequential, a device, "
        'or a JSON object of module -> device (e.g. \'{"model.layers.20": "disk", "": 0}\')',
    )
    p.add_argument(
        "--max-memory",
        default=None,
        help="memory per device for an automatic --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB",
    )
    p.add_argument("--offload-folder", default=None, help="where weights mapped to 'disk' go")
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="let a hub id in --model download (default: only what is already on this machine)",
    )


def parse_device_map(text: str | None) -> Any:
    """``--device-map``: a name or device as given, or a JSON object (module -> device)."""
    if text is None or not text.strip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON object ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object of module name -> device")
    return value


def parse_max_memory(text: str | None) -> dict[Any, str] | None:
    """``--max-memory 0=20GiB,cpu=60GiB`` -> ``{0: "20GiB", "cpu": "60GiB"}`` (GPU indices as ints)."""
    if text is None:
        return None
    out: dict[Any, str] = {}
    for part in text.split(","):
        dev, sep, size = part.partition("=")
        dev, size = dev.strip(), size.strip()
        if not sep or not dev or not size:
            raise ValueError(
                f"expected DEVICE=SIZE[,DEVICE=SIZE...] such as 0=20GiB,cpu=60GiB; got {text!r}"
            )
        out[int(dev) if dev.isdigit() else dev] = size
    return out


def _load(args: argparse.Namespace):  # noqa: ANN202
    from repe.models import load_model

    device_map = _flag("--device-map", parse_device_map, getattr(args, "device_map", None))
    max_memory = _flag("--max-memory", parse_max_memory, getattr(args, "max_memory", None))
    return _flag(
        f"--model {args.model}" if args.model else "the embedded model",
        load_model,
        args.model,
        device=args.device,
        dtype=args.dtype,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=getattr(args, "offload_folder", None),
        allow_download=args.allow_download,
    )


def cmd_quickstart(args: argparse.Namespace) -> int:
    from probes.separation import format_table, separation
    from repe.capture import capture
    from repe.datasets import load_concept

    t0 = time.perf_counter()
    lm = _load(args)
    print(
        f"model: {lm.identity.name} ({lm.n_layers} blocks, d_model {lm.d_model}) "
        f"loaded in {time.perf_counter() - t0:.1f}s"
    )
    ds = load_concept("facts/honesty", tokenizer=lm.tokenizer).sample(args.pairs, seed=0)
    train, test = ds.split(0.7, seed=0)
    index = {id(p): i for i, p in enumerate(ds.pairs)}
    train_idx = [index[id(p)] for p in train.pairs]
    test_idx = [index[id(p)] for p in test.pairs]
    print(
        f"data: {ds.name}, {len(ds)} honest/untruthful pairs ({len(train)} train, "
        f"{len(test)} held out), fingerprint {ds.fingerprint()}"
    )
    sites = "blocks.*.hook_resid_post"
    pos = capture(lm, ds.positives(), sites, batch_size=args.batch_size)
    neg = capture(lm, ds.negatives(), sites, batch_size=args.batch_size)
    rows = separation(pos, neg, train_idx, test_idx)
    print(
        "per-layer separation of honest vs untruthful (mean-difference direction, held-out pairs):"
    )
    print(format_table(rows))
    best = max(rows, key=lambda r: (r.pair_accuracy, r.cohens_d))
    print(
        f"best site: {best.site} (held-out pair accuracy {best.pair_accuracy:.3f}); "
        f"total {time.perf_counter() - t0:.1f}s"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from repe.sites import all_sites

    lm = _load(args)
    info = {
        "identity": lm.identity.to_dict(),
        "source": lm.source,
        "device": str(lm.device),
        "dtype": str(lm.dtype),
        "device_map": getattr(lm.model, "hf_device_map", None),
        "site_kinds": sorted({s.name.split(".", 2)[2] for s in all_sites(1)}),
        "example_sites": [s.name for s in all_sites(lm.n_layers, ["resid_post"])][:3],
    }
    print(json.dumps(info, indent=1))
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from repe.capture import capture
    from repe.positions import as_policy

    def read() -> list[str]:
        with open(args.texts, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]

    texts = _flag(args.texts, read)
    if not texts:
        raise _FlagError(f"{args.texts}: no text in the file (one text per line)")
    _flag("--positions", as_policy, args.positions)
    lm = _load(args)
    from repe.sites import resolve_sites

    _flag("--sites", resolve_sites, args.sites.split(","), lm.n_layers)
    acts = _flag(
        "--out",
        capture,
        lm,
        texts,
        args.sites.split(","),
        positions=args.positions,
        batch_size=args.batch_size,
        backend=args.backend,
        out_dir=args.out,
        overwrite=args.overwrite,
    )
    print(f"captured {len(acts)} examples at {len(acts.sites)} sites into {args.out}")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from repe.directions import Direction
    from steering.defaults import calibrated, default_coeff, default_sites
    from steering.generate import GenerationConfig, compare
    from steering.spec import SteeringSpec

    lm = _load(args)
    direction = _flag(f"--vector {args.vector}", Direction.load, args.vector, model=lm)
    sites = args.sites.split(",") if args.sites else None
    direction, where = _flag("--sites", default_sites, direction, sites, not args.best_site_only)
    coeff, how = default_coeff(direction, args.coeff)
    direction = calibrated(lm, direction, args.scale)
    spec = SteeringSpec(
        direction, coeff=coeff, operator=args.operator, scale=args.scale, positions=args.positions
    )
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        seed=args.seed,
    )
    print(
        f"steering {direction.name} at {where}; {how} ({args.scale} scale); operator "
        f"{args.operator}, positions {args.positions}"
    )
    for row in compare(lm, args.prompts, spec, cfg):
        print(
            f"\n=== prompt: {row.prompt}\n--- baseline:\n{row.baseline}\n--- steered:\n{row.steered}"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from repe.directions import Direction
    from repe.models import embedded_gguf_path
    from repe.sites import parse_site
    from steering.defaults import calibrated, default_coeff, default_sites
    from steering.export import export, llama_cpp_command
    from steering.spec import SteeringSpec

    direction = _flag(args.vector, Direction.load, args.vector)
    sites = args.sites.split(",") if args.sites else None
    direction, where = _flag("--sites", default_sites, direction, sites, args.all_sites)
    coeff, how = default_coeff(direction, args.coeff)
    if args.scale == "relative":
        direction = calibrated(_load(args), direction, args.scale)
    if args.format == "gguf" and args.skip_block0:
        keep = [s for s in direction.sites if parse_site(s).layer >= 1]
        if len(keep) != len(direction.sites):
            print("note: block 0 cannot be carried by llama.cpp; dropped it")
            direction = direction.select(keep)
    spec = SteeringSpec(direction, coeff=coeff, scale=args.scale)
    out = _flag(
        f"--output {args.output}", export, spec, args.output, args.format, fold_coeff=args.fold
    )
    print(f"wrote {out} ({args.format}): {where}; {how} ({args.scale} scale)")
    if args.format == "gguf":
        layers = [parse_site(s).layer for s in direction.sites]
        model = args.gguf_model or (
            str(embedded_gguf_path()) if args.model is None else "MODEL.gguf"
        )
        print("use it with llama.cpp:")
        print("  " + llama_cpp_command(Path(out), model, None if args.fold else coeff, layers))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from probes.run import run_probe
    from repe.positions import as_policy

    _flag("--positions", as_policy, args.positions)
    if args.concept:
        from probes.run import resolve_concept

        _flag("--concept", resolve_concept, args.concept)
    lm = _load(args)
    report = run_probe(
        lm,
        concept=args.concept,
        data_file=args.data,
        out_dir=args.out,
        readers=args.readers.split(","),
        sites=args.sites,
        positions=args.positions,
        max_pairs=args.max_pairs,
        seed=args.seed,
        n_boot=args.n_boot,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    print(report.text())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from repe.datasets import load_caa_items
    from repe.directions import Direction
    from steering.evaluation.sweep import coeff_layer_sweep

    _flag("--behaviour", load_caa_items, args.behaviour)
    lm = _load(args)
    bad = [x for x in args.layers if not 0 <= x < lm.n_layers]
    if bad:
        raise _FlagError(f"--layers: {bad} out of range for a model of {lm.n_layers} blocks")
    direction = (
        _flag(f"--vector {args.vector}", Direction.load, args.vector, model=lm)
        if args.vector
        else None
    )
    report = coeff_layer_sweep(
        lm,
        args.behaviour,
        args.layers,
        args.coeffs,
        kl_budget=args.kl_budget,
        n_items=args.items,
        n_pairs=args.pairs,
        direction=direction,
        scale=args.scale,
        batch_size=args.batch_size,
        form=args.form,
    )
    print(report.table())
    if args.out:
        saved = report.apply_to(direction).save(Path(args.out))
        print(f"saved the vector with its recommended coefficient to {saved}")
    return 0


def cmd_valuemap(args: argparse.Namespace) -> int:
    from pathlib import Path

    from repe.datasets import load_questions, question_set
    from repe.directions import Direction
    from steering.evaluation.answers import AnswerCache
    from steering.evaluation.valuemap import (
        ValueMapConfig,
        persona_sources,
        run_valuemap,
        save_valuemap,
        sweep_sources,
    )
    from steering.generate import GenerationConfig
    from steering.spec import SteeringSpec

    sampling = GenerationConfig(
        max_new_tokens=args.tokens,
        do_sample=True,
        temperature=args.temperature,
        top_p=0.9,
        seed=args.seed,
    )
    sources = _flag("--personas", persona_sources, args.personas, sampling)
    if Path(args.questions).suffix in (".jsonl", ".csv"):
        questions = _flag(f"--questions {args.questions}", load_questions, args.questions)
        if args.n_questions:
            questions = questions.sample(args.n_questions, args.seed)
    else:
        questions = _flag("--questions", question_set, args.questions, args.n_questions, args.seed)
    control = question_set("control", args.control, args.seed) if args.control else None
    lm = _load(args)
    trajectories = []
    if args.direction:
        if not args.coeffs:
            raise _FlagError(
                "--coeffs: give the steering sweep's coefficients, e.g. --coeffs=0.1,0.2"
            )
        direction = _flag(f"--direction {args.direction}", Direction.load, args.direction, model=lm)
        base = "assistant" if "assistant" in args.personas else None
        swept, traj = _flag(
            "--coeffs",
            sweep_sources,
            SteeringSpec(direction, 0.0, scale=args.scale),
            args.coeffs,
            label=args.sweep_label or direction.name or "steer",
            base=base,
            sampling=sampling,
        )
        sources += swept
        trajectories.append(traj)
    config = ValueMapConfig(
        k=args.k,
        seed=args.seed,
        map_method=args.map,
        batch_size=args.batch_size,
        head_layers=args.head_layers,
    )
    result = run_valuemap(
        lm,
        sources,
        questions,
        control,
        trajectories=trajectories,
        config=config,
        cache=AnswerCache(args.cache) if args.cache else None,
        progress=True,
    )
    paths = save_valuemap(result, Path(args.out))
    m = result.metrics()
    print(
        f"{len(sources)} sources x {len(questions)} value questions"
        + (f" + {len(control)} control" if control else "")
    )
    print(f"{'method':<20} {'acc@1':>6} {'95% CI':>15} {'acc@3':>6} {'F1':>6} {'records':>8}")
    for name, sc in m["scores"].items():
        lo, hi = sc["acc1_ci95"]
        print(
            f"{name:<20} {sc['acc1']:6.3f} [{lo:5.3f}, {hi:5.3f}] {sc['acc3']:6.3f} "
            f"{sc['f1_weighted']:6.3f} {sc['n_records']:8d}"
        )
    print(f"chance: {1 / len(sources):.3f}")
    for name, d in m["differences_acc1"].items():
        print(f"{name}: {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    for t in m["trajectories"]:
        print(
            f"sweep {t['names']}: spearman(coeff, axis 1) {t['spearman_coeff_vs_axis1']:+.2f}"
            + (
                f", spearman(|coeff|, distance from base) {t['spearman_abs_coeff_vs_distance']:+.2f}"
                if "spearman_abs_coeff_vs_distance" in t
                else ""
            )
        )
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def _name_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give comma-separated names")
    return names


def app_command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line that serves the workbench app (``app/main.py``, shipped in
    the package beside ``repe``)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("app")
    folder = (
        Path(next(iter(spec.submodule_search_locations)))
        if spec is not None and spec.submodule_search_locations
        else Path(__file__).resolve().parents[1] / "app"
    )
    script = folder / "main.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"the app is not installed ({script} is missing): pip install 'repe-workbench[app]'"
        )
    cmd = [sys.executable, "-m", "streamlit", "run", str(script)]
    cmd += [f"--server.port={args.port}", f"--server.address={args.address}"]
    cmd += ["--browser.gatherUsageStats=false", "--server.fileWatcherType=none"]
    if args.headless:
        cmd.append("--server.headless=true")
    return cmd


def cmd_rahf(args: argparse.Namespace) -> int:
    from repe import cli_rahf

    return cli_rahf.run(args, _load, _flag)


def cmd_aligner(args: argparse.Namespace) -> int:
    from repe import cli_aligner

    return cli_aligner.run(args, _load, _flag)


def cmd_study(args: argparse.Namespace) -> int:
    from repe import cli_study

    return cli_study.run(args)


def cmd_app(args: argparse.Namespace) -> int:
    """Replace this process by the Streamlit server (so stopping it stops the server)."""
    import os
    from pathlib import Path

    cmd = app_command(args)
    if getattr(args, "workspace", None):
        os.environ["REPE_WORKSPACE"] = str(Path(args.workspace).expanduser().resolve())
    print(
        f"serving the workbench on http://{args.address}:{args.port} (Ctrl-C stops it)", flush=True
    )
    os.execv(cmd[0], cmd)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="repe", description="representation-engineering workbench")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("quickstart", help="honesty separation per layer on the embedded model")
    _add_model_args(p)
    p.add_argument("--pairs", type=_positive_int, default=256, help="number of contrast pairs")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.set_defaults(func=cmd_quickstart)
    p = sub.add_parser("app", help="serve the Streamlit workbench on the embedded model")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="localhost", help="interface to listen on")
    p.add_argument("--headless", action="store_true", help="do not open a browser")
    p.add_argument(
        "--workspace",
        default=None,
        help="folder for the sessions' saved work (default: $REPE_WORKSPACE or ~/repe-workspace)",
    )
    p.set_defaults(func=cmd_app)
    p = sub.add_parser("info", help="print the model identity and its site names")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("capture", help="capture activations of a text file (one text per line)")
    _add_model_args(p)
    p.add_argument("texts", type=_existing_file)
    p.add_argument("--sites", default="blocks.*.hook_resid_post")
    p.add_argument("--positions", default="last")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--backend", default="hf", choices=["hf", "transformer_lens", "nnsight"])
    p.add_argument("--out", required=True, help="output folder (safetensors shards + meta.json)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an activation set already in --out"
    )
    p.set_defaults(func=cmd_capture)
    p = sub.add_parser(
        "probe", help="layer sweep of value-direction readers; saves the best direction"
    )
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--concept", help="a shipped concept (e.g. honesty, caa/sycophancy, emotions/happiness)"
    )
    src.add_argument(
        "--data",
        type=_existing_file,
        help="a contrast-pairs file (CSV/JSONL with positive,negative)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--readers", default="mean_diff,pca_diff,lat,logistic,random")
    p.add_argument("--sites", default="blocks.*.hook_resid_post")
    p.add_argument("--positions", default="last")
    p.add_argument("--max-pairs", type=_positive_int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--threads", type=_positive_int, default=None)
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("steer", help="baseline and steered completions of prompts")
    _add_model_args(p)
    p.add_argument("prompts", nargs="+", help="user prompts (each answered as a chat)")
    p.add_argument(
        "--vector",
        required=True,
        type=_existing_file,
        help="direction artifact (.safetensors or .json)",
    )
    p.add_argument(
        "--coeff",
        type=float,
        default=None,
        help="strength (default: the vector's recommended coefficient)",
    )
    p.add_argument(
        "--scale",
        default="relative",
        choices=["relative", "unit", "mean_diff", "raw"],
        help="relative: fraction of the typical residual norm at the site (default)",
    )
    p.add_argument(
        "--operator",
        default="add",
        choices=_operator_names(),
    )
    p.add_argument(
        "--positions", default="all", choices=["all", "prompt", "generated", "assistant"]
    )
    p.add_argument("--sites", default=None, help="comma-separated subset of the vector's sites")
    p.add_argument(
        "--all-sites",
        dest="best_site_only",
        action="store_false",
        help="steer every site of the vector (default: its best site when recorded)",
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=48)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_steer)
    p = sub.add_parser(
        "sweep", help="coefficient x layer sweep: CAA A/B shift vs KL cost, recommends"
    )
    _add_model_args(p)
    p.add_argument("--behaviour", required=True, help="a CAA behaviour, e.g. sycophancy")
    p.add_argument(
        "--vector",
        default=None,
        type=_existing_file,
        help="direction to sweep (default: build a CAA vector)",
    )
    p.add_argument("--layers", type=_int_list, default=[8, 11, 14], help="e.g. 8,11,14")
    p.add_argument(
        "--coeffs",
        type=_float_list,
        default=[-0.2, -0.1, 0.0, 0.1, 0.2],
        help="write --coeffs=-0.2,0,0.2",
    )
    p.add_argument("--scale", default="relative", choices=["relative", "unit", "mean_diff", "raw"])
    p.add_argument("--kl-budget", type=float, default=0.1)
    p.add_argument("--items", type=_positive_int, default=40, help="held-out A/B items")
    p.add_argument(
        "--pairs", type=_positive_int, default=64, help="training pairs for the CAA vector"
    )
    p.add_argument(
        "--form",
        default="ab",
        choices=["ab", "cloze"],
        help="score answer letters (CAA's A/B, default) or answer texts (cloze: for models that do "
        "not read A/B options; the default vector is then built from answer texts)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--out", default=None, help="save the vector with its recommended coefficient")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser(
        "export", help="export a direction for serving (gguf, pt, spec, safetensors)"
    )
    _add_model_args(p)
    p.add_argument("vector", type=_existing_file, help="direction artifact (.safetensors or .json)")
    p.add_argument("--format", required=True, choices=["gguf", "pt", "spec", "safetensors"])
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--coeff",
        type=float,
        default=None,
        help="strength (default: the vector's recommended coefficient; required without one)",
    )
    p.add_argument("--scale", default="relative", choices=["relative", "unit", "mean_diff", "raw"])
    p.add_argument(
        "--fold",
        action="store_true",
        help="gguf: fold the coefficient into the vectors (else use --control-vector-scaled)",
    )
    p.add_argument(
        "--sites",
        default=None,
        help="comma-separated sites (default: the best site, see --all-sites)",
    )
    p.add_argument(
        "--all-sites",
        action="store_true",
        help="export every site of the vector (default: its best site when recorded)",
    )
    p.add_argument(
        "--keep-block0",
        dest="skip_block0",
        action="store_false",
        help="gguf: fail instead of dropping block 0",
    )
    p.add_argument("--gguf-model", default=None, help="model path to show in the llama.cpp command")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "valuemap",
        help="UniVaR-style value map: personas and a steering sweep answer value questions; "
        "a head learns whose answer is whose",
    )
    _add_model_args(p)
    p.add_argument(
        "--personas",
        type=_name_list,
        default=["assistant", "traditionalist", "free_spirit", "altruist", "achiever", "cautious"],
        help="comma-separated built-in personas (system prompts; see steering.evaluation.valuemap)",
    )
    p.add_argument(
        "--direction", default=None, type=_existing_file, help="direction for a steering sweep"
    )
    p.add_argument(
        "--coeffs", type=_float_list, default=[], help="sweep coefficients, e.g. --coeffs=0.15,0.3"
    )
    p.add_argument("--scale", default="relative", choices=["relative", "unit", "mean_diff", "raw"])
    p.add_argument("--sweep-label", default=None, help="name prefix of the sweep's sources")
    p.add_argument(
        "--questions",
        default="values",
        help="a question set (values, valuebench, moralchoice, persona) or a .jsonl/.csv file",
    )
    p.add_argument("--n-questions", type=_positive_int, default=200)
    p.add_argument("--control", type=int, default=100, help="non-value control questions (0: none)")
    p.add_argument("--tokens", type=_positive_int, default=32, help="new tokens per answer")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=_positive_int, default=50, help="neighbours for kNN identification")
    p.add_argument("--map", default="pca", choices=["pca", "tsne"])
    p.add_argument(
        "--head-layers",
        default="all",
        choices=["last", "all"],
        help="encoder layers the value head reads: the sentence embedding, or every layer joined",
    )
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--cache", default=None, help="answer cache folder (default: the repe cache)")
    p.add_argument("--out", default="valuemap_out", help="folder for the map, metrics and head")
    p.set_defaults(func=cmd_valuemap)

    from repe import cli_rahf

    cli_rahf.add_parser(sub, _add_model_args, _positive_int, cmd_rahf)
    from repe import cli_aligner

    cli_aligner.add_parser(sub, _add_model_args, _positive_int, cmd_aligner)
    from repe import cli_study

    cli_study.add_parser(sub, _add_model_args, _positive_int, cmd_study)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; any failure is one line on stderr (``repe <command>: error: ...``), exit 2."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a one-line argument error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args))
    except Exception as exc:  # noqa: BLE001 - every failure is reported as one line
        from repe.errors import RepeError

        known = (_FlagError, RepeError, ValueError, OSError, KeyError, LookupError)
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        if not isinstance(exc, known):
            msg = f"{type(exc).__name__}: {msg}"
        msg = " ".join(msg.split())  # one line
        print(f"repe {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
