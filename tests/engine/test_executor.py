"""The executor runs only what is needed, reuses cached results, isolates failures and can be cancelled."""

import threading

import pytest
from hypothesis import given, settings, strategies as st

import nodegraph as ng
from nodegraph import events as ev

from . import toy


@pytest.fixture(autouse=True)
def fresh_counts():
    toy.RUNS.clear()
    toy.Steps.hooks = []
    yield


def chain() -> ng.Workflow:
    wf = ng.Workflow()
    wf.add(1, "Const", value=2)
    wf.add(2, "Add", a=ng.Link("1", "value"), b=3)
    wf.add(3, "Scale", x=ng.Link("2", "sum"), factor=2.0)
    wf.add(4, "Show", value=ng.Link("3", "result"))
    wf.add(5, "Add", a=ng.Link("1", "value"), b=100)  # not needed by the output: never runs
    return wf


def statuses(result: ng.RunResult) -> dict:
    return {nid: r.status for nid, r in result.nodes.items()}


def test_only_ancestors_of_the_outputs_run_and_outputs_are_readable():
    result = ng.Executor(toy.registry()).run(chain())
    assert result.status == "success"
    assert list(result.nodes) == ["1", "2", "3", "4"]
    assert result.output("3", "result") == 10.0
    assert result.ui["4"] == {"text": ["10.0"]}


def test_rerunning_an_unchanged_graph_runs_nothing():
    executor = ng.Executor(toy.registry())
    executor.run(chain())
    toy.RUNS.clear()
    result = executor.run(chain())
    assert set(statuses(result).values()) == {"cached"} and sum(toy.RUNS.values()) == 0
    assert result.ui["4"] == {"text": ["10.0"]}  # cached output nodes still report their results


def test_changing_one_widget_reruns_exactly_that_node_and_its_descendants():
    executor = ng.Executor(toy.registry())
    executor.run(chain())
    wf = chain()
    wf.set(2, "b", 4)
    result = executor.run(wf)
    assert statuses(result) == {"1": "cached", "2": "ran", "3": "ran", "4": "ran"}
    assert result.output("3") == 12.0


def test_node_ids_and_layout_do_not_matter_to_the_cache():
    executor = ng.Executor(toy.registry())
    executor.run(chain())
    renamed = ng.Workflow()
    renamed.add("a", "Const", value=2)
    renamed.add("b", "Add", a=ng.Link("a", "value"), b=3)
    renamed.nodes["b"].ui = {"pos": [500, 20]}
    renamed.add("c", "Show", value=ng.Link("b", "sum"))
    result = executor.run(renamed)
    assert statuses(result) == {"a": "cached", "b": "cached", "c": "ran"}


def test_switching_between_workflows_reruns_nothing_while_the_budget_holds():
    executor = ng.Executor(toy.registry())
    a = chain()
    b = chain()
    b.set(1, "value", 50)
    executor.run(a)
    executor.run(b)
    toy.RUNS.clear()
    executor.run(a)
    executor.run(b)
    assert sum(toy.RUNS.values()) == 0


def test_the_cache_evicts_least_recently_used_first_when_over_budget():
    executor = ng.Executor(toy.registry(), cache=ng.ResultCache(max_entries=4))
    a, b = chain(), chain()
    b.set(1, "value", 50)
    executor.run(a)
    executor.run(b)  # b's four results push a's out
    toy.RUNS.clear()
    executor.run(a)
    assert toy.RUNS["Const"] == 1 and len(executor.cache) == 4


def test_the_byte_budget_is_respected():
    cache = ng.ResultCache(max_bytes=10_000)
    cache.put("big", (b"x" * 6000,), {})
    cache.put("big2", (b"y" * 6000,), {})
    assert "big" not in cache and "big2" in cache and cache.nbytes <= 10_000


def read_file_workflow(folder, monkeypatch) -> ng.Workflow:
    """ReadFile of a.txt (holding "one") in ``folder`` -> Show."""
    monkeypatch.setattr(toy, "FILES_DIR", folder)
    (folder / "a.txt").write_text("one")
    wf = ng.Workflow()
    wf.add(1, "ReadFile", filename="a.txt")
    wf.add(2, "Show", value=ng.Link("1", "text"))
    return wf


