"""Study files: a task, its base configuration and a grid of runs, declared in TOML.

::

    [study]
    name = "relaxation"                 # names the archive: <out>/<name>.h5
    task = "relaxation"                 # a key of the task registry (studies.catalogue.TASKS)
    description = "..."                 # optional
    save_weights = true                 # optional (default true): runs keep what they trained

    [base]                              # the task's config, validated against the task's schema;
    method = "exp_euler"                # keys left out take the schema's defaults
    [base.network]
    sizes = [64, 32, 10]

    [sweep]
    seeds = [0, 1]                      # the seed axis (dimension "seed", always the last one)
    [sweep.product]                     # base key path (dotted) -> values; cartesian product
    "network.asymmetry_angle" = [0.0, 45.0, 90.0]
    [sweep.zip]                         # keys zipped together (equal lengths) into ONE dimension,
    name = "integrator"                 # named `name`, or else the first key's last component
    method = ["euler", "rk4"]
    dt = [0.5, 1.0]

    [profiles.debug]                    # dotted key paths -> values: base keys, or sweep lists
    batch = 8                           # ("sweep.seeds", "sweep.product.<key>", "sweep.zip.<key>")
    "sweep.seeds" = [0]

Overrides (``substrate sweep STUDY --set base.epochs=1``) are TOML assignments applied to the file's
document before it is validated, so that a bad value is reported as it would be in the file; a key an
override sets is left alone by the profile. The study files shipped with the package (``studies/configs``)
are found by name (:func:`packaged_studies`, :func:`study_path`).

Every value is checked before anything runs: unknown keys, wrong types and out-of-range values raise
:class:`StudyConfigError` with the key path, the value and what is allowed. A product axis is named by
the last component of its key path (the whole path joined with ``_`` where two axes would share a
name). Each point of the grid is a :class:`Run` whose ``run_id`` hashes the task, the fully resolved
config and the seed: the same run has the same id in every study file that contains it, so finished
runs are found again whatever the axes' order.
"""


import copy
import hashlib
import importlib.resources
import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from substrate import SubstrateValueError


class StudyConfigError(SubstrateValueError):
    """A study file is invalid; the message names the key path, the value and what is allowed."""


