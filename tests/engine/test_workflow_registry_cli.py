"""The workflow format round-trips, node packages load only from named folders, and the CLI reports properly."""

import json
import subprocess
import sys
import textwrap

import pytest

import nodegraph as ng
from nodegraph import cli

from . import toy

FULL = {
    "format": "nodegraph/workflow",
    "version": 1,
    "nodes": {
        "1": {"type": "Const", "inputs": {"value": 2}, "ui": {"pos": [10, 20], "size": [200, 80], "title": "Two",
                                                               "color": "#335", "collapsed": False}},
        "2": {"type": "Add", "version": 1, "inputs": {"a": {"link": ["1", "value"]}, "b": 3}},
        "3": {"type": "Show", "inputs": {"value": {"link": ["2", "sum"]}}, "ui": {"pos": [400, 20]}},
    },
    "groups": [{"title": "Maths", "bounding": [0, 0, 300, 200], "color": "#222"}],
    "notes": [{"text": "adds three", "pos": [0, 300]}],
    "meta": {"author": "test", "nested": {"a": [1, 2, {"b": None}]}},
}


def test_saving_a_loaded_workflow_reproduces_it_exactly(tmp_path):
    wf = ng.loads(json.dumps(FULL))
    assert wf.to_json() == FULL
    path = tmp_path / "wf.json"
    wf.save(path)
    assert json.loads(path.read_text()) == FULL
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


def test_loading_executes_nothing():
    toy.RUNS.clear()
    ng.loads(json.dumps(FULL))
    assert sum(toy.RUNS.values()) == 0


def write_package(folder, module, body):
    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(body))


PACKAGE = """
    from nodegraph import Node, Int, Output
    class Triple(Node):
        '''Three times x.'''
        category = "extra"
        x = Int(default=1)
        outputs = (Output("value", "INT"),)
        def run(self, ctx, x):
            return 3 * x
    NODES = [Triple]
"""


def test_node_packages_load_from_a_named_folder(tmp_path):
    write_package(tmp_path / "pkgs", "triple", PACKAGE)
    registry = toy.registry()
    assert registry.load_folder(tmp_path / "pkgs")
    assert registry["Triple"].to_json()["description"] == "Three times x."


def test_two_node_types_with_one_name_are_an_error_naming_both(tmp_path):
    write_package(tmp_path / "a", "one", PACKAGE)
    write_package(tmp_path / "b", "two", PACKAGE)
    registry = ng.Registry()
    registry.load_folder(tmp_path / "a")
    with pytest.raises(ng.RegistryError, match="two node types are named 'Triple'.*one.py.*two.py"):
        registry.load_folder(tmp_path / "b")


def test_a_broken_package_is_named(tmp_path):
    write_package(tmp_path / "p", "broken", "raise ImportError('missing dependency xyz')")
    with pytest.raises(ng.RegistryError, match="broken.py failed to import: ImportError: missing dependency xyz"):
        ng.Registry().load_folder(tmp_path / "p")


def test_every_node_type_serialises_to_json():
    doc = toy.registry().to_json()
    scale = doc["Scale"]
    assert scale["category"] == "toy" and scale["outputs"] == [{"name": "result", "type": "FLOAT"}]
    factor = next(i for i in scale["inputs"] if i["name"] == "factor")
    assert factor == {"name": "factor", "kind": "FLOAT", "type": "FLOAT", "optional": False, "default": 1.0,
                      "min": 0.0, "max": 10.0, "step": 0.25}
    mode = next(i for i in doc["Words"]["inputs"] if i["name"] == "mode")
    assert mode["options"] == ["upper", "lower"] and mode["dynamic"] is False
    json.dumps(doc)


def test_set_overrides_parse_json_values_or_fall_back_to_text():
    assert cli.parse_set(["3.seed=42", "a.b.text=hello", "1.list=[1, 2]"]) == [
        ("3", "seed", 42), ("a.b", "text", "hello"), ("1", "list", [1, 2])]
    with pytest.raises(ValueError, match="NODE.INPUT=VALUE"):
        cli.parse_set(["seed42"])


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nodegraph", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def toy_cli_args(tmp_path):
    # The toy nodes become a node package; no builtin library is needed for these.
    pkg = tmp_path / "pkgs"
    pkg.mkdir()
    (pkg / "toy_nodes.py").write_text((toy.__file__ and open(toy.__file__).read()) + "\nNODES = ALL\n")
    return ["--node-path", str(pkg)]


