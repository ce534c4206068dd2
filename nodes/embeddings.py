"""Textual inversion: learned token embeddings from the models folder's embeddings/, used by name in a prompt.

A prompt names an embedding as ``<name>`` or ``embedding:name`` (``name`` is the file name without its
extension, subfolders with "/"). Like diffusers' ``load_textual_inversion``, an embedding of n vectors stands for n
new tokens placed where the name was; the text around it is tokenised as usual. The shared tokenizer and text
encoder are never changed: the new tokens get ids past the vocabulary, and the encoder's token lookup is wrapped
for the duration of one encoding so that those ids read the embedding's vectors.

File layouts: A1111 (``emb_params`` in safetensors, ``string_to_param`` in a .pt pickle: only with
``--allow-pickle``, and then with ``weights_only=True``), and diffusers' (one tensor keyed by its token).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from nodegraph import Folder, Settings, file_identity

from .loading import is_safetensors
from .loading.weights import read_safetensors

SUFFIXES = (".safetensors", ".pt", ".bin")
EMBEDDINGS = Folder("embeddings", what="textual-inversion embeddings", suffixes=SUFFIXES, flag="--models")
_MENTION = re.compile(r"embedding:([\w.\-/]+)|<([\w.\-/]+)>")


@dataclass(frozen=True)
class Vocabulary:
    """The embeddings a prompt may name (name -> file), and whether pickled ones may be read."""

    files: dict[str, Path] = field(default_factory=dict)
    allow_pickle: bool = False

    @classmethod
    def for_prompt(cls, settings: Settings, text: str) -> "Vocabulary":
        """The embeddings folder's files, read only when the text could name one."""
        if "embedding:" not in text and "<" not in text:
            return cls(allow_pickle=settings.allow_pickle)
        files = {name.rsplit(".", 1)[0]: EMBEDDINGS.path(settings, name) for name in EMBEDDINGS.names(settings)}
        return cls(files, settings.allow_pickle)


def mentions(text: str, names: Mapping[str, object]) -> list[tuple[int, int, str]]:
    """(start, end, name) of each embedding the text names, in order."""
    found = []
    for match in _MENTION.finditer(text):
        name = match.group(1) or match.group(2)
        if name in names:
            found.append((match.start(), match.end(), name))
    return found


class PromptIdentity:
    """What identifies a prompt's result for the cache: the text and the files of the embeddings it names (a
    String's ``identity_of``; ``folder`` lists the embeddings folder among the library's model folders)."""

    folder = EMBEDDINGS

    def __call__(self, text: str, settings: Settings):
        vocabulary = Vocabulary.for_prompt(settings, text)
        used = sorted({name for _, _, name in mentions(text, vocabulary.files)})
        return text if not used else (text, [file_identity(vocabulary.files[n]) for n in used])


prompt_identity = PromptIdentity()


def load_vectors(name: str, path: Path, width: int, encoder_key: str | None = None,
                 allow_pickle: bool = False) -> torch.Tensor:
    """The [n, width] vectors of embedding ``name``; a clear error for another text encoder's embedding.
    ``encoder_key`` picks one text encoder's vectors from an SDXL embedding ("clip_l" or "clip_g")."""
    if is_safetensors(path):  # by content: a pickle renamed .safetensors is still a pickle
        data = read_safetensors(path)
    else:
        if not allow_pickle:
            raise ValueError(f"embedding {name!r} is a pickle ({path.name}); convert it to .safetensors, or run "
                             f"nodegraph with --allow-pickle to load it (with weights_only=True)")
        data = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:  # A1111 .pt
        data = data["string_to_param"]
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if encoder_key is not None:
        if encoder_key not in data:
            raise ValueError(f"embedding {name!r} has no {encoder_key!r} vectors: it is not an SDXL embedding "
                             f"(its tensors: {', '.join(sorted(data)[:6])})")
        tensors = [data[encoder_key]]
    elif "emb_params" in data:
        tensors = [data["emb_params"]]
    if len(tensors) != 1:
        keys = ", ".join(sorted(data)[:6])
        raise ValueError(f"embedding {name!r} holds {len(tensors)} tensors ({keys}); expected one "
                         f"(an SDXL embedding has one per text encoder, which this model doesn't have)")
    vectors = tensors[0].reshape(-1, tensors[0].shape[-1])
    if vectors.shape[-1] != width:
        raise ValueError(f"embedding {name!r} has vectors of width {vectors.shape[-1]}, but this text encoder's "
                         f"tokens have width {width}: it was made for another model family")
    return vectors


def token_ids(tokenizer, text: str, width: int, vocabulary: Vocabulary,
              encoder_key: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Input ids [1, 77] for ``text`` with embeddings expanded to placeholder ids past the vocabulary, and the
    vectors those ids stand for (None when the text names no embedding)."""
    names = vocabulary.files
    found = mentions(text, names)
    if not found:
        return None, None
    vocab = len(tokenizer)
    ids: list[int] = []
    vectors: list[torch.Tensor] = []
    cursor = 0
    for start, end, name in found:
        ids += tokenizer(text[cursor:start], add_special_tokens=False).input_ids
        v = load_vectors(name, names[name], width, encoder_key, vocabulary.allow_pickle)
        ids += list(range(vocab + sum(len(x) for x in vectors), vocab + sum(len(x) for x in vectors) + len(v)))
        vectors.append(v)
        cursor = end
    ids += tokenizer(text[cursor:], add_special_tokens=False).input_ids
    limit = tokenizer.model_max_length
    ids = [tokenizer.bos_token_id, *ids[: limit - 2], tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (limit - len(ids))
    return torch.tensor([ids]), torch.cat(vectors)


class _ExtendedLookup(torch.nn.Module):
    """The token embedding, plus rows past the vocabulary read from ``extra``."""

    def __init__(self, table: torch.nn.Embedding, extra: torch.Tensor):
        super().__init__()
        self.table = table
        self.extra = extra.to(table.weight.device, table.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.table.num_embeddings
        out = self.table(ids.clamp(max=vocab - 1))
        past = ids >= vocab
        if past.any():
            out = out.clone()
            out[past] = self.extra[ids[past] - vocab]
        return out


@contextlib.contextmanager
def extended_vocabulary(encoder, extra: torch.Tensor | None):
    """The encoder reading ``extra`` for ids past its vocabulary, for one encoding; restored afterwards."""
    if extra is None:
        yield
        return
    core = getattr(encoder, "text_model", encoder)
    table = core.embeddings.token_embedding
    core.embeddings.token_embedding = _ExtendedLookup(table, extra)
    try:
        yield
    finally:
        core.embeddings.token_embedding = table
