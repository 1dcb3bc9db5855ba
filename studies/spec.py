"""Study files: one TOML file per study, validated on load with errors that name the key and the line.

A study file has one ``[study]`` table and one ``[[steps]]`` table per step::

    [study]
    name = "honesty_reading"          # letters, digits, '_' and '-'
    description = "RepE-style honesty curve over layers"
    model = "embedded"                # "embedded", "tiny" (a seeded random model, for tests) or a folder
    seed = 0
    output = "study-runs"             # runs go to OUTPUT/NAME/runs/<id>; relative to the current folder

    [[steps]]
    id = "sweep"                      # unique; other steps name it to use its result
    kind = "probe"                    # one of studies.steps.KINDS
    concept = "facts/honesty"
    readers = ["mean_diff", "pca"]

Every key a kind does not declare, every wrong type and every unknown step reference is an error of the
form ``FILE:LINE: steps[2] (id 'scan') key 'direction': ...``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repe.errors import RepeError

if sys.version_info >= (3, 11):  # pragma: no cover - depends on the interpreter
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class StudyError(RepeError, ValueError):
    """A malformed or inconsistent study file; the message names the file, the line and the key."""


_REQUIRED = object()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Param:
    """One key a step kind accepts.

    ``type``: ``str``, ``int``, ``float``, ``bool``, ``list[str]``, ``list[int]``, ``list[float]`` or
    ``str|list[str]``. ``ref``: the value names other steps (their results are this step's inputs).
    ``check``: returns an error text for a bad value, or None.
    """

    type: str
    default: Any = _REQUIRED
    choices: tuple[Any, ...] | None = None
    ref: bool = False
    check: Callable[[Any], str | None] | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def _type_ok(value: Any, kind: str) -> Any:
    """The value converted to ``kind`` (ints are accepted as floats), or raise TypeError."""

    def scalar(v: Any, t: str) -> Any:
        if t == "str" and isinstance(v, str):
            return v
        if t == "bool" and isinstance(v, bool):
            return v
        if t == "int" and isinstance(v, int) and not isinstance(v, bool):
            return v
        if t == "float" and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise TypeError

    if kind.startswith("list[") and kind.endswith("]"):
        if not isinstance(value, list):
            raise TypeError
        return [scalar(v, kind[5:-1]) for v in value]
    if kind == "str|list[str]":
        if isinstance(value, str):
            return value
        return _type_ok(value, "list[str]")
    return scalar(value, kind)


_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list[str]": "a list of strings",
    "list[int]": "a list of integers",
    "list[float]": "a list of numbers",
    "str|list[str]": "a string or a list of strings",
}

STUDY_KEYS: dict[str, Param] = {
    "name": Param(
        "str", check=lambda v: None if _NAME.match(v) else "use letters, digits, _ and -"
    ),
    "description": Param("str", ""),
    "model": Param("str", "embedded", doc='"embedded", "tiny" or a model folder'),
    "dtype": Param("str", "float32", choices=("float32", "bfloat16", "float16")),
    "seed": Param("int", 0),
    "output": Param("str", "study-runs"),
    "sampling": Param("str", "", doc="what the study samples less than it could, for the report"),
}
STEP_KEYS = ("id", "kind", "after", "model")


@dataclass(frozen=True)
class StepConfig:
    """One resolved step: its kind, its parameters with defaults filled in, and the steps it needs."""

    id: str
    kind: str
    params: dict[str, Any]
    needs: tuple[str, ...]
    line: int | None = None
    model: str | None = None  # this step's own model (else the study's): one study, several models


@dataclass
class Study:
    """A validated study: settings and steps in file order (a step only names steps above it)."""

    name: str
    description: str
    model: str
    dtype: str
    seed: int
    output: str
    sampling: str
    steps: list[StepConfig]
    source: str = ""
    path: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def step(self, step_id: str) -> StepConfig:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(f"study {self.name!r} has no step {step_id!r}")

    def model_of(self, step: StepConfig | str) -> str:
        """The model a step runs on: its own ``model`` key, else the study's."""
        s = self.step(step) if isinstance(step, str) else step
        return s.model if s.model is not None else self.model

    def resolved(self) -> dict[str, Any]:
        """The whole configuration with every default filled in (what the run record stores)."""
        return {
            "study": dict(self.settings),
            "steps": [
                {
                    "id": s.id,
                    "kind": s.kind,
                    **({"model": s.model} if s.model is not None else {}),
                    **s.params,
                    "after": list(s.needs),
                }
                for s in self.steps
            ],
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.resolved(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- locating keys in the text -----------------------------------------------------------------
_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*(\]\]?)\s*(#.*)?$")
_KEY = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*=""")


def _locate(text: str) -> dict[tuple[Any, ...], int]:
    """1-based line of each table header and key: ``("study",)``, ``("study", key)``,
    ``("steps", i)``, ``("steps", i, key)``."""
    where: dict[tuple[Any, ...], int] = {}
    table: tuple[Any, ...] = ()
    n_steps = -1
    for no, line in enumerate(text.splitlines(), start=1):
        h = _HEADER.match(line)
        if h and h.group(1) in ("[", "[[") and not _KEY.match(line):
            name = h.group(2).strip().strip("\"'")
            if h.group(1) == "[[" and name == "steps":
                n_steps += 1
                table = ("steps", n_steps)
            else:
                table = (name,)
            where.setdefault(table, no)
            continue
        k = _KEY.match(line)
        if k and table:
            key = k.group(1) or k.group(2) or k.group(3)
            where.setdefault((*table, key), no)
    return where


def _fmt(path: str, line: int | None, where: str, msg: str) -> str:
    loc = f"{path}:{line}" if line else path
    return f"{loc}: {where}: {msg}"


# ---- loading ------------------------------------------------------------------------------------
def loads(text: str, path: str = "<study>", kinds: Mapping[str, Any] | None = None) -> Study:
    """Parse and validate a study's TOML text (``kinds``: the step registry, default
    :data:`studies.steps.KINDS`)."""
    if kinds is None:
        from studies.steps import KINDS

        kinds = KINDS
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        line = int(m.group(1)) if m else None
        raise StudyError(_fmt(path, line, "TOML syntax", str(exc))) from None
    lines = _locate(text)

    def fail(key_path: tuple[Any, ...], where: str, msg: str) -> StudyError:
        line = lines.get(key_path) or lines.get(key_path[:2]) or lines.get(key_path[:1])
        return StudyError(_fmt(path, line, where, msg))

    extra = sorted(set(data) - {"study", "steps"})
    if extra:
        raise fail(
            (extra[0],), f"top-level key {extra[0]!r}", "unknown; a study has [study] and [[steps]]"
        )
    study = data.get("study")
    if not isinstance(study, dict):
        raise StudyError(_fmt(path, 1, "[study]", "missing; a study file needs a [study] table"))
    settings: dict[str, Any] = {}
    for key in study:
        if key not in STUDY_KEYS:
            raise fail(
                ("study", key),
                f"[study] key {key!r}",
                f"unknown; allowed: {', '.join(STUDY_KEYS)}",
            )
    for key, p in STUDY_KEYS.items():
        settings[key] = _value(p, study, key, _bind(fail, ("study", key), f"[study] key {key!r}"))
    if "name" not in study:
        raise fail(("study",), "[study]", "missing required key 'name'")

    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise StudyError(
            _fmt(path, None, "[[steps]]", "a study needs at least one [[steps]] table")
        )
    steps: list[StepConfig] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_steps):
        label = f"steps[{i + 1}]"
        if not isinstance(raw, dict):
            raise fail(("steps", i), label, "must be a table ([[steps]])")
        sid = raw.get("id")
        if not isinstance(sid, str) or not _NAME.match(sid):
            raise fail(
                ("steps", i, "id"),
                label,
                f"'id' must be a name of letters, digits, _ and -; got {sid!r}",
            )
        label = f"steps[{i + 1}] (id {sid!r})"
        if sid in seen:
            raise fail(
                ("steps", i, "id"), label, f"duplicate id; steps[{seen[sid] + 1}] has it too"
            )
        seen[sid] = i
        kind_name = raw.get("kind")
        if not isinstance(kind_name, str) or kind_name not in kinds:
            raise fail(
                ("steps", i, "kind"),
                f"{label} key 'kind'",
                f"unknown kind {kind_name!r}; choose from {', '.join(sorted(kinds))}",
            )
        kind = kinds[kind_name]
        schema: dict[str, Param] = kind.params
        for key in raw:
            if key not in STEP_KEYS and key not in schema:
                raise fail(
                    ("steps", i, key),
                    f"{label} key {key!r}",
                    f"unknown for kind {kind_name!r}; allowed: {', '.join([*STEP_KEYS, *schema])}",
                )
        params: dict[str, Any] = {}
        needs: list[str] = []
        for key, p in schema.items():
            params[key] = _value(
                p, raw, key, _bind(fail, ("steps", i, key), f"{label} key {key!r}")
            )
            if p.ref and params[key]:
                refs = [params[key]] if isinstance(params[key], str) else list(params[key])
                for r in refs:
                    if r not in seen or r == sid:
                        raise fail(
                            ("steps", i, key),
                            f"{label} key {key!r}",
                            f"names step {r!r}, which is not a step above this one",
                        )
                    needs.append(r)
        after = raw.get("after", [])
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise fail(("steps", i, "after"), f"{label} key 'after'", "must be a list of step ids")
        for a in after:
            if a not in seen or a == sid:
                raise fail(
                    ("steps", i, "after"),
                    f"{label} key 'after'",
                    f"names step {a!r}, which is not a step above this one",
                )
            needs.append(a)
        step_model = raw.get("model")
        if step_model is not None and (not isinstance(step_model, str) or not step_model.strip()):
            raise fail(
                ("steps", i, "model"),
                f"{label} key 'model'",
                'must be "embedded", "tiny" or a model folder (a non-empty string)',
            )
        check = getattr(kind, "validate", None)
        if check is not None:
            problem = check(params)
            if problem:
                key, msg = problem
                raise fail(("steps", i, key), f"{label} key {key!r}", msg)
        steps.append(
            StepConfig(
                id=sid,
                kind=kind_name,
                params=params,
                needs=tuple(dict.fromkeys(needs)),
                line=lines.get(("steps", i)),
                model=step_model,
            )
        )
    return Study(
        name=settings["name"],
        description=settings["description"],
        model=settings["model"],
        dtype=settings["dtype"],
        seed=settings["seed"],
        output=settings["output"],
        sampling=settings["sampling"],
        steps=steps,
        source=text,
        path=Path(path) if path != "<study>" else None,
        settings=settings,
    )


Fail = Callable[[str], StudyError]


def _bind(
    fail: Callable[[tuple[Any, ...], str, str], StudyError], key_path: tuple[Any, ...], where: str
) -> Fail:
    """The error maker for one key: ``msg -> StudyError`` at that key's line."""

    def make(msg: str) -> StudyError:
        return fail(key_path, where, msg)

    return make


def _value(p: Param, table: Mapping[str, Any], key: str, fail: Fail) -> Any:
    if key not in table:
        if p.required:
            raise fail("missing (required)")
        return p.default
    try:
        value = _type_ok(table[key], p.type)
    except TypeError:
        raise fail(f"must be {_TYPE_WORDS[p.type]}; got {table[key]!r}") from None
    if p.choices is not None:
        vals = value if isinstance(value, list) else [value]
        bad = [v for v in vals if v not in p.choices]
        if bad:
            raise fail(f"{bad[0]!r} is not one of {', '.join(map(repr, p.choices))}")
    if p.check is not None:
        msg = p.check(value)
        if msg:
            raise fail(f"{msg}; got {value!r}")
    return value


def load(path: str | Path) -> Study:
    """Read and validate a study file."""
    p = Path(path)
    if not p.is_file():
        raise StudyError(f"{p}: no such study file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyError(f"{p}: cannot read the study file ({exc})") from None
    return loads(text, str(p))


def builtin_dir() -> Path:
    """The folder of the built-in study files."""
    return Path(__file__).resolve().parent


def builtin_studies() -> dict[str, Path]:
    """Built-in study name (file stem) -> file."""
    return {p.stem: p for p in sorted(builtin_dir().glob("*.toml"))}


def find(name_or_path: str) -> Path:
    """A study file: a path, or the name of a built-in study."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    builtin = builtin_studies()
    if name_or_path in builtin:
        return builtin[name_or_path]
    raise StudyError(
        f"{name_or_path}: no such study file, and no built-in study of that name "
        f"(built-in: {', '.join(builtin) or 'none'})"
    )
