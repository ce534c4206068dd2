"""The result cache's memory budget: each storage counted once however many entries hold it, least recently used
entries out first when the budget is exceeded, and the budget read from --cache-gb or $NODEGRAPH_CACHE_GB.
Toy values stand for models: plain Python, no torch."""

from __future__ import annotations

import pytest

import nodegraph as ng
from nodegraph import cli
from nodegraph.cache import ResultCache, estimate_nbytes

MB = 1024**2


class Weights:
    """Stands for a loaded model's tensor storage: one buffer of ``nbytes``."""

    def __init__(self, nbytes: int):
        self.nbytes_ = nbytes

    def __nodegraph_storages__(self):
        return [(("storage", "toy", id(self)), self.nbytes_)]


class Handle:
    """Stands for a model handle (a LoRA-patched model, a conditioning holding its text encoder): it holds
    another value's weights plus, optionally, weights of its own."""

    __nodegraph_model__ = True

    def __init__(self, *held: Weights):
        self.held = held

    def __nodegraph_storages__(self):
        return [pair for w in self.held for pair in w.__nodegraph_storages__()]


def test_weights_shared_between_entries_are_counted_once():
    cache = ResultCache(max_bytes=1024 * MB)
    unet, lora = Weights(100 * MB), Weights(1 * MB)
    cache.put("checkpoint", (Handle(unet),), {})
    cache.put("lora", (Handle(unet, lora),), {})
    cache.put("freeu", (Handle(unet),), {})
    held = cache.nbytes
    assert 101 * MB <= held < 102 * MB  # not 301 MB
    stats = cache.stats()
    assert stats["bytes"] == held and stats["model_entries"] == 3
    assert stats["model_bytes"] == held and stats["shared_bytes"] == 200 * MB


def test_an_entry_frees_its_weights_only_when_no_other_entry_holds_them():
    cache = ResultCache(max_bytes=1024 * MB)
    unet = Weights(100 * MB)
    cache.put("checkpoint", (Handle(unet),), {})
    cache.put("lora", (Handle(unet, Weights(MB)),), {})
    cache.put("checkpoint", (Handle(Weights(10 * MB)),), {})  # replaced: the LoRA entry still holds the UNet
    assert cache.nbytes >= 111 * MB
    cache.put("lora", (1,), {})
    assert cache.nbytes < 11 * MB


def test_one_value_twice_in_an_entry_is_counted_once():
    w = Weights(10 * MB)
    assert 10 * MB <= estimate_nbytes((Handle(w), Handle(w), [w])) < 11 * MB


def test_over_budget_the_least_recently_used_model_goes_first():
    cache = ResultCache(max_bytes=150 * MB)  # fits one model
    a, b = Weights(100 * MB), Weights(100 * MB)
    cache.put("a", (Handle(a),), {})
    cache.put("a-lora", (Handle(a, Weights(MB)),), {})
    cache.put("b", (Handle(b),), {})
    # a's UNet goes only once both entries holding it are out
    assert "a" not in cache and "a-lora" not in cache and "b" in cache
    assert cache.nbytes <= 150 * MB and cache.stats()["evictions"] == 2
    cache.get("b")
    cache.put("small", ("x",), {})
    cache.put("c", (Handle(Weights(100 * MB)),), {})
    assert "b" not in cache and "small" in cache and "c" in cache  # b was used before small


def test_a_result_larger_than_the_budget_is_not_kept_and_evicts_nothing():
    cache = ResultCache(max_bytes=150 * MB)
    cache.put("a", (Handle(Weights(100 * MB)),), {})
    cache.put("huge", (Handle(Weights(200 * MB)),), {})
    assert "huge" not in cache and "a" in cache


def test_a_budget_of_zero_caches_nothing():
    cache = ResultCache(max_bytes=0)
    cache.put("a", (1,), {})
    assert len(cache) == 0 and cache.nbytes == 0


def test_values_without_storages_fall_back_to_their_reported_size():
    class Sized:
        def __nodegraph_nbytes__(self):
            return 5 * MB

    cache = ResultCache()
    cache.put("a", (Sized(), b"x" * 1000), {})
    assert 5 * MB + 1000 <= cache.nbytes < 5 * MB + 2000
    cache.clear()
    assert cache.nbytes == 0 and cache.stats()["storages"] == 0


def test_clearing_releases_every_storage():
    cache = ResultCache()
    for i in range(5):
        cache.put(str(i), (Handle(Weights(MB)),), {})
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.stats()["model_entries"] == 0


class Load(ng.Node):
    """Loads a toy model of ``mb`` megabytes named ``model_name``."""
    category = "toy"
    model_name = ng.String(default="a")
    mb = ng.Int(default=100, min=0, max=10_000)
    outputs = (ng.Output("model", "TOYMODEL"),)

    def run(self, ctx, model_name, mb):
        return Handle(Weights(mb * MB))


class Use(ng.Node):
    """Uses a toy model: its result holds the model, as a conditioning holds its text encoder."""
    category = "toy"
    model = ng.Socket("TOYMODEL")
    seed = ng.Int(default=0, min=0, max=1000)
    outputs = (ng.Output("out", "TOYMODEL"),)

    def run(self, ctx, model, seed):
        return Handle(*model.held, Weights(1000))


def _graph(name: str, seed: int = 0) -> ng.Workflow:
    wf = ng.Workflow()
    wf.add("load", "Load", model_name=name, mb=100)
    wf.add("use", "Use", model=ng.Link("load", "model"), seed=seed)
    wf.outputs = ["use"]
    return wf


def test_switching_models_under_a_budget_for_one_reloads_only_what_was_evicted(tmp_path):
    registry = ng.Registry()
    registry.register(Load)
    registry.register(Use)
    executor = ng.Executor(registry, cache=ResultCache(max_bytes=150 * MB),
                           settings=ng.Settings(output_dir=tmp_path))
    assert executor.run(_graph("a")).status == "success"
    assert executor.run(_graph("a", seed=1)).nodes["load"].status == "cached"
    b = executor.run(_graph("b"))
    assert b.status == "success" and b.nodes["load"].status == "ran"  # a run survives evictions made during it
    assert executor.cache.nbytes <= 150 * MB and executor.cache.stats()["model_entries"] == 2  # b and its use
    assert executor.run(_graph("a", seed=1)).nodes["load"].status == "ran"  # evicted: loaded again


@pytest.mark.parametrize("argv, env, expected", [
    ([], None, 8.0),
    ([], "2.5", 2.5),
    (["--cache-gb", "1"], "2.5", 1.0),  # the command line wins
    (["--cache-gb", "0"], None, 0.0),
])
def test_the_budget_comes_from_the_command_line_or_the_environment(monkeypatch, argv, env, expected):
    if env is None:
        monkeypatch.delenv("NODEGRAPH_CACHE_GB", raising=False)
    else:
        monkeypatch.setenv("NODEGRAPH_CACHE_GB", env)
    args = cli.make_parser().parse_args(["validate", "text-to-image", *argv])
    assert cli._cache(args).max_bytes == int(expected * 1024**3)


def test_a_bad_budget_in_the_environment_is_an_error(monkeypatch):
    monkeypatch.setenv("NODEGRAPH_CACHE_GB", "lots")
    args = cli.make_parser().parse_args(["validate", "text-to-image"])
    with pytest.raises(ValueError, match="NODEGRAPH_CACHE_GB"):
        cli._cache(args)