def test_replacing_a_file_under_the_same_name_invalidates(tmp_path, monkeypatch):
    wf = read_file_workflow(tmp_path, monkeypatch)
    executor = ng.Executor(toy.registry())
    assert executor.run(wf).ui["2"] == {"text": ["'one'"]}
    assert executor.run(wf).nodes["1"].status == "cached"
    (tmp_path / "a.txt").write_text("two!")
    result = executor.run(wf)
    assert result.nodes["1"].status == "ran" and result.ui["2"] == {"text": ["'two!'"]}


def test_a_node_that_is_not_cacheable_reruns_with_its_descendants():
    wf = ng.Workflow()
    wf.add(1, "Random")
    wf.add(2, "Show", value=ng.Link("1", "value"))
    executor = ng.Executor(toy.registry())
    executor.run(wf)
    assert statuses(executor.run(wf)) == {"1": "ran", "2": "ran"}


def test_a_different_output_folder_reruns_output_nodes(tmp_path):
    executor = ng.Executor(toy.registry())
    executor.run(chain(), output_dir=tmp_path / "a")
    assert statuses(executor.run(chain(), output_dir=tmp_path / "b"))["4"] == "ran"


def test_a_failing_node_skips_its_dependants_but_independent_branches_still_run():
    wf = ng.Workflow()
    wf.add(1, "Const", value=1)
    wf.add(2, "Fail", x=ng.Link("1", "value"))
    wf.add(3, "Show", value=ng.Link("2", "x"))
    wf.add(4, "Add", a=ng.Link("1", "value"), b=1)
    wf.add(5, "Show", value=ng.Link("4", "sum"))
    result = ng.Executor(toy.registry()).run(wf)
    assert result.status == "failed"
    assert statuses(result) == {"1": "ran", "2": "failed", "3": "skipped", "4": "ran", "5": "ran"}
    error = result.nodes["2"].error
    assert (error["type"], error["exception_type"], error["message"]) == ("Fail", "RuntimeError", "boom on 1")
    assert "Traceback" in error["traceback"]
    assert result.ui["5"] == {"text": ["2"]}
    assert result.errors[0]["node_id"] == "2"


def test_failures_are_not_cached():
    wf = ng.Workflow()
    wf.add(1, "Const", value=1)
    wf.add(2, "Fail", x=ng.Link("1", "value"))
    wf.add(3, "Show", value=ng.Link("2", "x"))
    executor = ng.Executor(toy.registry())
    executor.run(wf)
    executor.run(wf)
    assert toy.RUNS["Fail"] == 2


def steps_workflow(steps=5) -> ng.Workflow:
    wf = ng.Workflow()
    wf.add(1, "Const", value=1)
    wf.add(2, "Steps", x=ng.Link("1", "value"), steps=steps)
    wf.add(3, "Show", value=ng.Link("2", "x"))
    return wf


def test_events_arrive_in_order_with_progress():
    executor = ng.Executor(toy.registry())
    seen = []
    executor.events.subscribe(lambda e: seen.append((e.type, e.node_id, e.data.get("value"))))
    executor.run(steps_workflow(2))
    assert seen == [
        (ev.RUN_STARTED, None, None),
        (ev.NODE_STARTED, "1", None), (ev.NODE_FINISHED, "1", None),
        (ev.NODE_STARTED, "2", None), (ev.NODE_PROGRESS, "2", 1), (ev.NODE_PROGRESS, "2", 2),
        (ev.NODE_FINISHED, "2", None),
        (ev.NODE_STARTED, "3", None), (ev.NODE_FINISHED, "3", None),
        (ev.RUN_FINISHED, None, None)]
    seen.clear()
    executor.run(steps_workflow(2))
    assert [t for t, _, _ in seen] == [ev.RUN_STARTED, ev.NODE_CACHED, ev.NODE_CACHED, ev.NODE_CACHED,
                                       ev.RUN_FINISHED]


def test_a_broken_subscriber_does_not_break_the_run():
    executor = ng.Executor(toy.registry())
    executor.events.subscribe(lambda e: 1 / 0)
    assert executor.run(chain()).status == "success"


