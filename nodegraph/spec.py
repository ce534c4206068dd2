"""Input and output declarations: the typed vocabulary a node uses to describe its interface.

A node type lists its inputs as instances of the classes below. Each spec knows how to check a literal value
(returning problems as data, never raising), how to serialise itself for the canvas and the API, and which socket
type a link into it must carry. Socket types are plain upper-case strings forming an open set: the engine knows
none of them except the widget types (INT, FLOAT, STRING, BOOLEAN, COMBO) and the wildcard ``*``.
"""

from __future__ import annotations

import copy
import logging
import math
import unicodedata
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from .settings import Settings

ANY = "*"


@runtime_checkable
class Choices(Protocol):
    """Choices computed from the settings: a folder's files (``nodegraph.folders.Folder``) or anything shaped so.
    ``identity`` says what identifies the content a name stands for (a file's path, size and time)."""

    def names(self, settings: "Settings") -> Iterable[str]: ...

    def identity(self, settings: "Settings", name: str) -> Hashable: ...

    def hint(self, settings: "Settings") -> str: ...


@dataclass(frozen=True)
class Problem:
    """One reason a value is unacceptable: a machine-readable code and a human message."""

    code: str
    message: str


def types_compatible(source: str, target: str | Sequence[str]) -> bool:
    """Whether an output of type ``source`` may feed an input accepting ``target`` (a type or a list of types)."""
    targets = (target,) if isinstance(target, str) else tuple(target)
    return source == ANY or ANY in targets or source in targets


@dataclass(frozen=True)
class Output:
    """A named, typed output of a node."""

    name: str
    type: str

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.type}


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """Base of every input declaration. ``name`` is filled in when the node class is created."""

    optional: bool = False
    tooltip: str = ""
    name: str = ""

    kind: str = field(default="", init=False)

    def named(self, name: str) -> "InputSpec":
        """A copy carrying the attribute name it was declared under."""
        clone = copy.copy(self)
        object.__setattr__(clone, "name", name)
        return clone

    @property
    def accepts(self) -> tuple[str, ...]:
        """The socket types a link into this input may carry."""
        raise NotImplementedError

    @property
    def has_default(self) -> bool:
        return False

    def check(self, value: Any, settings: "Settings | None" = None) -> list[Problem]:
        """Problems with a literal value given for this input (empty when the value is fine). ``settings`` is what
        choices computed at run time (the files in a folder) are computed from."""
        raise NotImplementedError

    def identity(self, value: Any, settings: "Settings") -> Any:
        """What the cache key should contain for ``value``: the value itself unless it names something mutable."""
        return value

    def normalise(self, value: Any) -> Any:
        """The value the node receives for an accepted literal (e.g. with omitted fields filled in)."""
        return value

    @property
    def dynamic_identity(self) -> bool:
        """Whether ``identity`` can change while the value stays the same (a file replaced under its name)."""
        return False

    def to_json(self, settings: "Settings | None" = None) -> dict:
        out = {"name": self.name, "kind": self.kind, "optional": self.optional}
        if self.tooltip:
            out["tooltip"] = self.tooltip
        return out


@dataclass(frozen=True, kw_only=True)
class Socket(InputSpec):
    """An input that only a link can feed, carrying one of ``types`` (e.g. ``Socket("MODEL")``)."""

    types: tuple[str, ...] = ()
    kind: str = field(default="socket", init=False)

    def __init__(self, *types: str, optional: bool = False, tooltip: str = "", name: str = ""):
        if not types:
            raise TypeError("Socket needs at least one type")
        object.__setattr__(self, "types", tuple(types))
        object.__setattr__(self, "optional", optional)
        object.__setattr__(self, "tooltip", tooltip)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "kind", "socket")

    @property
    def accepts(self) -> tuple[str, ...]:
        return self.types

    def check(self, value: Any, settings: "Settings | None" = None) -> list[Problem]:
        return [Problem("expects_link", f"expects a link carrying {'/'.join(self.types)}, got a literal value")]

    def to_json(self, settings: "Settings | None" = None) -> dict:
        return {**super().to_json(settings), "type": "/".join(self.types)}