# ------------------------------------------------------------------------------------ schemas
class Range(NamedTuple):
    """Numbers from ``lo`` to ``hi`` (None: unbounded); ends included unless ``*_open``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def __str__(self):
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return (f"{'(' if self.lo_open or self.lo is None else '['}{lo}, "
                f"{hi}{')' if self.hi_open or self.hi is None else ']'}")


class Check(NamedTuple):
    """A custom condition: ``test(value) -> bool`` and the text that tells what is allowed."""

    test: Callable[[Any], bool]
    text: str

    def __contains__(self, v) -> bool:
        return bool(self.test(v))

    def __str__(self):
        return self.text


class ListOf(NamedTuple):
    """A list of ``item`` values (int, float, str or bool), each in ``item_allowed``, of length in
    [min_len, max_len]."""

    item: type
    min_len: int = 1
    max_len: int | None = None
    item_allowed: Any = None


class Field(NamedTuple):
    """One key of a task's schema: ``(type, allowed, default, doc)``. type: int, float, str, bool or
    :class:`ListOf`; allowed: a :class:`Range`, a tuple of choices, a :class:`Check`, or None."""

    type: Any
    allowed: Any = None
    default: Any = None
    doc: str = ""


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean (true/false)"}


def _describe(v) -> str:
    return f"{v!r} ({type(v).__name__})"


def _allowed_text(f: Field) -> str:
    t = f.type
    if isinstance(t, ListOf):
        n = (f"{t.min_len}" if t.max_len == t.min_len else
             f"at least {t.min_len}" if t.max_len is None else f"{t.min_len} to {t.max_len}")
        text = f"a list of {n} {_TYPE_NAMES[t.item].split(' ', 1)[1]}s"
        if t.item_allowed is not None:
            text += f", each {_allowed_phrase(t.item_allowed)}"
    else:
        text = _TYPE_NAMES[t]
    if f.allowed is not None:
        text += f", {_allowed_phrase(f.allowed)}"
    return text


def _allowed_phrase(allowed) -> str:
    if isinstance(allowed, Range):
        return f"in {allowed}"
    if isinstance(allowed, Check):
        return str(allowed)
    return "one of " + ", ".join(repr(c) for c in allowed)


def _scalar(t, v, path, f: Field, allowed):
    """``v`` checked and normalised to type ``t`` (ints become floats for float keys)."""
    bad_type = StudyConfigError(f"{path} = {_describe(v)}: wrong type; allowed: {_allowed_text(f)}")
    if t is bool:
        if not isinstance(v, bool):
            raise bad_type
    elif t is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad_type
    elif t is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad_type
        v = float(v)
    elif t is str:
        if not isinstance(v, str):
            raise bad_type
    else:  # pragma: no cover - a schema error, not a user error
        raise TypeError(f"schema type {t!r} at {path} is not supported")
    if allowed is not None and v not in allowed:
        raise StudyConfigError(f"{path} = {v!r}: out of range; allowed: {_allowed_text(f)}")
    return v


def check_value(f: Field, v, path: str):
    """``v`` validated against one schema field and normalised; raises StudyConfigError."""
    if isinstance(f, tuple) and not isinstance(f, Field):
        f = Field(*f)
    t = f.type
    if isinstance(t, ListOf):
        if not isinstance(v, list):
            raise StudyConfigError(f"{path} = {_describe(v)}: wrong type; allowed: {_allowed_text(f)}")
        if len(v) < t.min_len or (t.max_len is not None and len(v) > t.max_len):
            raise StudyConfigError(f"{path} = {v!r}: wrong length {len(v)}; allowed: {_allowed_text(f)}")
        item_field = Field(t.item, t.item_allowed)
        out = []
        for i, x in enumerate(v):
            try:
                out.append(_scalar(t.item, x, f"{path}[{i}]", item_field, t.item_allowed))
            except StudyConfigError as e:
                raise StudyConfigError(f"{e} (in {path} = {v!r}; allowed: {_allowed_text(f)})") from None
        if f.allowed is not None and out not in f.allowed:
            raise StudyConfigError(f"{path} = {v!r}: out of range; allowed: {_allowed_text(f)}")
        return out
    return _scalar(t, v, path, f, f.allowed)


def _is_field(node) -> bool:
    return isinstance(node, tuple)


def leaf_paths(schema: Mapping, prefix: str = "") -> dict:
    """{dotted key path: Field} for every leaf of a schema."""
    out = {}
    for k, node in schema.items():
        p = f"{prefix}{k}"
        if _is_field(node):
            out[p] = node if isinstance(node, Field) else Field(*node)
        else:
            out.update(leaf_paths(node, p + "."))
    return out


def check_table(values, allowed, path: str):
    """``values`` must be a table whose keys are among ``allowed``."""
    if not isinstance(values, Mapping):
        raise StudyConfigError(f"{path} = {_describe(values)}: wrong type; allowed: a table with keys "
                               f"{', '.join(allowed)}")
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise StudyConfigError(f"{path}.{unknown[0]} = {values[unknown[0]]!r}: unknown key; "
                               f"allowed keys in {path}: {', '.join(allowed)}")


def resolve(schema: Mapping, values, path: str) -> dict:
    """``values`` (a TOML table) validated against ``schema``, defaults filled in."""
    check_table(values, schema, path)
    out = {}
    for k, node in schema.items():
        p = f"{path}.{k}"
        if _is_field(node):
            f = node if isinstance(node, Field) else Field(*node)
            out[k] = check_value(f, values[k], p) if k in values else copy.deepcopy(f.default)
        else:
            out[k] = resolve(node, values.get(k, {}), p)
    return out


def _set(tree: dict, dotted: str, value):
    *head, last = dotted.split(".")
    for k in head:
        tree = tree[k]
    tree[last] = value


def _flatten(table: Mapping, prefix: str = "") -> dict:
    """Nested tables to {dotted path: value}; keys may themselves be dotted (quoted TOML keys)."""
    out = {}
    for k, v in table.items():
        p = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, p + "."))
        else:
            out[p] = v
    return out


# ------------------------------------------------------------------------------------ runs
def canonical_json(obj) -> str:
    """The JSON of ``obj`` with sorted keys and no spaces (NaN refused): what run ids hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def run_id(task: str, config: Mapping, seed: int) -> str:
    """First 16 hex digits of the sha256 of the canonical JSON of {task, config, seed}."""
    blob = canonical_json({"task": task, "config": config, "seed": int(seed)})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Run:
    """One point of a study's grid. ``config`` is fully resolved (defaults included); ``coords`` gives
    the run's value on every axis (``seed`` last); ``index`` its position in the grid."""

    run_id: str
    config: dict
    seed: int
    coords: dict
    index: tuple = ()
    save_weights: bool = True  # keep the trained objects the task returns (not part of the run's identity)

    def to_dict(self) -> dict:
        """The run as a plain dict (what a worker is sent)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Run":
        """The run of :meth:`to_dict`'s dict."""
        d = dict(d)
        d["index"] = tuple(d.get("index", ()))
        return cls(**d)


