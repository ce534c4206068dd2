"""Weight files, recognised and read by content, never by extension: safetensors (header checked against the file
size before any tensor is read) and torch pickles (refused unless pickles are allowed, then read with
``weights_only=True``). Every loader of the library (checkpoints, ControlNets, IP-Adapters, LoRAs, embeddings)
sniffs its files here.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from nodegraph import filemaps, heap

from .errors import CheckpointError, first_line

#: Files of a loadable checkpoint, by extension, for listings only (loading goes by content).
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

_SAFETENSORS_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
_MAGIC = [
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"), (b"RIFF", "a RIFF file"),
    (b"GGUF", "a GGUF file"), (b"\x1f\x8b", "a gzip archive"), (b"BZh", "a bzip2 archive"),
    (b"7z\xbc\xaf", "a 7z archive"),
    (b"%PDF", "a PDF document"), (b"<", "an HTML or XML document"), (b"{", "a JSON document"),
]


def is_safetensors(path: Path | str) -> bool:
    """Whether ``path`` holds a safetensors file, by content: an 8-byte little-endian header length that fits in
    the file (at least ``{}``), followed by the JSON header's ``{``. A pickle renamed .safetensors is not one, nor
    is a file cut short inside its header."""
    p = Path(path)
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8


def file_kind(path: Path) -> str:
    """"safetensors" or "pickle" (torch.save's zip or legacy format) for a weights file; anything else raises
    :class:`CheckpointError` saying what the file is."""
    with path.open("rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path}: the file is empty")
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format: a zip holding <name>/data.pkl
        if _is_torch_zip(path):
            return "pickle"
        raise CheckpointError(f"{path}: a zip archive, not a checkpoint (no data.pkl inside). Unpack it first.")
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # pickle protocol 2-5: legacy torch.save
        return "pickle"
    if is_safetensors(path):
        return "safetensors"
    if head[8:9] == b"{":  # a safetensors start whose header does not fit: say so, not "unrecognised content"
        _check_header_length(path, int.from_bytes(head[:8], "little"), path.stat().st_size)
    what = next((name for magic, name in _MAGIC if head.startswith(magic)), f"unrecognised content {head[:8]!r}")
    raise CheckpointError(
        f"{path}: not a checkpoint ({what}). Expected a .safetensors file, a diffusers folder, or a .ckpt pickle.")


def _is_torch_zip(p: Path) -> bool:
    try:
        with zipfile.ZipFile(p) as z:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{p}: a corrupt or truncated zip/torch file ({e})") from e


def _check_header_length(p: Path, n: int, size: int) -> None:
    if n > size - 8:
        raise CheckpointError(
            f"{p}: corrupt or truncated safetensors file: the header length field says {n} bytes but only "
            f"{size - 8} follow it. Download the file again.")
    if n > _MAX_HEADER_BYTES:
        raise CheckpointError(f"{p}: corrupt safetensors file: a {n}-byte header exceeds the 100 MB limit")


def read_header(path: Path | str) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a safetensors file, read from its header without loading any tensor.

    The header is validated against the file size, so a truncated download or a corrupt file is reported here,
    with the reason, rather than as a crash deep inside a loader.
    """
    return {name: entry.shape for name, entry in _read_entries(Path(path))[1].items()}


@dataclass(frozen=True)
class _Entry:
    dtype: str  # the safetensors name ("F32", "BF16"...)
    shape: tuple[int, ...]
    begin: int  # offsets in the data section
    end: int


def _read_entries(p: Path) -> tuple[int, dict[str, _Entry]]:
    """Where the data section starts, and each tensor's entry, from a header checked against the file size."""
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{p}: only {size} bytes, too short for a safetensors file")
        n = int.from_bytes(head, "little")
        _check_header_length(p, n, size)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: corrupt safetensors file: the header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: corrupt safetensors file: the header is not a JSON object")
    data_size = size - 8 - n
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{p}: corrupt safetensors header: bad entry for tensor {name!r}") from e
        item = _SAFETENSORS_DTYPE_SIZES.get(dtype)
        if not 0 <= begin <= end or (item is not None and end - begin != math.prod(shape) * item):
            raise CheckpointError(
                f"{p}: corrupt safetensors header: tensor {name!r} ({dtype} {list(shape)}) has data offsets "
                f"[{begin}, {end}] that do not match its size")
        if end > data_size:
            raise CheckpointError(
                f"{p}: truncated safetensors file: tensor {name!r} needs bytes up to {end} of the data section but "
                f"the file holds only {data_size}. The download is probably incomplete; fetch the file again.")
        entries[name] = _Entry(dtype, shape, begin, end)
    return 8 + n, entries


_SPLIT_BYTES = 8 << 20  # larger tensors are read in two halves at once: first touches of fresh memory dominate
_READERS: list = []


def _read_into(fd: int, view: memoryview, offset: int, path: Path, key: str) -> None:
    def part(start: int, stop: int) -> None:
        while start < stop:
            got = os.preadv(fd, [view[start:stop]], offset + start)
            if not got:
                raise CheckpointError(f"{path}: the file ended inside tensor {key!r}")
            start += got

    if len(view) < _SPLIT_BYTES or (os.cpu_count() or 1) < 2:
        part(0, len(view))
        return
    if not _READERS:
        from concurrent.futures import ThreadPoolExecutor

        _READERS.append(ThreadPoolExecutor(1, thread_name_prefix="safetensors-read"))
    half = (len(view) // 2) & ~4095
    other = _READERS[0].submit(part, half, len(view))
    part(0, half)
    other.result()


_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


#: The kernel sizes whose convolutions keep oneDNN's blocked weights in the CPU's fast layout (fastpaths.pack).
PACKED_KERNELS = ((3, 3), (1, 1))


class StreamedSafetensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file, each read from the file only when asked for, into memory of its own
    (plain reads, no memory map), floating-point ones cast to ``dtype`` (None keeps the file's), and with
    ``channels_last`` convolution kernels (4-D, more than one input channel) laid out channels_last as they are
    read, so that no second copy is made to change their layout afterwards.

    A loader that takes each tensor once and drops what it does not keep holds at most its model's weights in
    their final dtype plus the one tensor being read: never the file's copy beside the model's. Memory-mapped
    reading of a whole file (safetensors' ``load_file`` / ``safe_open``) counts every page read in the process's RSS
    until the map is closed, so reading a whole model through one map peaks at the file's size plus the model's.

    Maps of single tensors instead, each unmapped when its tensor is gone:

    * ``maps`` (a :class:`nodegraph.filemaps.Guard`, or :class:`~nodegraph.filemaps.Unguarded`): every tensor used
      as stored (no cast, no new layout) is a view of a private map of its own bytes in the file (see
      ``--map-weights``); the others are read as above.
    * ``plain_kernels``: kernels that will be packed (:data:`PACKED_KERNELS`) stored in the requested dtype are
      views of such maps, for a caller that packs them
      at once (``fastpaths.pack(..., now=True)``), which replaces each: its map then goes.

    A tensor in a map sits at the same offset within its page as safetensors' own map of the whole file puts it
    (CPU kernels' results can depend on that alignment at the 1e-7 level). Asking twice for a key reads it twice:
    take each once.

    ``device`` (default the CPU): where the tensors are made. Each is read into the reused host buffer and copied
    straight to the device, so a model loaded onto a GPU never exists whole in host memory (maps are CPU-only).
    """

    def __init__(self, path: Path | str, dtype: torch.dtype | None = None, channels_last: bool = False,
                 plain_kernels: bool = False, maps=None, device: torch.device | str | None = None):
        self.path = Path(path)
        self.dtype = dtype
        self.channels_last = channels_last
        self.device = torch.device(device if device is not None else "cpu")
        self.plain_kernels = plain_kernels  # as stored, for the caller to pack (fastpaths.pack)
        self._start, self._entries = _read_entries(self.path)
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self.maps = maps if self.device.type == "cpu" else None
        self._plain_maps = None

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        torch_dtype = _TORCH_DTYPES.get(entry.dtype)
        if torch_dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} has the unsupported dtype {entry.dtype}")
        nbytes = entry.end - entry.begin
        cast = self.dtype is not None and torch_dtype.is_floating_point and torch_dtype != self.dtype
        relayout = (self.channels_last and torch_dtype.is_floating_point and len(entry.shape) == 4
                    and entry.shape[1] > 1 and not (self.plain_kernels and entry.shape[2:] in PACKED_KERNELS))
        maps = self.maps
        if maps is None and self.plain_kernels and not cast and len(entry.shape) == 4 \
                and entry.shape[2:] in PACKED_KERNELS and torch_dtype.is_floating_point and self.device.type == "cpu":
            # to be packed as soon as the model is built (fastpaths.pack(now=True)): not copied into memory that
            # packing would replace at once
            maps = self._plain_maps = self._plain_maps or filemaps.Unguarded(self.path)
        if maps is not None and not cast and not relayout and nbytes:
            view = maps.map(self._start + entry.begin, nbytes)
            if view is not None:  # None: its guard was broken (the file is being written); read it below
                return torch.frombuffer(view, dtype=torch.uint8).view(torch_dtype).reshape(entry.shape)
        # Every tensor is read into one reused buffer, then copied into memory of its own in its final dtype and
        # layout: no file-layout copy is allocated, and the kernel's read never lands in fresh pages (on a VM,
        # reading 4 GB straight into new memory took 25 s against 1 s into touched memory plus a 2 s copy).
        if self._scratch.numel() < nbytes:
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        raw = self._scratch[:nbytes]
        with self.path.open("rb", buffering=0) as f:
            _read_into(f.fileno(), memoryview(raw.numpy()), self._start + entry.begin, self.path, key)
        tensor = raw.view(torch_dtype).reshape(entry.shape)
        layout = torch.channels_last if relayout else torch.contiguous_format
        return torch.empty(entry.shape, dtype=self.dtype if cast else torch_dtype, memory_format=layout,
                           device=self.device).copy_(tensor)

    def file_dtype(self) -> torch.dtype | None:
        """The dtype of the file's first floating-point tensor (None if it has none)."""
        return next((d for d in (_TORCH_DTYPES.get(e.dtype) for e in self._entries.values())
                     if d is not None and d.is_floating_point), None)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, memory-mapped (see ``ready`` for why they are copied afterwards)."""
    from safetensors.torch import load_file

    _read_entries(Path(path))  # a truncated or lying header is reported as such, naming the tensor, before reading
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read the safetensors data: {first_line(e)}") from e


def release_mapped(tensor: torch.Tensor) -> int:
    """Take out of this process's resident memory the pages of a memory-mapped weights file that lie wholly inside
    ``tensor``, once the caller has replaced it by a copy in another layout (a packed or channels_last kernel).

    Pages of a file map that were read stay counted in the process's RSS while the map is open, so a mapped
    model whose kernels are re-laid out would otherwise hold both forms. Only pages of a private map of a file,
    and only if none of them was ever written (a written page holds data the file does not): a view that still
    reads them gets the file's same bytes again from the page cache. Returns the bytes released (0 elsewhere, and
    off Linux)."""
    if tensor.device.type != "cpu" or tensor.layout != torch.strided or not sys.platform.startswith("linux"):
        return 0
    if not (tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last)):
        return 0
    with filemaps.LOCK:  # a guard answering a write must not copy these pages between the check and the discard
        return _release_mapped(tensor)


def _release_mapped(tensor: torch.Tensor) -> int:
    page = mmap.PAGESIZE
    begin, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    start, end = -(-begin // page) * page, (begin + nbytes) // page * page
    if end <= start or not _in_private_file_map(start, end):
        return 0
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start // page * 8)
            entries = torch.frombuffer(bytearray(f.read((end - start) // page * 8)), dtype=torch.int64)
    except OSError:
        return 0
    # bit 63: present; bit 61: a file page (or shared). Present and not a file page: written, copied on write.
    if bool(((entries < 0) & (entries & (1 << 61) == 0)).any()):
        return 0
    return heap.discard(begin, nbytes)


def _in_private_file_map(start: int, end: int) -> bool:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                low, high = (int(a, 16) for a in fields[0].split("-"))
                if low <= start < high:
                    return (end <= high and fields[1].endswith("p") and fields[4] != "0"
                            and len(fields) == 6 and fields[5].startswith("/"))
    except (OSError, ValueError, IndexError):
        pass
    return False


def read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of a torch pickle, flattened; refused unless ``allow_pickle``, and even then only tensors."""
    if not allow_pickle:
        raise CheckpointError(
            f"{path}: a pickle checkpoint (.ckpt/.pt), which can run arbitrary code when loaded, so it is refused. "
            f"Use a .safetensors version of the model, or allow pickles explicitly (--allow-pickle) if you trust "
            f"the file.")
    try:
        with path.open("rb") as f:  # a file object: torch.load would pick its reader from a path's extension
            data = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{path}: cannot read the pickle with weights_only=True ({first_line(e)}). It may hold objects other "
            f"than tensors, or be corrupt; a .safetensors version of the model avoids the problem.") from e
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):  # Lightning checkpoints wrap the weights
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(data).__name__}, not a dictionary of weights")
    return _flat_tensors(data)


def _flat_tensors(data: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a (possibly nested) dictionary, nested keys joined with dots (IP-Adapter .bin files keep
    {"image_proj": {...}, "ip_adapter": {...}})."""
    out: dict[str, torch.Tensor] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + key] = value
        elif isinstance(value, Mapping):
            out.update(_flat_tensors(value, f"{prefix}{key}."))
    return out


def read_weights(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a single weights file, recognised by content: safetensors, or a pickle only when pickles are
    allowed (then with ``weights_only=True``)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {'no such file' if not path.exists() else 'a folder, not a weights file'}")
    if file_kind(path) == "pickle":  # file_kind raises, saying what the file is, when it holds no weights
        return read_pickle(path, allow_pickle)
    return read_safetensors(path)
