"""A queue whose runner runs several prompts at once (a Dask cluster's GPU workers): prompts start in the queue's
order as slots free up, a client never has two running at once, a growing capacity is used while prompts wait,
and interrupting, stopping and ``/queue`` see every running prompt. Over a runner whose runs wait on gates the
test opens, so every interleaving here is the test's choice."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import nodegraph as ng
from nodegraph import comfy_protocol
from nodegraph.events import EventBus
from nodegraph.executor import RunResult
from nodegraph.history import History
from nodegraph.prompt_queue import PromptQueue

from .test_persistent_queue import until


class GatedRunner:
    """Runs each prompt until the test opens its gate (or cancels it); no ``capacity``, as the local executor."""

    def __init__(self, slots: int | None = None):
        self.events = EventBus()
        self.slots = slots
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.most = 0  # the most runs at once
        self.now = 0

    def gate(self, run_id: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(run_id, threading.Event())

    def run(self, plan, *, run_id: str) -> RunResult:
        with self.lock:
            self.started.append(run_id)
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            self.gate(run_id).wait(30)
        finally:
            with self.lock:
                self.now -= 1
        return RunResult(run_id, "cancelled" if run_id in self.cancelled else "success", {})

    def cancel(self, run_id: str) -> bool:
        self.cancelled.append(run_id)
        self.gate(run_id).set()
        return True


class ClusterRunner(GatedRunner):
    """With a ``capacity``, which the test sets (workers joining and leaving)."""

    def capacity(self) -> int:
        return self.slots


def make_queue(tmp_path, slots: int | None) -> tuple[PromptQueue, GatedRunner]:
    runner = GatedRunner() if slots is None else ClusterRunner(slots)
    queue = PromptQueue(runner, History(tmp_path / "history.sqlite3"), lambda *message: None, comfy_protocol)
    queue.POLL = 0.05
    return queue, runner


def put(queue: PromptQueue, prompt_id: str, client: str | None) -> None:
    queue.put(ng.Workflow(), {}, SimpleNamespace(targets=["1"]), client, {}, prompt_id=prompt_id)


def put_three(queue: PromptQueue) -> None:
    """p1, p2 and p3, of clients a, b and c."""
    for prompt_id, client in (("p1", "a"), ("p2", "b"), ("p3", "c")):
        put(queue, prompt_id, client)


def finish(queue: PromptQueue, runner: GatedRunner, prompt_id: str) -> None:
    runner.gate(prompt_id).set()
    until(lambda: prompt_id not in queue.running and queue.history.get(prompt_id), f"{prompt_id} to finish")


def settled(runner: GatedRunner, count: int) -> list[str]:
    """What has started once ``count`` runs have, after a moment in which more could have started."""
    until(lambda: len(runner.started) >= count, f"{count} runs to start")
    time.sleep(0.2)
    return list(runner.started)


def test_prompts_start_in_order_as_slots_free_up_and_never_two_of_one_client_at_once(tmp_path):
    queue, runner = make_queue(tmp_path, slots=2)
    for prompt_id, client in (("a1", "a"), ("a2", "a"), ("b1", "b"), ("c1", "c")):
        put(queue, prompt_id, client)
    queue.start()
    try:
        assert settled(runner, 2) == ["a1", "b1"]  # a2 waits for a1 (same client); c1 for a slot
        assert [row[1] for row in queue.snapshot()["queue_running"]] == ["a1", "b1"]
        assert [row[1] for row in queue.snapshot()["queue_pending"]] == ["a2", "c1"]
        finish(queue, runner, "a1")
        assert settled(runner, 3) == ["a1", "b1", "a2"]  # the client's next prompt, first in the queue's order
        finish(queue, runner, "b1")
        assert settled(runner, 4)[-1] == "c1"
        for prompt_id in ("a2", "c1"):
            finish(queue, runner, prompt_id)
        assert runner.most == 2
        assert all(queue.history.get(p)["status"]["status_str"] == "success" for p in ("a1", "a2", "b1", "c1"))
    finally:
        queue.stop()


def test_prompts_without_a_client_id_run_one_after_another(tmp_path):
    queue, runner = make_queue(tmp_path, slots=3)
    for prompt_id in ("x", "y"):
        put(queue, prompt_id, None)
    put(queue, "z", "someone")
    queue.start()
    try:
        assert settled(runner, 2) == ["x", "z"]
        finish(queue, runner, "x")
        assert settled(runner, 3) == ["x", "z", "y"]
    finally:
        queue.stop()


def test_a_runner_without_a_capacity_runs_one_prompt_at_a_time(tmp_path):
    queue, runner = make_queue(tmp_path, slots=None)
    put(queue, "p1", "a")
    put(queue, "p2", "b")
    queue.start()
    try:
        assert settled(runner, 1) == ["p1"]
        finish(queue, runner, "p1")
        assert settled(runner, 2) == ["p1", "p2"]
        finish(queue, runner, "p2")
        assert runner.most == 1
    finally:
        queue.stop()


def test_a_capacity_that_grows_while_prompts_wait_is_used_at_once(tmp_path):
    queue, runner = make_queue(tmp_path, slots=1)
    put_three(queue)
    queue.start()
    try:
        assert settled(runner, 1) == ["p1"]
        runner.slots = 3  # two workers joined the cluster
        assert settled(runner, 3) == ["p1", "p2", "p3"]
        assert queue.remaining == 3 and len(queue.snapshot()["queue_running"]) == 3
    finally:
        queue.stop()


def test_interrupting_reaches_every_running_prompt_or_the_one_named(tmp_path):
    queue, runner = make_queue(tmp_path, slots=3)
    put_three(queue)
    queue.start()
    try:
        settled(runner, 3)
        assert queue.interrupt("p2") and runner.cancelled == ["p2"]
        assert not queue.interrupt("not-running")
        until(lambda: queue.history.get("p2"), "p2's history entry")
        assert queue.history.get("p2")["status"]["status_str"] == "interrupted"
        assert queue.interrupt() and sorted(runner.cancelled) == ["p1", "p2", "p3"]
        until(lambda: queue.remaining == 0, "the queue to empty")
        assert not queue.interrupt()
    finally:
        queue.stop()


def test_stopping_cancels_every_running_prompt_and_leaves_them_for_the_next_start(tmp_path):
    queue, runner = make_queue(tmp_path, slots=2)
    put_three(queue)
    queue.start()
    settled(runner, 2)
    queue.stop()
    assert sorted(runner.cancelled) == ["p1", "p2"]
    assert not any(t.is_alive() for t in queue._threads)
    rows = queue.history.queued()  # as after a crash: the next start settles the running ones and runs p3
    assert [(r.prompt_id, r.running) for r in rows] == [("p1", True), ("p2", True), ("p3", False)]


class ChoosingRunner(ClusterRunner):
    """Chooses the first waiting plan whose model is ``loaded`` (what a free worker holds), as a cluster does."""

    def __init__(self, slots: int, loaded: str | None = None):
        super().__init__(slots)
        self.loaded = loaded
        self.offered: list[list[str]] = []  # the models of the plans offered, each time

    def choose(self, plans) -> int:
        models = [plan.model for plan in plans]
        self.offered.append(models)
        if self.loaded == "fail":
            raise ConnectionError("the scheduler is gone")
        return models.index(self.loaded) if self.loaded in models else 0


def put_model(queue: PromptQueue, prompt_id: str, client: str | None, model: str) -> None:
    queue.put(ng.Workflow(), {}, SimpleNamespace(targets=["1"], model=model), client, {}, prompt_id=prompt_id)


def choosing_queue(tmp_path, runner: ChoosingRunner) -> PromptQueue:
    queue = PromptQueue(runner, History(tmp_path / "history.sqlite3"), lambda *message: None, comfy_protocol)
    queue.POLL = 0.05
    return queue


def test_a_runner_may_start_a_later_prompt_whose_models_a_free_worker_holds_but_each_client_keeps_its_order(
        tmp_path):
    runner = ChoosingRunner(slots=1, loaded="xl")
    queue = choosing_queue(tmp_path, runner)
    for prompt_id, client, model in (("a1", "a", "sd"), ("b1", "b", "sd"), ("b2", "b", "xl"), ("c1", "c", "xl")):
        put_model(queue, prompt_id, client, model)
    queue.start()
    try:
        # offered one prompt per client, in queue order: b2 waits behind b1, so c1 is the one with the model
        assert settled(runner, 1) == ["c1"]
        assert runner.offered[0] == ["sd", "sd", "xl"]
        runner.loaded = None  # nothing fits: queue order again
        finish(queue, runner, "c1")
        finish(queue, runner, settled(runner, 2)[-1])
        finish(queue, runner, settled(runner, 3)[-1])
        assert settled(runner, 4) == ["c1", "a1", "b1", "b2"]
        finish(queue, runner, "b2")
    finally:
        queue.stop()


def test_a_prompt_passed_over_patience_times_goes_next_whatever_the_runner_would_choose(tmp_path):
    runner = ChoosingRunner(slots=1, loaded="xl")
    queue = choosing_queue(tmp_path, runner)
    queue.PATIENCE = 2
    put_model(queue, "old", "o", "sd")
    for n in range(4):
        put_model(queue, f"xl{n}", f"c{n}", "xl")
    queue.start()
    try:
        for count in (1, 2):
            finish(queue, runner, settled(runner, count)[-1])
        assert settled(runner, 3) == ["xl0", "xl1", "old"]  # passed over twice, then its turn
        finish(queue, runner, "old")
        finish(queue, runner, settled(runner, 4)[-1])
        assert settled(runner, 5)[-1] == "xl3"
        finish(queue, runner, "xl3")
    finally:
        queue.stop()


def test_a_runner_that_cannot_choose_leaves_the_queue_in_its_order(tmp_path):
    runner = ChoosingRunner(slots=1, loaded="fail")
    queue = choosing_queue(tmp_path, runner)
    put_model(queue, "p1", "a", "sd")
    put_model(queue, "p2", "b", "xl")
    queue.start()
    try:
        assert settled(runner, 1) == ["p1"]
        finish(queue, runner, "p1")
        assert settled(runner, 2) == ["p1", "p2"]
        finish(queue, runner, "p2")
    finally:
        queue.stop()