@dataclass
class Axis:
    """A dimension of the grid: its name, the config keys it sets, one tuple of values per point
    (one value per key), and ``values``, its coordinate: the first key's values."""

    name: str
    keys: tuple
    points: list  # one tuple (one value per key) per point
    values: list

    def __len__(self):
        return len(self.points)


@dataclass
class Study:
    """A loaded study: ``base`` (resolved), ``axes`` (name -> coordinate values, seed last), and
    :meth:`runs`."""

    name: str
    task: str
    base: dict
    axis_list: list
    seeds: list
    profile: str | None = None
    path: str | None = None
    text: str = ""
    description: str = ""
    overrides: tuple = ()  # the TOML assignments applied to the file (``--set``), as given
    save_weights: bool = True  # study.save_weights: runs keep their trained objects

    @property
    def axes(self) -> dict:
        """{axis name: coordinate values}, the seed last."""
        out = {a.name: list(a.values) for a in self.axis_list}
        out["seed"] = list(self.seeds)
        return out

    @property
    def shape(self) -> tuple:
        """The number of points along each axis, the seed last."""
        return tuple(len(a) for a in self.axis_list) + (len(self.seeds),)

    def axis_coords(self) -> dict:
        """{coordinate name: (axis name, values)}: every axis's own coordinate, and along a zip axis one
        coordinate per zipped key, named by the key's last component."""
        out = {}
        for a in self.axis_list:
            out[a.name] = (a.name, list(a.values))
            if len(a.keys) > 1:
                for j, k in enumerate(a.keys):
                    out.setdefault(_coord_name(a, k), (a.name, [p[j] for p in a.points]))
        out["seed"] = ("seed", list(self.seeds))
        return out

    @property
    def n_runs(self) -> int:
        """The number of runs, from the axes' lengths (nothing is expanded)."""
        return math.prod(self.shape)

    def iter_runs(self) -> Iterator[Run]:
        """Every run of the grid, in C order over the axes (seed fastest), made one at a time: a large
        grid is never held in memory."""
        for index in itertools.product(*(range(n) for n in self.shape)):
            config = copy.deepcopy(self.base)
            coords = {}
            for a, i in zip(self.axis_list, index[:-1]):
                for k, v in zip(a.keys, a.points[i]):
                    _set(config, k, copy.deepcopy(v))
                coords[a.name] = a.values[i]
            seed = self.seeds[index[-1]]
            coords["seed"] = seed
            yield Run(run_id(self.task, config, seed), config, seed, coords, tuple(index), self.save_weights)

    def runs(self) -> list:
        """Every run of the grid as a list (see :meth:`iter_runs`)."""
        return list(self.iter_runs())

    def summary(self) -> str:
        """One line: the study's name, task, profile, overrides, run count and axes."""
        axes = ", ".join(f"{k} ({len(v)})" for k, v in self.axes.items())
        profile = f", profile {self.profile}" if self.profile else ""
        changed = f"; set {', '.join(self.overrides)}" if self.overrides else ""
        return f"study {self.name!r} (task {self.task}{profile}{changed}): {self.n_runs:,} runs over {axes}"