@dataclass(frozen=True, kw_only=True)
class Widget(InputSpec):
    """An input with a literal value edited on the node; a link of the widget's type may feed it instead.

    ``identity_of(value, settings)`` maps a value to what identifies the content it names (for a file: path, size
    and modification time), so that replacing a file under the same name invalidates cached results that used it."""

    default: Any = None
    identity_of: Callable[[Any, "Settings"], Hashable] | None = None

    def identity(self, value: Any, settings: "Settings") -> Any:
        return self.identity_of(value, settings) if self.identity_of is not None else value

    @property
    def dynamic_identity(self) -> bool:
        return self.identity_of is not None

    @property
    def type(self) -> str:
        return self.kind

    @property
    def accepts(self) -> tuple[str, ...]:
        return (self.type,)

    @property
    def has_default(self) -> bool:
        return self.default is not None

    def to_json(self, settings: "Settings | None" = None) -> dict:
        out = {**super().to_json(settings), "type": self.type}
        if self.default is not None:
            out["default"] = self.default
        return out


_FLOAT_MAX = 1.7976931348623157e308


def _number_problems(value: float, lo: float | None, hi: float | None, step: float | None, base: float | None,
                     tolerance: float) -> list[Problem]:
    if lo is not None and value < lo:
        return [Problem("out_of_range", f"{_short(value)} is below the minimum {lo}")]
    if hi is not None and value > hi:
        return [Problem("out_of_range", f"{_short(value)} is above the maximum {hi}")]
    if step:
        if isinstance(value, int) and isinstance(step, int) and isinstance(base or 0, int):
            off = (value - (base or 0)) % step != 0  # exact: a huge integer would overflow a float division
        else:
            k = (value - (base or 0)) / step
            off = abs(k - round(k)) > tolerance
        if off:
            origin = f" from {base}" if base else ""
            return [Problem("off_step", f"{_short(value)} is not a multiple of the step {step}{origin}")]
    return []


def _short(value: float) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


@dataclass(frozen=True, kw_only=True)
class Int(Widget):
    """A whole number with optional bounds and step (the step counts from ``min`` when one is set)."""

    default: int = 0
    min: int | None = None
    max: int | None = None
    step: int | None = None
    kind: str = field(default="INT", init=False)

    def check(self, value: Any, settings: "Settings | None" = None) -> list[Problem]:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # JSON writers may emit 5.0 for 5; accept it
            else:
                return [Problem("wrong_type", f"expects an integer, got {_describe(value)}")]
        return _number_problems(value, self.min, self.max, self.step, self.min, 0)

    def to_json(self, settings: "Settings | None" = None) -> dict:
        return _with_optional(super().to_json(settings), min=self.min, max=self.max, step=self.step)


@dataclass(frozen=True, kw_only=True)
class Float(Widget):
    """A real number with optional bounds and step; ``round`` is the precision the canvas rounds to."""

    default: float = 0.0
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None
    kind: str = field(default="FLOAT", init=False)

    def check(self, value: Any, settings: "Settings | None" = None) -> list[Problem]:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [Problem("wrong_type", f"expects a number, got {_describe(value)}")]
        if isinstance(value, int) and abs(value) > _FLOAT_MAX:  # JSON integers are unbounded; floats are not
            return [Problem("out_of_range", f"{_describe(value)} is too large for a number")]
        if not math.isfinite(value):
            return [Problem("wrong_type", f"expects a finite number, got {value}")]
        # Steps are decimal fractions such as 0.05 that binary floats cannot hold exactly: allow a small slack.
        return _number_problems(value, self.min, self.max, self.step, self.min, 1e-6)

    def to_json(self, settings: "Settings | None" = None) -> dict:
        return _with_optional(super().to_json(settings), min=self.min, max=self.max, step=self.step, round=self.round)


@runtime_checkable
class Confining(Protocol):
    """A folder that file names are confined to (``nodegraph.folders.Folder``): ``path`` raises ``UnsafePath`` for a
    name that leaves it."""

    def path(self, settings: "Settings", name: str) -> Any: ...


@dataclass(frozen=True, kw_only=True)
class String(Widget):
    """Text; ``multiline`` asks the canvas for a text area. ``path_within`` (a folder) makes the text a file name or
    file-name prefix inside that folder ("portraits/cat"): validation refuses one that could leave it, in any
    spelling (``..``, absolute, drive letters, backslashes, control characters, URL-encoded or Unicode look-alikes),
    so a hostile workflow is refused before anything runs."""

    default: str = ""
    multiline: bool = False
    max_length: int | None = None
    path_within: Confining | None = None
    kind: str = field(default="STRING", init=False)

    def check(self, value: Any, settings: "Settings | None" = None) -> list[Problem]:
        if not isinstance(value, str):
            return [Problem("wrong_type", f"expects text, got {_describe(value)}")]
        if self.max_length is not None and len(value) > self.max_length:
            return [Problem("out_of_range", f"text of {len(value)} characters exceeds the limit {self.max_length}")]
        if self.path_within is not None:
            reason = file_name_problem(value, allow_empty=True)
            if reason is None:
                from .paths import UnsafePath

                try:  # what the name resolves to, symbolic links included (a prefix: check a file it would name)
                    self.path_within.path(settings if settings is not None else _settings_from_env(), value + "_")
                except UnsafePath as exc:
                    reason = str(exc)
            if reason is not None:
                return [Problem("unsafe_path", reason)]
        return []

    def to_json(self, settings: "Settings | None" = None) -> dict:
        return {**super().to_json(settings), "multiline": self.multiline}


