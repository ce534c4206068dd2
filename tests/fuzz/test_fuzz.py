"""Property-based fuzzing of everything that reads an untrusted workflow: validation (any format, the real node
library), ``nodegraph validate``, ``POST /prompt`` and ``POST /nodegraph/import``. Whatever the document, the answer
is a plan or a structured refusal (WorkflowError, ValidationFailed with node, input and reason, a 400 JSON body),
within a bounded time.

The default run tries about a hundred cases a target (seconds); ``-m slow`` runs the long variant."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from .targets import documents, huge_documents, targets, toy_documents

STRATEGIES = {"validator": documents, "cli": documents, "server": toy_documents, "import": documents}

QUICK = settings(max_examples=100, deadline=2000, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = settings(QUICK, max_examples=2000, derandomize=False)


@pytest.fixture(scope="module")
def target():
    with targets() as found:
        yield found


@pytest.mark.parametrize("name", ["validator", "cli", "server", "import"])
def test_every_document_is_planned_or_refused_with_reasons(target, name):
    @QUICK
    @given(STRATEGIES[name]())
    def check(text):
        target[name](text)

    check()


@pytest.mark.parametrize("name", ["validator", "server", "import"])
def test_long_chains_and_wide_graphs_are_answered_in_bounded_time(target, name):
    @settings(QUICK, max_examples=5, deadline=10_000)
    @given(huge_documents())
    def check(text):
        target[name](text)

    check()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["validator", "cli", "server", "import"])
def test_many_more_documents(target, name):
    @LONG
    @given(STRATEGIES[name]())
    def check(text):
        target[name](text)

    check()
