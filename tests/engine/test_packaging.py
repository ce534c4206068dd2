"""A non-editable install carries the canvas, the example workflows and the node library's data."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_ships_web_workflows_and_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    [wheel] = tmp_path.glob("nodegraph-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for workflow in (ROOT / "workflows").glob("*.json"):
        assert f"nodegraph/_workflows/{workflow.name}" in names
    for asset in (ROOT / "web").rglob("*"):
        if asset.is_file():
            assert f"nodegraph/_web/{asset.relative_to(ROOT / 'web').as_posix()}" in names
    assert "nodes/data/clip_tokenizer/vocab.json" in names
    assert "nodes/configs/sd1/unet/config.json" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
