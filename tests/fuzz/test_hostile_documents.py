"""Hostile workflow files the generators do not make: PNGs whose text chunks inflate without end, and the limits
named in the refusals."""

from __future__ import annotations

import struct
import zlib

import pytest

import nodegraph as ng
from nodegraph.workflow import PNG_KEY, PNG_SIGNATURE, WorkflowError, png_text


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(kind + body))


def png(*chunks: bytes) -> bytes:
    return PNG_SIGNATURE + b"".join(chunks) + chunk(b"IEND", b"")


def test_a_png_text_chunk_that_inflates_past_the_document_limit_is_skipped():
    bomb = zlib.compress(b" " * (ng.Limits().max_bytes + 1024), 9)  # ~32 KB that inflate to over 32 MB
    data = png(chunk(b"zTXt", PNG_KEY.encode() + b"\0\0" + bomb),
               chunk(b"iTXt", b"other\0\x01\0\0\0" + bomb))
    assert len(data) < 100_000
    assert png_text(data) == {}


def test_a_png_without_a_readable_workflow_is_refused_by_name(tmp_path):
    path = tmp_path / "bomb.png"
    bomb = zlib.compress(b"{" * (ng.Limits().max_bytes + 1), 9)
    path.write_bytes(png(chunk(b"zTXt", PNG_KEY.encode() + b"\0\0" + bomb)))
    with pytest.raises(WorkflowError, match="bomb.png is a PNG without"):
        ng.load(path)


@pytest.mark.parametrize("text, limit", [("[" * 100_000, "nested deeper than 64 levels"),
                                         ("[NaN]", "NaN is not a JSON number"),
                                         ("[1e400]", "too large for a float"),
                                         ("[" + "7" * 5000 + "]", "too many digits")])
def test_refusals_name_what_was_wrong(text, limit):
    with pytest.raises(WorkflowError, match=limit):
        ng.workflow.loads(text)


@pytest.mark.parametrize("node_id", ["", "a\nb", "x" * 300, "\u202e1"])
def test_node_ids_are_printable_text_of_bounded_length(node_id):
    doc = {"format": "nodegraph/workflow", "version": 1, "nodes": {node_id: {"type": "Integer"}}}
    with pytest.raises(WorkflowError, match="node id"):
        ng.workflow.from_json(doc)


@pytest.mark.parametrize("value, code", [(10**400, "out_of_range"), (-(10**4000), "out_of_range")])
def test_integers_json_allows_but_no_float_holds_are_out_of_range(value, code):
    text = '{"format": "nodegraph/workflow", "version": 1, "nodes": {"1": {"type": "Number", "inputs": {"value": ' \
        + str(value) + '}}, "2": {"type": "Integer", "inputs": {"value": ' + str(value) + '}}}, "outputs": ["1"]}'
    with pytest.raises(ng.ValidationFailed) as failed:
        ng.compile_workflow(ng.workflow.loads(text), ng.build_registry())
    assert {(e.node_id, e.input, e.code) for e in failed.value.errors} == {("1", "value", code), ("2", "value", code)}
