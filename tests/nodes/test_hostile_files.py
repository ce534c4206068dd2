"""Hostile files, through the real nodes and the server's file routes: corrupt, truncated and lying weight files,
pickles, weights of no known family, decompression bombs and images declaring huge sizes, a disk that fills while
saving, symlinks out of every folder, and encoded or Unicode look-alike traversal in ``/view``, ``/upload`` and
file-name inputs. Each is refused with an error that names the node, the file and the reason, and nothing outside the configured
folders is read or written."""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import nodegraph as ng
from nodegraph.folders import FILE_FOLDERS, folders_of
from nodegraph.paths import UnsafePath

SECRET = b"TOP-SECRET-CONTENT"


@pytest.fixture
def settings(tmp_path):
    """Folders of the test's own (no tiny models: these files are broken on purpose)."""
    root = tmp_path / "root"
    for name in ("models", "input", "output", "temp"):
        (root / name).mkdir(parents=True)
    return ng.Settings(dtype="float32", device="cpu", memory_format="contiguous", models_dir=root / "models",
                       input_dir=root / "input", output_dir=root / "output", temp_dir=root / "temp")


@pytest.fixture
def executor(settings):
    return ng.Executor(ng.build_registry(), settings=settings)


def failure(executor, wf: ng.Workflow, node: str = "1") -> str:
    """The error message of ``node``, which must have failed."""
    result = executor.run(wf)
    record = result.nodes[node]
    assert result.status == "failed" and record.status == "failed", result.summary()
    return record.error["message"]


# --- weight files ----------------------------------------------------------------------------------------------------

def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def hostile_weights(folder: Path) -> dict[str, str]:
    """Write broken weight files into ``folder``: file name -> what its error must say."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"not.a.known.layer": torch.zeros(64)}, folder / "unknown.safetensors")
    whole = (folder / "unknown.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(whole[:-10])  # a download cut short
    (folder / "lying.safetensors").write_bytes(safetensors_bytes(  # offsets far past the end of the file
        {"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 1 << 40]}}, b"\0" * 256))
    (folder / "long-header.safetensors").write_bytes(struct.pack("<Q", 1 << 50) + b"{}")
    torch.save({"w": torch.zeros(3)}, folder / "pickle.ckpt")
    (folder / "image.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return {"cut.safetensors": "truncated safetensors file", "lying.safetensors": "corrupt safetensors header",
            "long-header.safetensors": "header length field says", "pickle.ckpt": "--allow-pickle",
            "image.safetensors": "(a PNG image)", "unknown.safetensors": "not"}


LOADERS = {"LoadCheckpoint": "ckpt", "LoadControlNet": "control_net", "LoadMotionModule": "motion_module",
           "LoadVAE": "vae"}
UNKNOWN = {"LoadCheckpoint": "looks like an unknown model", "LoadControlNet": "not a ControlNet",
           "LoadMotionModule": "not an AnimateDiff motion module", "LoadVAE": "not an original-layout VAE"}


@pytest.mark.parametrize("node_type", LOADERS)
def test_every_loader_refuses_corrupt_truncated_pickled_and_unknown_weights_naming_the_file(executor, settings,
                                                                                            node_type):
    spec = executor.registry.get(node_type).inputs[LOADERS[node_type]]
    folder = getattr(spec.options, "folder", spec.options)
    expected = {**hostile_weights(folder.root(settings)), "unknown.safetensors": UNKNOWN[node_type]}
    for name, reason in expected.items():
        wf = ng.Workflow()
        wf.add(1, node_type, **{LOADERS[node_type]: name})
        wf.outputs = ["1"]
        message = failure(executor, wf)
        assert name in message and reason in message, (name, message)


def test_the_ip_adapter_loader_refuses_broken_adapter_files_naming_them(executor, settings):
    expected = {**hostile_weights(settings.models_dir / "ipadapter"), "unknown.safetensors": "not an IP-Adapter file"}
    (settings.models_dir / "clip_vision").mkdir()
    save_file({"w": torch.zeros(2)}, settings.models_dir / "clip_vision" / "encoder.safetensors")
    for name, reason in expected.items():
        wf = ng.Workflow()
        wf.add(1, "LoadIPAdapter", ip_adapter=name, image_encoder="encoder.safetensors")
        wf.outputs = ["1"]
        message = failure(executor, wf)
        assert name in message and reason in message, (name, message)


def test_a_pickle_checkpoint_is_refused_by_default_and_never_unpickled(executor, settings, tmp_path):
    folder = settings.models_dir / "checkpoints"
    folder.mkdir()
    marker = tmp_path / "pwned"

    class Payload:  # what a malicious pickle does when it is loaded: run code
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Payload()}, folder / "evil.ckpt")
    wf = ng.Workflow()
    wf.add(1, "LoadCheckpoint", ckpt="evil.ckpt")
    wf.outputs = ["1"]
    assert "refused" in failure(executor, wf) and not marker.exists()
    executor.settings = executor.settings.replace(allow_pickle=True)  # even allowed, only tensors are read
    assert "weights_only" in failure(executor, wf) and not marker.exists()


def test_the_shared_weights_reader_reports_truncation_itself(tmp_path):
    from nodes.loading import CheckpointError, read_weights

    expected = hostile_weights(tmp_path)
    for name in ("cut.safetensors", "lying.safetensors", "long-header.safetensors"):
        with pytest.raises(CheckpointError, match=expected[name]) as info:
            read_weights(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


def _lora(path):
    from nodes.lora import read_lora_file
    return read_lora_file(path)


def _embedding(path):
    from nodes.embeddings import load_vectors
    return load_vectors("style", path, 32)


def _taesd(path):
    from nodes.image_ops import _read_weights
    return _read_weights(path, False)


@pytest.mark.parametrize("reader", [_lora, _embedding, _taesd])
def test_the_other_readers_name_the_file_of_a_truncated_safetensors(tmp_path, reader):
    hostile_weights(tmp_path)
    with pytest.raises(Exception) as info:
        reader(tmp_path / "cut.safetensors")
    assert "cut.safetensors" in str(info.value) and "truncated" in str(info.value)


# --- images in -------------------------------------------------------------------------------------------------------

def png_declaring(width: int, height: int) -> bytes:
    """A one-pixel PNG whose header declares ``width`` x ``height``: tiny on disk, huge once decoded."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # its CRC, so the header reads as valid
    return bytes(data)


