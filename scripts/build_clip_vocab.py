#!/usr/bin/env python
"""Build the CLIP BPE tokenizer shipped in ``nodes/data/clip_tokenizer/``.

Source and licence
------------------
The merge table is OpenAI CLIP's byte-level BPE, ``bpe_simple_vocab_16e6.txt.gz``, released by
OpenAI under the MIT licence (https://github.com/openai/CLIP). It is redistributed, byte-identical,
inside the MIT-licensed PyPI wheels ``open-clip-torch`` (``open_clip/bpe_simple_vocab_16e6.txt.gz``)
and ``clip-anytorch`` (``clip/bpe_simple_vocab_16e6.txt.gz``). The generated files are derived
data from that table and carry the same MIT licence.

What it writes
--------------
``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``, the
layout of the ``tokenizer/`` folder of Stable Diffusion 1.x (``model_max_length`` 77, pad token
``<|endoftext|>``). ``transformers.CLIPTokenizer.from_pretrained(out_dir)`` then has 49,408
tokens and encodes ``"a photo of a cat"`` as ``[49406, 320, 1125, 539, 320, 2368, 49407]``.
As in OpenAI's ``SimpleTokenizer``, only the first 48,894 merges of the table are used:
ids 0-255 are the byte symbols of the byte-to-unicode table, 256-511 the same with ``</w>``, then
one token per merge (its two halves joined), then ``<|startoftext|>`` and ``<|endoftext|>``
(49,408 tokens). Output is deterministic (no timestamps). Standard library only.

Usage
-----
::

    pip download --no-deps -d /tmp/oc open-clip-torch
    python scripts/build_clip_vocab.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl
    python scripts/build_clip_vocab.py bpe_simple_vocab_16e6.txt.gz --merges 1000 --out /tmp/tiny_tok

``--merges N`` keeps only the first N merges (vocab size 514 + N), still a valid BPE whose ids
agree with the full tokenizer below 512 + N; useful for tiny test tokenizers.
``nodes.tokenizers.write_clip_tokenizer_subset`` writes byte-identical files from the shipped
tokenizer, without the table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

TABLE_NAME = "bpe_simple_vocab_16e6.txt.gz"
#: Merges CLIP actually uses: 49152 - 256 - 2 (see OpenAI's SimpleTokenizer).
CLIP_NUM_MERGES = 48894
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "nodes" / "data" / "clip_tokenizer"

Merge = tuple[str, str]


def read_bpe_table(source: Path) -> bytes:
    """The gzip-compressed BPE table, from the ``.txt.gz`` itself or from a wheel/zip containing it."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            members = sorted(n for n in wheel.namelist() if n.endswith("/" + TABLE_NAME) or n == TABLE_NAME)
            if not members:
                raise FileNotFoundError(f"{source} contains no {TABLE_NAME}")
            return wheel.read(members[0])
    return source.read_bytes()


def parse_merges(lines: Iterable[str]) -> list[Merge]:
    """Parse ``"a b"`` merge lines."""
    merges = []
    for line in lines:
        first, sep, second = line.partition(" ")
        if not sep or not first or not second or " " in second:
            raise ValueError(f"malformed merge line: {line!r}")
        merges.append((first, second))
    return merges


def clip_merges(source: Path) -> list[Merge]:
    """The 48,894 merges CLIP uses, in order.

    Line 0 of the table is a header (``...#version: 0.2``); the file holds more merges than CLIP
    uses, and OpenAI's tokenizer keeps only the first ``CLIP_NUM_MERGES`` of them.
    """
    lines = gzip.decompress(read_bpe_table(source)).decode("utf-8").split("\n")
    merges = parse_merges(lines[1 : 1 + CLIP_NUM_MERGES])
    if len(merges) != CLIP_NUM_MERGES:
        raise ValueError(f"expected {CLIP_NUM_MERGES} merges, found {len(merges)}")
    return merges


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for raw bytes, in CLIP/GPT-2 vocabulary order.

    Bytes that are printable, non-space Latin-1 characters stand for themselves and come first (in
    byte order); the remaining 68 bytes get the code points 256, 257, ... in byte order.
    """
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def clip_vocab(merges: Sequence[Merge]) -> dict[str, int]:
    """Token -> id: 256 byte symbols, the same with ``</w>``, one token per merge, then BOS and EOS.

    Keeping only the first N merges therefore gives a valid BPE (vocab 514 + N) whose ids agree
    with the full tokenizer below 512 + N.
    """
    symbols = byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the merge list produces duplicate tokens; not a CLIP BPE table")
    return vocab


def _dump_json(path: Path, data: object, *, indent: int = 2, sort_keys: bool = True) -> None:
    # One entry per line, stable key order and a trailing newline: byte-stable, diff-friendly files.
    text = json.dumps(data, indent=indent, ensure_ascii=False, sort_keys=sort_keys)
    path.write_text(text + "\n", encoding="utf-8")


def write_clip_tokenizer(out_dir: Path, merges: Sequence[Merge]) -> Path:
    """Write the four tokenizer files of an SD-1.x ``tokenizer/`` folder for these merges."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _dump_json(out_dir / "vocab.json", clip_vocab(merges), indent=0, sort_keys=False)  # id order
    (out_dir / "merges.txt").write_text(
        "\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in merges]) + "\n", encoding="utf-8"
    )
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    _dump_json(out_dir / "special_tokens_map.json", special)
    config = {
        **special,
        "add_prefix_space": False,
        # transformers 5 warns that this clean-up corrupts BPE output; CLIP never wants it.
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    _dump_json(out_dir / "tokenizer_config.json", config)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help=f"{TABLE_NAME} or a wheel containing it (open-clip-torch)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--merges", type=int, default=None, metavar="N", help="keep only the first N merges")
    args = parser.parse_args(argv)

    merges = clip_merges(args.source)
    if args.merges is not None:
        if not 0 <= args.merges <= len(merges):
            parser.error(f"--merges must be between 0 and {len(merges)}")
        merges = merges[: args.merges]
    out = write_clip_tokenizer(args.out, merges)
    print(f"wrote {out} ({len(merges) + 514} tokens, {len(merges)} merges)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