def test_cli_runs_a_workflow_with_overrides_and_prints_a_summary(tmp_path):
    wf = ng.Workflow()
    wf.add(1, "Const", value=2)
    wf.add(2, "Add", a=ng.Link("1", "value"), b=3)
    wf.add(3, "Show", value=ng.Link("2", "sum"))
    wf.save(tmp_path / "wf.json")
    proc = run_cli("run", str(tmp_path / "wf.json"), "--set", "2.b=40", "--json", *toy_cli_args(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "success" and out["ui"]["3"] == {"text": ["42"]}


def test_cli_lists_every_validation_error_and_exits_non_zero(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "nodegraph/workflow", "version": 1, "nodes": {
        "1": {"type": "Const", "inputs": {"value": "x"}}, "2": {"type": "Nope"}}}))
    proc = run_cli("validate", str(path), *toy_cli_args(tmp_path))
    assert proc.returncode == 2
    assert "node 1 (Const), input 'value': expects an integer" in proc.stderr
    assert "node 2 (Nope): there is no node type 'Nope'" in proc.stderr


def test_cli_reports_a_failed_node_with_exit_status_one(tmp_path):
    wf = ng.Workflow()
    wf.add(1, "Const", value=2)
    wf.add(2, "Fail", x=ng.Link("1", "value"))
    wf.add(3, "Show", value=ng.Link("2", "x"))
    wf.save(tmp_path / "wf.json")
    proc = run_cli("run", str(tmp_path / "wf.json"), "--no-progress", *toy_cli_args(tmp_path))
    assert proc.returncode == 1
    assert "error in node 2 (Fail): RuntimeError: boom on 2" in proc.stderr
    assert "failed: 1 ran, 1 failed, 1 skipped" in proc.stdout


def test_cli_nodes_json_lists_the_builtin_library():
    proc = run_cli("nodes", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Integer" in json.loads(proc.stdout)


def test_cli_hands_device_dtype_and_memory_format_to_the_node_library(monkeypatch, capsys):
    handed = {}

    def build_registry(node_path, library):
        handed["library"] = library
        raise ng.RegistryError("stop here")

    class Library(ng.NoLibrary):
        def configure(self, settings):
            handed["settings"] = settings

    monkeypatch.setattr(cli, "build_registry", build_registry)
    monkeypatch.setattr(cli, "load_library", lambda name: Library())
    argv = ["run", "text-to-image", "--device", "cpu", "--dtype", "bfloat16", "--memory-format", "contiguous"]
    assert cli.main(argv) == 2 and "stop here" in capsys.readouterr().err
    settings = handed["settings"]
    assert (settings.device, settings.dtype, settings.memory_format) == ("cpu", "bfloat16", "contiguous")
    assert isinstance(handed["library"], Library)  # the library that was configured is the one registered
    handed.clear()
    assert cli.main(["run", "text-to-image"]) == 2
    settings = handed["settings"]
    # unset flags leave the library's defaults
    assert (settings.device, settings.dtype, settings.memory_format) == (None, None, "auto")
    with pytest.raises(SystemExit):
        cli.main(["run", "text-to-image", "--memory-format", "nhwc"])
    assert "invalid choice: 'nhwc'" in capsys.readouterr().err


def test_settings_come_from_the_environment_then_the_command_line(monkeypatch, tmp_path):
    monkeypatch.setenv("NODEGRAPH_MODELS", str(tmp_path / "env-models"))
    monkeypatch.setenv("NODEGRAPH_INPUT", str(tmp_path / "env-input"))
    monkeypatch.setenv("NODEGRAPH_DTYPE", "bfloat16")
    args = cli.make_parser().parse_args(["run", "x.json", "--models", str(tmp_path / "cli-models")])
    settings = cli.settings_from_args(args)
    assert settings.models_dir == tmp_path / "cli-models"  # the command line wins
    assert settings.input_dir == tmp_path / "env-input" and settings.dtype == "bfloat16"  # the environment fills in
    monkeypatch.setenv("NODEGRAPH_DTYPE", "float8")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        ng.Settings.from_env()


def test_an_unknown_device_is_refused_at_start_up(capsys):
    assert cli.main(["validate", "text-to-image", "--device", "tpu9"]) == 2
    assert "--device 'tpu9'" in capsys.readouterr().err


def test_servers_and_workers_let_openmp_threads_sleep_unless_the_user_chose(monkeypatch):
    from nodegraph.cli import quiet_openmp

    for command, expected in (("serve", "PASSIVE"), ("worker", "PASSIVE"), ("run", None), ("validate", None)):
        environ: dict[str, str] = {}
        quiet_openmp(command, environ)
        assert environ.get("OMP_WAIT_POLICY") == expected, command
    chosen = {"OMP_WAIT_POLICY": "ACTIVE"}
    quiet_openmp("serve", chosen)
    assert chosen == {"OMP_WAIT_POLICY": "ACTIVE"}