@dataclass(frozen=True, kw_only=True)
class Boolean(Widget):
    """A checkbox."""

    default: bool = False
    kind: str = field(default="BOOLEAN", init=False)

    def check(self, value: Any, settings: "Settings | None" = None) -> list[Problem]:
        if not isinstance(value, bool):
            return [Problem("wrong_type", f"expects true or false, got {_describe(value)}")]
        return []


@dataclass(frozen=True, kw_only=True)
class Combo(Widget):
    """One choice among ``options``: a fixed list, or a function computing it at run time (e.g. files in a
    folder)."""

    # A fixed list; a Choices object (a folder: its names, what identifies each, where they are read from); or a
    # function of the settings giving the names.
    options: Sequence[str] | Choices | Callable[["Settings"], Iterable[str]] = ()
    # Values outside the options that are still acceptable (e.g. a hub repository id), with a hint for the canvas.
    accepts_other: Callable[[str, "Settings"], bool] | None = None
    other_hint: str = ""
    upload: str | None = None  # "image": the canvas offers an upload button that adds a new option
    # Said when a value is not among the options (e.g. which folder the file should be in); a Choices says it.
    missing_hint: str | Callable[["Settings"], str] = ""
    kind: str = field(default="COMBO", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.options, Choices):  # a folder knows what identifies its files and where they are
            if self.identity_of is None:
                object.__setattr__(self, "identity_of", lambda value, settings: self.options.identity(settings, value))
            if not self.missing_hint:
                object.__setattr__(self, "missing_hint", self.options.hint)

    @property
    def computed(self) -> bool:
        """Whether the options are computed at run time (and so may change between two runs)."""
        return isinstance(self.options, Choices) or callable(self.options)

    @property
    def accepts(self) -> tuple[str, ...]:
        return ("COMBO", "STRING")

    @property
    def has_default(self) -> bool:
        return self.default is not None

    def current_options(self, settings: "Settings | None" = None) -> list[str]:
        """The choices now; computed ones from ``settings`` (the environment's when not given)."""
        if not self.computed:
            return list(self.options)
        settings = settings if settings is not None else _settings_from_env()
        try:
            if isinstance(self.options, Choices):
                return list(self.options.names(settings))
            return list(self.options(settings))
        except Exception:  # a missing or unreadable folder must not break validation or the palette
            logging.getLogger("nodegraph.spec").exception("listing the options of %r failed", self.name)
            return []

    def check(self, value: Any, settings: "Settings | None" = None) -> list[Problem]:
        if not isinstance(value, str):
            return [Problem("wrong_type", f"expects one of the listed choices (text), got {_describe(value)}")]
        settings = settings if settings is not None else _settings_from_env()
        options = self.current_options(settings)
        if value not in options and not (self.accepts_other is not None and self.accepts_other(value, settings)):
            shown = ", ".join(repr(o) for o in options[:20]) + (" ..." if len(options) > 20 else "")
            hint = self.missing_hint(settings) if callable(self.missing_hint) else self.missing_hint
            return [Problem("not_an_option", f"{value!r} is not one of the choices: {shown or '(none available)'}"
                                             + (f" ({hint})" if hint else ""))]
        return []

    def to_json(self, settings: "Settings | None" = None) -> dict:
        out = {**super().to_json(settings), "options": self.current_options(settings), "dynamic": self.computed}
        if self.accepts_other is not None:
            out["accepts_other"] = self.other_hint or True
        if self.upload:
            out["upload"] = self.upload
        return out


_MAX_PART = 200  # characters in one path component: file systems refuse names past 255 bytes