def test_cancelling_inside_a_node_stops_the_run_and_never_affects_the_next():
    executor = ng.Executor(toy.registry())
    toy.Steps.hooks = [lambda ctx, i: i == 2 and executor.cancel(ctx.run_id)]
    result = executor.run(steps_workflow(), run_id="r1")
    assert result.status == "cancelled"
    assert statuses(result) == {"1": "ran", "2": "cancelled", "3": "cancelled"}
    toy.Steps.hooks = []
    assert executor.run(steps_workflow(), run_id="r2").status == "success"
    assert executor.cancel("r1") is False  # finished runs cannot be cancelled


def test_cancelling_from_another_thread_is_seen_between_nodes():
    executor = ng.Executor(toy.registry())
    started, release = threading.Event(), threading.Event()

    def block(ctx, i):
        started.set()
        release.wait(5)

    toy.Steps.hooks = [block]
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("r", executor.run(steps_workflow(1), run_id="x")))
    thread.start()
    assert started.wait(5)
    assert executor.cancel("x")
    release.set()
    thread.join(5)
    # the node ignored the flag while blocked, but the next progress call and the next node both honour it
    assert box["r"].status == "cancelled" and box["r"].nodes["3"].status == "cancelled"


def test_run_returns_tuple_dict_or_single_values():
    wf = ng.Workflow()
    wf.add(1, "Const", value=3)
    wf.add(2, "Pair", x=ng.Link("1", "value"))
    wf.add(3, "Show", value=ng.Link("2", "negated"))
    result = ng.Executor(toy.registry()).run(wf)
    assert result.output("2", "same") == 3 and result.output("2", "negated") == -3
    assert result.ui["3"] == {"text": ["-3"]}


# --- property-based: random DAGs -------------------------------------------------------------------------------------

@st.composite
def random_dags(draw):
    """A random DAG of Add nodes over a few Const sources, with Show outputs on some nodes."""
    n_sources = draw(st.integers(1, 3))
    n_adds = draw(st.integers(0, 12))
    wf = ng.Workflow()
    for i in range(n_sources):
        wf.add(f"s{i}", "Const", value=draw(st.integers(-5, 5)))
    producers = [(f"s{i}", "value") for i in range(n_sources)]
    for i in range(n_adds):
        src = draw(st.sampled_from(producers))
        wf.add(f"a{i}", "Add", a=ng.Link(*src), b=draw(st.integers(-3, 3)))
        producers.append((f"a{i}", "sum"))
    shown = draw(st.lists(st.sampled_from(producers), min_size=1, max_size=4, unique=True))
    for i, src in enumerate(shown):
        wf.add(f"o{i}", "Show", value=ng.Link(*src))
    edits = draw(st.lists(st.tuples(st.sampled_from(sorted(wf.nodes)), st.integers(-3, 3)), max_size=3))
    return wf, edits


@settings(max_examples=60, deadline=None)
@given(random_dags())
def test_cached_results_equal_a_fresh_run_and_no_node_runs_twice(case):
    wf, edits = case
    shared = ng.Executor(toy.registry())
    counts = []
    shared.events.subscribe(lambda e: e.type == ev.NODE_STARTED and counts.append(e.node_id))
    shared.run(wf)
    assert len(counts) == len(set(counts))
    for node_id, value in edits:
        entry = wf.nodes[node_id]
        if entry.type in ("Const", "Add"):
            wf.set(node_id, "value" if entry.type == "Const" else "b", value)
        counts.clear()
        cached = shared.run(wf)
        assert len(counts) == len(set(counts))
        fresh = ng.Executor(toy.registry()).run(wf)
        assert cached.ui == fresh.ui
        assert {k: v for k, v in cached.values.items()} == fresh.values


def test_a_remembered_plan_still_sees_a_file_disappear(tmp_path, monkeypatch):
    wf = read_file_workflow(tmp_path, monkeypatch)
    executor = ng.Executor(toy.registry())
    executor.run(wf)
    (tmp_path / "a.txt").unlink()
    with pytest.raises(ng.ValidationFailed) as info:
        executor.run(wf)
    assert info.value.errors[0].code == "not_an_option"


def test_a_remembered_plan_carries_the_workflow_being_run():
    executor = ng.Executor(toy.registry())
    first = chain()
    executor.compile(first)
    second = chain()
    second.nodes["1"].ui = {"pos": [1, 2]}  # layout only: the same plan serves
    plan = executor.compile(second)
    assert plan.workflow is second
