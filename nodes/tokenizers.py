"""CLIP tokenizer files: the shipped vocabulary (``nodes/data/clip_tokenizer``) and prefixes of it.

Used by the checkpoint loader (single files carry no tokenizer: one is assembled from the shipped files, cut to the
text encoder's vocabulary size) and by the tiny test models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SHIPPED_CLIP_TOKENIZER = Path(__file__).resolve().parent / "data" / "clip_tokenizer"
#: Merges kept in the tiny test tokenizer: vocab 1,514, so the text embedding stays small (48k weights)
#: while common English prompt words still map to one or two tokens.
TINY_TOKENIZER_MERGES = 1000


def write_clip_tokenizer_subset(
    out_dir: Path | str, merges: int = TINY_TOKENIZER_MERGES, source: Path | str = SHIPPED_CLIP_TOKENIZER
) -> Path:
    """Write a CLIP tokenizer folder that keeps only the first ``merges`` merges of ``source``.

    CLIP vocabularies list the 512 byte symbols, then one token per merge in merge order, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (see ``scripts/build_clip_vocab.py``). A prefix of
    the merges is therefore still a valid BPE: keep ids below 512 + N and renumber the two
    special tokens to follow them. Same output as ``build_clip_vocab.py --merges N``.
    """
    source, out = Path(source), Path(out_dir)
    header, *all_merges = (source / "merges.txt").read_text(encoding="utf-8").splitlines()
    if not 0 <= merges <= len(all_merges):
        raise ValueError(f"merges must be between 0 and {len(all_merges)}, got {merges}")
    vocab = json.loads((source / "vocab.json").read_text(encoding="utf-8"))
    by_id = sorted(vocab, key=vocab.__getitem__)
    keep = 512 + merges
    tokens = by_id[:keep] + by_id[-2:]  # the special tokens are the last two ids

    out.mkdir(parents=True, exist_ok=True)
    vocab_text = json.dumps({t: i for i, t in enumerate(tokens)}, indent=0, ensure_ascii=False)
    (out / "vocab.json").write_text(vocab_text + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("\n".join([header, *all_merges[:merges]]) + "\n", encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(source / name, out / name)
    return out