def file_name_problem(name: str, allow_empty: bool = False) -> str | None:
    """Why ``name`` (from an untrusted workflow or request) cannot name a file inside its folder, or None. Besides
    the plain escapes it refuses the spellings other layers may turn into one: percent-encoding (a URL decoded
    again later) and Unicode compatibility forms (NFKC makes U+2025 "..", and the fullwidth solidus U+FF0F "/")."""
    if not name:
        return None if allow_empty else "a file name is required"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name):
        return f"{_shown(name)}: control characters are not allowed in file names"
    spellings = {name, unicodedata.normalize("NFKC", name)}
    for spelling in list(spellings):
        decoded = spelling
        for _ in range(3):  # %252e%252e is %2e%2e after one decoding
            decoded = urllib.parse.unquote(decoded)
            spellings |= {decoded, unicodedata.normalize("NFKC", decoded)}
    for spelling in spellings:
        disguised = "" if spelling == name else " (once decoded or normalised)"
        if "\\" in spelling or "\x00" in spelling:
            return f"{_shown(name)}: backslashes and NUL characters are not allowed in file names{disguised}"
        if spelling.startswith("/") or (len(spelling) > 1 and spelling[1] == ":"):
            return f"{_shown(name)}: absolute paths are not allowed; name a file inside the folder{disguised}"
        if any(_is_up(part) for part in spelling.split("/")):
            return f"{_shown(name)}: '..' is not allowed in file names{disguised}"
    if any(len(part) > _MAX_PART for part in name.split("/")):
        return f"{_shown(name)}: a part of the name is longer than {_MAX_PART} characters"
    return None


def _is_up(part: str) -> bool:
    # Windows drops trailing dots and spaces, so "..." and ".. " are ".." there
    return part.count(".") >= 2 and not part.strip(". ")


def _shown(name: str) -> str:
    return repr(name if len(name) <= 60 else name[:57] + "...")


def _settings_from_env() -> "Settings":
    from .settings import Settings

    return Settings.from_env()


def _with_optional(out: dict, **values: Any) -> dict:
    out.update({k: v for k, v in values.items() if v is not None})
    return out


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


@dataclass(frozen=True, kw_only=True)
class ListOf(Widget):
    """A variable-length list of rows, each a dict of widget values (e.g. LoRAs with a file and two strengths).
    The canvas shows it as a table with add and remove buttons."""

    fields: tuple[Widget, ...] = ()
    default: list = field(default_factory=list)
    max_items: int = 64
    kind: str = field(default="LIST", init=False)

    def __init__(self, *, optional: bool = False, tooltip: str = "", max_items: int = 64, **fields: Widget):
        object.__setattr__(self, "fields", tuple(spec.named(name) for name, spec in fields.items()))
        object.__setattr__(self, "default", [])
        object.__setattr__(self, "max_items", max_items)
        object.__setattr__(self, "optional", optional)
        object.__setattr__(self, "tooltip", tooltip)
        object.__setattr__(self, "name", "")
        object.__setattr__(self, "kind", "LIST")

    @property
    def has_default(self) -> bool:
        return True

    def check(self, value: Any, settings: "Settings | None" = None) -> list[Problem]:
        if not isinstance(value, list):
            return [Problem("wrong_type", f"expects a list of rows, got {_describe(value)}")]
        if len(value) > self.max_items:
            return [Problem("out_of_range", f"{len(value)} rows exceed the limit of {self.max_items}")]
        problems = []
        for i, row in enumerate(value):
            if not isinstance(row, dict):
                problems.append(Problem("wrong_type", f"row {i + 1} must be an object, got {_describe(row)}"))
                continue
            unknown = sorted(set(row) - {f.name for f in self.fields})
            if unknown:
                problems.append(Problem("unknown_input", f"row {i + 1} has unknown field(s) {', '.join(unknown)}"))
            for spec in self.fields:
                if spec.name not in row:
                    if not spec.has_default:
                        problems.append(Problem("missing_input", f"row {i + 1} has no {spec.name!r}"))
                    continue
                problems += [Problem(p.code, f"row {i + 1}, {spec.name}: {p.message}")
                             for p in spec.check(row[spec.name], settings)]
        return problems

    def normalise(self, rows: list[dict]) -> list[dict]:
        """Rows with omitted fields filled in from their defaults."""
        return [{**{f.name: f.default for f in self.fields if f.has_default}, **row} for row in rows]

    def identity(self, value: Any, settings: "Settings") -> Any:
        return [{f.name: f.identity(row[f.name], settings) if f.name in row else None for f in self.fields}
                for row in value]

    @property
    def dynamic_identity(self) -> bool:
        return any(f.dynamic_identity for f in self.fields)

    def to_json(self, settings: "Settings | None" = None) -> dict:
        return {**super().to_json(settings), "fields": [f.to_json(settings) for f in self.fields],
                "max_items": self.max_items}