def png_bytes(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def load_image(name: str) -> ng.Workflow:
    wf = ng.Workflow()
    wf.add(1, "LoadImage", image=name)
    wf.outputs = ["1"]
    return wf


@pytest.mark.parametrize("name, content, reason", [
    ("bomb.png", png_declaring(20_000, 20_000), "decompression bomb"),
    ("huge.png", png_declaring(5000, 5000), "5000x5000 pixels, over the size limit of 4096"),
    ("wide.png", png_declaring(100_000, 1), "100000x1 pixels, over the size limit"),
    ("cut.png", png_bytes()[:40], "not a readable image"),
    ("text.png", b"this is not an image at all", "not a readable image"),
])
def test_load_image_refuses_bombs_huge_sizes_and_broken_files_before_decoding(executor, settings, name, content,
                                                                             reason):
    (settings.input_dir / name).write_bytes(content)
    message = failure(executor, load_image(name))
    assert repr(name) in message and reason in message, message


def test_the_size_limit_of_load_image_is_the_settings(executor, settings):
    (settings.input_dir / "small.png").write_bytes(png_bytes((65, 8)))
    assert executor.run(load_image("small.png")).status == "success"
    executor.settings = executor.settings.replace(max_image_size=64)
    assert "65x8 pixels, over the size limit of 64" in failure(executor, load_image("small.png"))


# --- images out: a full disk -----------------------------------------------------------------------------------------

def full_disk(monkeypatch, after: int = 100) -> None:
    """Every file Pillow saves gets ``after`` bytes written, then the disk is full."""
    def save(self, fp, format=None, **params):
        with open(fp, "wb") as f:
            f.write(b"\0" * after)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", save)


@pytest.mark.parametrize("saver, inputs, suffix", [
    ("SaveImage", {"filename_prefix": "cat"}, ".png"),
    ("PreviewImage", {}, ".png"),
    ("SaveAnimation", {"filename_prefix": "cat", "format": "gif"}, ".gif"),
])
def test_a_full_disk_while_saving_names_the_file_and_leaves_no_partial_file(executor, settings, monkeypatch, saver,
                                                                            inputs, suffix):
    (settings.input_dir / "picture.png").write_bytes(png_bytes())
    wf = ng.Workflow()
    wf.add(1, "LoadImage", image="picture.png")
    wf.add(2, saver, images=ng.Link("1", "image"), **inputs)
    full_disk(monkeypatch)
    message = failure(executor, wf, "2")
    assert "No space left on device" in message and f"_00001{suffix}" in message, message
    for folder in (settings.output_dir, settings.temp_dir):
        assert not [p for p in folder.rglob("*") if p.is_file()], list(folder.rglob("*"))
    monkeypatch.undo()
    result = executor.run(wf)  # with room again, the same file is written whole
    assert result.status == "success"
    written = [p for f in (settings.output_dir, settings.temp_dir) for p in f.rglob(f"*{suffix}")]
    assert len(written) == 1 and written[0].name.endswith(f"_00001{suffix}")


# --- symlinks out of every folder ------------------------------------------------------------------------------------

def every_folder(registry) -> dict:
    return {**folders_of(registry), **FILE_FOLDERS}


def test_symlinks_out_of_every_folder_are_neither_listed_nor_read(settings, tmp_path):
    outside = tmp_path / "outside"
    (outside / "model").mkdir(parents=True)
    (outside / "secret.safetensors").write_bytes(SECRET)
    (outside / "model" / "config.json").write_text("{}")  # looks like a diffusers folder to the folders that list those
    folders = every_folder(ng.build_registry())
    assert {"checkpoints", "loras", "controlnet", "vae", "vae_approx", "embeddings", "input", "output",
            "temp"} <= set(folders)
    for name, folder in folders.items():
        root = folder.root(settings)
        root.mkdir(parents=True, exist_ok=True)
        for link, target in (("escape.safetensors", outside / "secret.safetensors"), ("escape-dir", outside),
                             ("escape-model", outside / "model")):
            if not (root / link).is_symlink():
                (root / link).symlink_to(target)
        listed = folder.names(settings)
        assert not [n for n in listed if n.startswith("escape")], (name, listed)
        for entry in ("escape.safetensors", "escape-dir/secret.safetensors", "escape-model"):
            with pytest.raises(UnsafePath):
                folder.locate(settings, entry)


def test_a_file_name_input_naming_a_symlink_out_or_a_traversal_is_refused(executor, settings, tmp_path):
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (settings.input_dir / "escape.png").symlink_to(tmp_path / "secret.png")
    for name in ("escape.png", "../secret.png", "%2e%2e/secret.png", "\uff0e\uff0e/secret.png", "\u2025/secret.png",
                 "..\u2215secret.png", str(tmp_path / "secret.png")):
        with pytest.raises(ng.validate.ValidationFailed) as info:
            executor.run(load_image(name))
        assert "input 'image'" in str(info.value) and "not one of the choices" in str(info.value)


# --- the server's file routes ----------------------------------------------------------------------------------------

@pytest.fixture
async def client(aiohttp_client, settings, tmp_path):
    from nodegraph.history import History
    from nodegraph.server import ServerConfig, create_app

    (tmp_path / "secret.txt").write_bytes(SECRET)
    (settings.output_dir / "ok.png").write_bytes(png_bytes())
    executor = ng.Executor(ng.build_registry(), settings=settings)
    return await aiohttp_client(create_app(executor, ServerConfig(max_upload=1024 * 1024),
                                           History(tmp_path / "history.sqlite3")))


@pytest.mark.parametrize("query", [
    "filename=%2e%2e%2f%2e%2e%2fsecret.txt",  # ../../secret.txt, URL-encoded
    "filename=%252e%252e%252f%252e%252e%252fsecret.txt",  # encoded twice
    "filename=..%2F..%2Fsecret.txt&type=input",
    "filename=secret.txt&subfolder=%2e%2e%2f%2e%2e",
    "filename=%c0%ae%c0%ae%2f%c0%ae%c0%ae%2fsecret.txt",  # overlong UTF-8 dots
    "filename=%ef%bc%8e%ef%bc%8e%2f%ef%bc%8e%ef%bc%8e%2fsecret.txt",  # fullwidth dots (NFKC: ..)
    "filename=%e2%80%a5%2f%e2%80%a5%2fsecret.txt",  # two-dot leader (NFKC: ..)
    "filename=..%e2%88%95..%e2%88%95secret.txt",  # division slash
    "filename=..%5c..%5csecret.txt",  # backslashes
    "filename=ok.png%00.txt",
    "filename=secret.txt&type=%2e%2e",
])
async def test_view_refuses_encoded_and_look_alike_traversal(client, query):
    resp = await client.get(f"/view?{query}")
    assert resp.status in (400, 404), query
    assert SECRET not in await resp.read()
    assert "error" in await resp.json()


async def test_view_still_serves_a_plain_file(client):
    resp = await client.get("/view?filename=ok.png&type=output")
    assert resp.status == 200 and await resp.read() == png_bytes()


def upload_form(data: bytes, name: str, **fields):
    from aiohttp import FormData

    form = FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    return form


def files_outside(tmp_path: Path, settings) -> list[Path]:
    inside = settings.input_dir
    return [p for p in tmp_path.rglob("*evil*") if inside not in p.parents]


@pytest.mark.parametrize("name, fields", [
    ("..%2f..%2fevil.png", {}),
    ("\uff0e\uff0e/\uff0e\uff0e/evil.png", {}),
    ("evil.png", {"subfolder": "%2e%2e/%2e%2e"}),
    ("evil.png", {"subfolder": "\u2025/\u2025"}),
    ("evil.png", {"subfolder": "../.."}),
    ("evil.png", {"type": "../.."}),
])
async def test_upload_never_writes_outside_the_input_folder(client, settings, tmp_path, name, fields):
    resp = await client.post("/upload/image", data=upload_form(png_bytes(), name, **fields))
    assert resp.status in (200, 400), await resp.text()
    assert not files_outside(tmp_path, settings)
    if resp.status == 200:  # stored under a harmless name, inside the folder
        body = await resp.json()
        stored = settings.input_dir / body["subfolder"] / body["name"]
        assert stored.is_file() and settings.input_dir.resolve() in stored.resolve().parents


@pytest.mark.parametrize("content, status, reason", [
    (png_declaring(20_000, 20_000), 413, "decompression bomb"),
    (png_declaring(5000, 5000), 413, "5000x5000 pixels, over the size limit of 4096"),
    (b"GIF89a but not really", 415, "not an image"),
    (b"\0" * (2 * 1024 * 1024), 413, ""),  # over the server's upload limit
])
async def test_upload_refuses_bombs_huge_sizes_non_images_and_oversized_files(client, settings, content, status,
                                                                            reason):
    resp = await client.post("/upload/image", data=upload_form(content, "x.png"))
    assert resp.status == status
    assert reason in (await resp.json())["error"]
    assert not list(settings.input_dir.iterdir())


async def test_a_full_disk_during_an_upload_leaves_no_partial_file(client, settings, monkeypatch):
    write_bytes = Path.write_bytes

    def full(self, data):
        if self.name.endswith(".partial"):
            write_bytes(self, data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    resp = await client.post("/upload/image", data=upload_form(png_bytes(), "cat.png"))
    assert resp.status == 507
    assert "'cat.png'" in (await resp.json())["error"] and "No space left on device" in (await resp.json())["error"]
    assert not list(settings.input_dir.iterdir())
