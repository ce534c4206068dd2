"""One settings object for a whole process: where files live, which device and precision nodes compute in.

It is built once, from the environment and then the command line, the server's options or the Python API
(``Settings.from_env(models_dir=..., device=...)``), and handed down: the executor gives it to every node through
``ctx.settings`` and to validation (choices that list a folder), and the server's file routes read the same folders.
Nothing in the process keeps a mutable copy of its own, so two executors with different settings can run side by
side (the tests do).

Environment variables give the defaults: ``NODEGRAPH_MODELS``, ``NODEGRAPH_INPUT``, ``NODEGRAPH_OUTPUT``,
``NODEGRAPH_TEMP``, ``NODEGRAPH_DEVICE``, ``NODEGRAPH_DTYPE``, ``NODEGRAPH_MAX_SIZE``, ``NODEGRAPH_COMPILE`` (1/0),
``NODEGRAPH_MAP_WEIGHTS`` (1/0).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

DTYPES = ("float32", "float16", "bfloat16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")

_PATHS = ("models_dir", "input_dir", "output_dir", "temp_dir")
_ENV = {"models_dir": "NODEGRAPH_MODELS", "input_dir": "NODEGRAPH_INPUT", "output_dir": "NODEGRAPH_OUTPUT",
        "temp_dir": "NODEGRAPH_TEMP", "device": "NODEGRAPH_DEVICE", "dtype": "NODEGRAPH_DTYPE",
        "max_image_size": "NODEGRAPH_MAX_SIZE", "compile": "NODEGRAPH_COMPILE",
        "map_weights": "NODEGRAPH_MAP_WEIGHTS"}
_FLAGS = ("compile", "map_weights")


def _default_temp() -> Path:
    return Path(tempfile.gettempdir()) / "nodegraph-previews"


@dataclass(frozen=True)
class Settings:
    """Everything a run may depend on besides the workflow itself. Immutable: derive with ``replace``."""

    models_dir: Path = Path("models")
    input_dir: Path = Path("input")
    output_dir: Path = Path("output")
    temp_dir: Path = dataclasses.field(default_factory=_default_temp)  # previews, shared by writer and server
    device: str | None = None  # None: chosen at run time by the node library (a GPU when there is one)
    dtype: str | None = None  # None: the node library's choice for the device
    # Layout of convolution weights: "auto" lets the node library choose per device (channels_last on the CPU,
    # where oneDNN convolutions run faster in it); "contiguous" gives results bit-identical to diffusers.
    memory_format: str = "auto"
    allow_pickle: bool = False  # pickle checkpoints (.ckpt, .pt) are refused unless the user opts in
    max_image_size: int = 4096  # pixels per side: a typo of 51200 should be an error, not an out-of-memory
    previews: bool = False  # whether samplers send preview images with their progress (the server asks for them)
    compile: bool = False  # compile models where the node library can (slow first runs, faster later ones)
    # Keep weights memory-mapped where the node library can use them as stored (no cast, no copy): loads take a
    # fraction of the time. None: only where the file is guarded against being rewritten in place under its maps
    # (nodegraph.filemaps), copied elsewhere; True: mapped even unguarded; False: always copied.
    map_weights: bool | None = None

    def __post_init__(self) -> None:
        for name in _PATHS:
            value = getattr(self, name)
            object.__setattr__(self, name, Path(value).expanduser())
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"unknown memory format {self.memory_format!r}; "
                             f"choose one of {', '.join(MEMORY_FORMATS)}")
        if not isinstance(self.max_image_size, int) or self.max_image_size < 8:
            raise ValueError(f"max_image_size must be a whole number of pixels (at least 8), "
                             f"not {self.max_image_size!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **given: Any) -> "Settings":
        """Defaults, then the environment, then ``given`` (None in ``given`` means "not given")."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable in _ENV.items():
            raw = environ.get(variable)
            if raw:
                values[name] = _parse(name, variable, raw)
        return cls(**values).replace(**given)

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied; None values are ignored (an option that was not given)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(unknown)}")
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def fingerprint(self) -> tuple:
        """The settings that change what a node computes from the same inputs (device, precision, layout, ...);
        the executor mixes them into cache keys. Folders are not here: files are identified by their own path."""
        return (self.device, self.dtype, self.memory_format, self.allow_pickle, self.max_image_size, self.compile,
                self.map_weights)

    def to_json(self) -> dict:
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v)
                for f in dataclasses.fields(self)}


def _parse(name: str, variable: str, raw: str) -> Any:
    if name in _FLAGS:
        flag = raw.strip().lower()
        if name == "map_weights" and flag == "auto":
            return None
        if flag not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{variable}={raw!r}: say 1 or 0" + (" (or auto)" if name == "map_weights" else ""))
        return flag in ("1", "true", "yes", "on")
    if name == "max_image_size":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{variable}={raw!r} is not a whole number of pixels") from None
    return raw