def _coord_name(axis: Axis, key: str) -> str:
    return key.split(".")[-1]


# ------------------------------------------------------------------------------------ loading
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def valid_name(name) -> bool:
    """Whether ``name`` may name a file in an output folder: letters, digits and ``_ . + -``, not
    starting with ``.`` (so neither a path, ``..`` nor a hidden file). Study names and every name read
    back from an archive are checked with it."""
    return isinstance(name, str) and bool(_NAME.match(name))


STUDY_KEYS = {"name": Field(str, Check(valid_name, "letters, digits, and _ . + - (a file name)")),
              "task": Field(str),
              "description": Field(str, None, ""),
              "save_weights": Field(bool, None, True, "keep what each run trained (its network, with "
                                    "substrate.save) in its run file, under weights/")}
TOP_KEYS = ("study", "base", "sweep", "profiles")
SWEEP_KEYS = ("seeds", "product", "zip")
SEED_FIELD = Field(int, Range(0, 2 ** 63 - 1), 0)


def _hashable(v):
    return canonical_json(v)


def _check_axis_values(f: Field, values, path: str) -> list:
    if not isinstance(values, list):
        raise StudyConfigError(f"{path} = {_describe(values)}: wrong type; allowed: a list of values, "
                               f"each {_allowed_text(f)}")
    if not values:
        raise StudyConfigError(f"{path} = []: an axis needs at least one value; allowed: a non-empty list "
                               f"of values, each {_allowed_text(f)}")
    out = [check_value(f, v, f"{path}[{i}]") for i, v in enumerate(values)]
    seen = set()
    for v in out:
        if _hashable(v) in seen:
            raise StudyConfigError(f"{path} = {values!r}: duplicate value {v!r}; allowed: distinct values")
        seen.add(_hashable(v))
    return out


def load_study(path: str, profile: str | None = None, *, tasks: Mapping, text: str | None = None,
               overrides=()) -> Study:
    """Read, validate and expand a study file. ``profile``: the name of a ``[profiles.*]`` table
    applied on top of the base and sweep (e.g. ``"debug"``); ``tasks``: the registry of the tasks a
    study may name (task name -> an object with a ``schema``, as ``studies.catalogue.TASKS``);
    ``text`` overrides the file's content; ``overrides``: TOML assignments (``"base.epochs = 1"``,
    ``"sweep.seeds = [0]"``, a bare word taken as a string) applied to the document before it is
    validated, over the profile's values for the same keys."""
    where = (os.path.basename(path) or path) if path else "<study>"

    def fail(msg):
        raise StudyConfigError(f"{where}: {msg}")

    if text is None:
        try:
            with open(path, "rb") as fh:
                text = fh.read().decode()
        except OSError as e:
            fail(f"cannot read the study file: {e.strerror or e}")
        except UnicodeDecodeError as e:
            fail(f"not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); allowed: a "
                 "TOML file encoded in UTF-8")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail(f"not valid TOML: {e}")

    overrides = tuple(overrides)
    changed = {}
    for assignment in overrides:
        tree = parse_override(assignment)
        _apply(doc, tree)
        changed.update(_flatten(tree))
    try:
        return _build(doc, text, path, profile, tasks, overrides, set(changed))
    except StudyConfigError as e:
        raise StudyConfigError(f"{where}: {e}") from None


_BARE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.+/-]*$")


def parse_override(assignment: str) -> dict:
    """A TOML assignment ``key.path = value`` as a nested table; a bare word as value is a string
    (``base.data=fashion_mnist``)."""
    if not isinstance(assignment, str) or "=" not in assignment:
        raise StudyConfigError(f"override {assignment!r}: expected key = value, e.g. base.epochs=1, "
                               "sweep.seeds=[0, 1], base.data=digits")
    try:
        return tomllib.loads(assignment)
    except tomllib.TOMLDecodeError as e:
        key, _, value = assignment.partition("=")
        if _BARE_WORD.match(value.strip()):
            return parse_override(f'{key} = "{value.strip()}"')
        raise StudyConfigError(f"override {assignment!r}: not a TOML assignment key = value ({e}); e.g. "
                               "base.epochs=1, sweep.seeds=[0, 1], base.data=digits") from None


def _apply(doc: dict, tree: Mapping, at: tuple = ()):
    """Merge an override's table into the document: tables merged key by key, values replaced. The axes
    of ``[sweep.product]`` and ``[sweep.zip]`` are keyed by whole base key paths (quoted in the file), so
    an override's ``sweep.product.network.sizes`` names the axis ``"network.sizes"``."""
    for k, v in tree.items():
        if at in (("sweep", "product"), ("sweep", "zip")) and isinstance(v, Mapping):
            doc.update(_flatten(v, f"{k}."))
        elif isinstance(v, Mapping) and isinstance(doc.setdefault(k, {}), Mapping):
            _apply(doc[k], v, at + (k,))
        else:
            doc[k] = v


def _build(doc, text, path, profile, tasks, assignments=(), changed=frozenset()) -> Study:
    unknown = [k for k in doc if k not in TOP_KEYS]
    if unknown:
        raise StudyConfigError(f"{unknown[0]} = {doc[unknown[0]]!r}: unknown key; allowed top-level "
                               f"tables: {', '.join(TOP_KEYS)}")
    if "study" not in doc:
        raise StudyConfigError("[study] is missing; it needs name = \"...\" and task = \"...\"")
    study_tab = doc["study"]
    if not isinstance(study_tab, Mapping):
        raise StudyConfigError(f"study = {_describe(study_tab)}: wrong type; allowed: a table")
    for k in ("name", "task"):
        if k not in study_tab:
            raise StudyConfigError(f"study.{k} is missing; allowed: {_allowed_text(STUDY_KEYS[k])}")
    meta = resolve(STUDY_KEYS, study_tab, "study")
    if meta["task"] not in tasks:
        raise StudyConfigError(f"study.task = {meta['task']!r}: unknown task; allowed: "
                               f"{', '.join(repr(t) for t in tasks)}")
    task = tasks[meta["task"]]
    leaves = leaf_paths(task.schema)

    raw_base = doc.get("base", {})
    base = resolve(task.schema, raw_base, "base")

    sweep = doc.get("sweep", {})
    check_table(sweep, SWEEP_KEYS, "sweep")
    sweep = copy.deepcopy(dict(sweep))

    # profiles: every one is validated, the chosen one applied
    profiles = doc.get("profiles", {})
    if not isinstance(profiles, Mapping) or not all(isinstance(p, Mapping) for p in profiles.values()):
        raise StudyConfigError(f"profiles = {profiles!r}: wrong type; allowed: tables [profiles.<name>] "
                               "of dotted key paths -> values")
    if profile is not None and profile not in profiles:
        raise StudyConfigError(f"profile {profile!r} is not defined; allowed: "
                               f"{', '.join(repr(p) for p in profiles) or 'none (the file has no [profiles.*])'}")
    overrides = {}
    for pname, ptab in profiles.items():
        flat = _flatten(ptab)
        checked = {}
        for key, value in flat.items():
            p = f"profiles.{pname}.{key}"
            if key.startswith("sweep."):
                checked[key] = _profile_sweep_value(key, value, p, sweep, leaves)
            elif key in leaves:
                checked[key] = check_value(leaves[key], value, p)
            else:
                raise StudyConfigError(
                    f"{p} = {value!r}: unknown key; allowed: a base key path ({', '.join(leaves)}) or "
                    f"sweep.seeds, sweep.product.<key>, sweep.zip.<key> of an existing axis")
        overrides[pname] = checked
    if profile is not None:
        for key, value in overrides[profile].items():
            if (key if key.startswith("sweep.") else f"base.{key}") in changed:
                continue  # an override of the same key wins
            if key.startswith("sweep."):
                section, _, rest = key[len("sweep."):].partition(".")
                if section == "seeds":
                    sweep["seeds"] = value
                else:
                    sweep[section][rest] = value
            else:
                _set(base, key, value)

    try:
        seeds, axes = _axes(sweep, leaves)
    except StudyConfigError as e:
        if profile is None:
            raise
        raise StudyConfigError(f"{e} (with profile {profile!r} applied)") from None
    return Study(name=meta["name"], task=meta["task"], base=base, axis_list=axes, seeds=seeds,
                 profile=profile, path=os.path.abspath(path) if path else None, text=text,
                 description=meta["description"], overrides=tuple(assignments), save_weights=meta["save_weights"])


def _axes(sweep: Mapping, leaves: Mapping):
    seeds = _check_axis_values(SEED_FIELD, sweep.get("seeds", [0]), "sweep.seeds")
    axes = []
    used_keys = {}
    order = [k for k in sweep if k in ("product", "zip")]
    for section in order:
        tab = sweep[section]
        if not isinstance(tab, Mapping):
            raise StudyConfigError(f"sweep.{section} = {_describe(tab)}: wrong type; allowed: a table of "
                                   "base key paths -> lists of values")
        if section == "product":
            for key, values in tab.items():
                f = _sweep_field(key, f"sweep.product.{key}", leaves, used_keys)
                vals = _check_axis_values(f, values, f"sweep.product.{key}")
                axes.append(Axis(key.split(".")[-1], (key,), [(v,) for v in vals], vals))
        else:
            axes.extend(_zip_axis(tab, leaves, used_keys))
    _name_axes(axes)
    return seeds, axes


def _sweep_field(key, path, leaves, used_keys) -> Field:
    if key not in leaves:
        raise StudyConfigError(f"{path}: {key!r} is not a key of the base config; allowed: "
                               f"{', '.join(leaves)}")
    if key in used_keys:
        raise StudyConfigError(f"{path}: {key!r} is already swept by {used_keys[key]}; allowed: each key on "
                               "one axis only")
    used_keys[key] = path
    return leaves[key]


def _zip_axis(tab, leaves, used_keys) -> list:
    tab = dict(tab)
    name = tab.pop("name", None)
    if name is not None and not valid_name(name):
        raise StudyConfigError(f"sweep.zip.name = {name!r}: wrong type; allowed: a string of letters, digits "
                               "and _ . + -")
    if not tab:
        if name is not None:
            raise StudyConfigError(f"sweep.zip = {{name = {name!r}}}: no keys to zip; allowed: base key "
                                   "paths -> lists of equal lengths")
        return []
    cols = {}
    for key, values in tab.items():
        f = _sweep_field(key, f"sweep.zip.{key}", leaves, used_keys)
        if not isinstance(values, list) or not values:
            raise StudyConfigError(f"sweep.zip.{key} = {values!r}: an axis needs a non-empty list; allowed: "
                                   f"a list of values, each {_allowed_text(f)}")
        cols[key] = [check_value(f, v, f"sweep.zip.{key}[{i}]") for i, v in enumerate(values)]
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise StudyConfigError("sweep.zip: lists of unequal lengths (" +
                               ", ".join(f"{k}: {n} values" for k, n in lengths.items()) +
                               "); allowed: zipped lists of equal lengths")
    keys = tuple(cols)
    points = list(zip(*(cols[k] for k in keys)))
    seen = set()
    for p in points:
        h = _hashable(list(p))
        if h in seen:
            raise StudyConfigError(f"sweep.zip = {dict(cols)!r}: duplicate point {dict(zip(keys, p))!r}; "
                                   "allowed: distinct points")
        seen.add(h)
    return [Axis(name or keys[0].split(".")[-1], keys, points, [p[0] for p in points])]


def _name_axes(axes: list):
    """Axis names: the key's last component; the full path joined by ``_`` where two would clash."""
    def clashes():
        names = [a.name for a in axes] + ["seed"]
        for a in axes:
            if len(a.keys) > 1:  # zipped keys are coordinates along the axis (the first may be the axis')
                names += [_coord_name(a, k) for j, k in enumerate(a.keys) if j or _coord_name(a, k) != a.name]
        return {n for n in names if names.count(n) > 1}

    clash = clashes()
    for a in axes:
        if a.name in clash and len(a.keys) == 1:
            a.name = a.keys[0].replace(".", "_")
    clash = clashes()
    if clash:
        raise StudyConfigError(f"sweep: axes or zipped keys share the name(s) {sorted(clash)} (the seed axis "
                               "is named 'seed'); allowed: distinct names (set sweep.zip.name)")


def _profile_sweep_value(key, value, path, sweep, leaves):
    section, _, rest = key[len("sweep."):].partition(".")
    if section == "seeds" and not rest:
        return _check_axis_values(SEED_FIELD, value, path)
    if section in ("product", "zip") and rest:
        tab = sweep.get(section, {})
        tab = tab if isinstance(tab, Mapping) else {}
        if rest in tab and rest != "name":
            if rest not in leaves:
                return value  # the sweep table itself names an unknown key: reported with its own path
            if section == "product":
                return _check_axis_values(leaves[rest], value, path)
            if not isinstance(value, list) or not value:  # a zipped list may repeat values
                raise StudyConfigError(f"{path} = {value!r}: an axis needs a non-empty list; allowed: a list "
                                       f"of values, each {_allowed_text(leaves[rest])}")
            return [check_value(leaves[rest], v, f"{path}[{i}]") for i, v in enumerate(value)]
        axes = [f"sweep.{section}.{k}" for k in tab if k != "name"]
        raise StudyConfigError(f"{path} = {value!r}: not an axis of [sweep.{section}]; allowed: "
                               f"{', '.join(axes) or 'none'} (a profile replaces the lists of existing axes)")
    raise StudyConfigError(f"{path} = {value!r}: unknown sweep key; allowed: sweep.seeds, "
                           "sweep.product.<key>, sweep.zip.<key>")


# ------------------------------------------------------------------------------------ packaged studies
def package_folder(name: str) -> str:
    """A folder shipped inside the package: ``configs`` (the study files) or ``notebooks``."""
    return str(importlib.resources.files("studies").joinpath(name))


def packaged_studies() -> dict:
    """{name: path} of the study files shipped with the package (``studies/configs/<name>.toml``)."""
    folder = package_folder("configs")
    return {n[:-len(".toml")]: os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".toml")}


def study_path(study: str) -> str:
    """``study`` if it is a file, else the packaged study file of that name (``ep_bias`` or
    ``ep_bias.toml``); a :class:`StudyConfigError` naming the packaged studies otherwise."""
    if os.path.isfile(study):
        return study
    known = packaged_studies()
    name = study[:-len(".toml")] if study.endswith(".toml") else study
    if name in known:
        return known[name]
    raise StudyConfigError(f"{study}: no such study file, nor a packaged study of that name; allowed: a study "
                           f"file's path, or one of {', '.join(known)} (substrate studies lists them)")
