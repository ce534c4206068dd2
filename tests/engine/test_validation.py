"""Validation reports every mistake at once, each naming its node, type, input and a machine-readable code."""

import json

import pytest

import nodegraph as ng
from nodegraph.workflow import Limits

from . import toy


def errors_of(doc: dict, outputs=None) -> list[ng.ValidationError]:
    wf = ng.workflow.from_json(doc)
    with pytest.raises(ng.ValidationFailed) as info:
        ng.compile_workflow(wf, toy.registry(), outputs)
    return info.value.errors


def doc(nodes: dict) -> dict:
    return {"format": "nodegraph/workflow", "version": 1, "nodes": nodes}


def link(node, output):
    return {"link": [node, output]}


GOOD = {"1": {"type": "Const", "inputs": {"value": 2}},
        "2": {"type": "Add", "inputs": {"a": link("1", "value"), "b": 3}},
        "3": {"type": "Show", "inputs": {"value": link("2", "sum")}}}


def test_a_good_workflow_compiles_to_its_ancestors_in_order():
    plan = ng.compile_workflow(ng.workflow.from_json(doc(GOOD)), toy.registry())
    assert [n.id for n in plan.order] == ["1", "2", "3"]
    assert plan.targets == ["3"]


@pytest.mark.parametrize("node, code, input_name", [
    ({"type": "Nope"}, "unknown_node_type", None),
    ({"type": "Const", "inputs": {"value": 1, "colour": 2}}, "unknown_input", "colour"),
    ({"type": "Add", "inputs": {"b": 1}}, "missing_input", "a"),
    ({"type": "Add", "inputs": {"a": link("99", "value")}}, "missing_link_source", "a"),
    ({"type": "Add", "inputs": {"a": link("1", "nope")}}, "missing_link_output", "a"),
    ({"type": "Add", "inputs": {"a": link("t", "text")}}, "type_mismatch", "a"),
    ({"type": "Const", "inputs": {"value": "two"}}, "wrong_type", "value"),
    ({"type": "Const", "inputs": {"value": True}}, "wrong_type", "value"),
    ({"type": "Const", "inputs": {"value": 5000}}, "out_of_range", "value"),
    ({"type": "Scale", "inputs": {"x": link("1", "value"), "factor": 0.3}}, "off_step", "factor"),
    ({"type": "Scale", "inputs": {"x": link("1", "value"), "even": 3}}, "off_step", "even"),
    ({"type": "Words", "inputs": {"mode": "sideways"}}, "not_an_option", "mode"),
    ({"type": "Words", "inputs": {"shout": "yes"}}, "wrong_type", "shout"),
    ({"type": "Add", "inputs": {"a": 5}}, "expects_link", "a"),
])
def test_each_mistake_is_reported_on_its_node_and_input(node, code, input_name):
    nodes = {"1": {"type": "Const", "inputs": {"value": 1}}, "t": {"type": "Words"}, "x": node,
             "out": {"type": "Show", "inputs": {"value": link("1", "value")}}}
    [error] = errors_of(doc(nodes))
    assert (error.code, error.node_id, error.input) == (code, "x", input_name)
    assert error.node_type == node["type"]
    assert error.message


def test_five_independent_mistakes_give_five_errors_from_one_call():
    nodes = {"1": {"type": "Const", "inputs": {"value": "x"}},
             "2": {"type": "Add", "inputs": {"b": 1}},
             "3": {"type": "Words", "inputs": {"mode": "loud"}},
             "4": {"type": "Nope"},
             "5": {"type": "Show", "inputs": {"value": link("77", "value")}}}
    errors = errors_of(doc(nodes))
    assert sorted((e.node_id, e.code) for e in errors) == [
        ("1", "wrong_type"), ("2", "missing_input"), ("3", "not_an_option"), ("4", "unknown_node_type"),
        ("5", "missing_link_source")]


def test_a_cycle_is_reported_naming_its_nodes():
    nodes = {"1": {"type": "Add", "inputs": {"a": link("2", "sum")}},
             "2": {"type": "Add", "inputs": {"a": link("1", "sum")}},
             "3": {"type": "Show", "inputs": {"value": link("2", "sum")}}}
    [error] = errors_of(doc(nodes))
    assert error.code == "cycle" and "1, 2" in error.message


def test_a_self_loop_is_a_cycle():
    nodes = {"1": {"type": "Add", "inputs": {"a": link("1", "sum")}},
             "3": {"type": "Show", "inputs": {"value": link("1", "sum")}}}
    assert [e.code for e in errors_of(doc(nodes))] == ["cycle"]


def test_a_workflow_without_an_output_node_is_refused():
    [error] = errors_of(doc({"1": {"type": "Const"}}))
    assert error.code == "no_outputs"


def test_requesting_a_missing_output_is_an_error():
    assert [e.code for e in errors_of(doc(GOOD), outputs=["42"])] == ["unknown_output"]


def test_widget_defaults_fill_missing_values_and_optional_inputs_may_stay_empty():
    plan = ng.compile_workflow(ng.workflow.from_json(doc({"t": {"type": "Words"}})), toy.registry(), ["t"])
    assert plan.order[0].literals == {"mode": "upper", "text": "hi", "shout": False}


def test_a_widget_can_be_fed_by_a_link_of_its_type():
    nodes = {"1": {"type": "Const", "inputs": {"value": 4}},
             "2": {"type": "Const", "inputs": {"value": link("1", "value")}},
             "3": {"type": "Show", "inputs": {"value": link("2", "value")}}}
    plan = ng.compile_workflow(ng.workflow.from_json(doc(nodes)), toy.registry())
    assert "value" in plan.by_id["2"].links


def test_a_linked_widget_value_is_range_checked_when_it_arrives():
    nodes = {"1": {"type": "Const", "inputs": {"value": 900}},
             "2": {"type": "Add", "inputs": {"a": link("1", "value"), "b": 200}},
             "3": {"type": "Const", "inputs": {"value": link("2", "sum")}},
             "4": {"type": "Show", "inputs": {"value": link("3", "value")}}}
    result = ng.Executor(toy.registry()).run(ng.workflow.from_json(doc(nodes)))
    assert result.nodes["3"].status == "failed"
    assert "1100 is above the maximum 1000" in result.nodes["3"].error["message"]


@pytest.mark.parametrize("text, fragment", [
    ("{", "not valid JSON"),
    ("[]", "JSON object"),
    ('{"format": "other", "version": 1, "nodes": {}}', "not a nodegraph workflow"),
    ('{"format": "nodegraph/workflow", "version": 99, "nodes": {}}', "newer nodegraph"),
    ('{"format": "nodegraph/workflow", "version": 0, "nodes": {}}', "version 0 is no longer supported"),
    ('{"format": "nodegraph/workflow", "version": 1, "nodes": {}, "x": 1}', "unknown top-level key"),
    ('{"format": "nodegraph/workflow", "version": 1, "nodes": {"1": {"inputs": {}}}}', "has no .type"),
    ('{"format": "nodegraph/workflow", "version": 1, "nodes": {"1": {"type": "A", "inputs": {"a": {"link": [1]}}}}}',
     "a link is"),
])
def test_malformed_documents_are_refused_with_a_reason(text, fragment):
    with pytest.raises(ng.WorkflowError, match=fragment.replace("(", r"\(")):
        ng.loads(text)


def test_document_limits_are_enforced_and_configurable():
    nodes = {str(i): {"type": "Const"} for i in range(20)}
    text = json.dumps(doc(nodes))
    with pytest.raises(ng.WorkflowError, match="20 nodes, over the limit of 10"):
        ng.loads(text, Limits(max_nodes=10))
    with pytest.raises(ng.WorkflowError, match="over the limit of 100"):
        ng.loads(text, Limits(max_bytes=100))
    deep = doc({"1": {"type": "Const", "ui": {"a": [[[[[[[[[[1]]]]]]]]]]}}})
    with pytest.raises(ng.WorkflowError, match="nested deeper than 8"):
        ng.loads(json.dumps(deep), Limits(max_depth=8))
    hostile = '{"format": "nodegraph/workflow", "version": 1, "nodes": {}, "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(ng.WorkflowError, match="nested deeper"):
        ng.loads(hostile)


def test_an_old_node_version_is_migrated_or_refused_with_the_reason():
    class Old(ng.Node):
        """Version 2 renamed 'amount' to 'value'."""
        version = 2
        value = ng.Int(default=0)
        outputs = (ng.Output("value", "INT"),)

        @classmethod
        def migrate(cls, from_version, inputs):
            if from_version == 1:
                return {"value": inputs.pop("amount")}
            return super().migrate(from_version, inputs)

        def run(self, ctx, value):
            return value

    registry = ng.Registry([Old])
    ok = ng.workflow.from_json(doc({"1": {"type": "Old", "version": 1, "inputs": {"amount": 7}}}))
    assert ng.compile_workflow(ok, registry, ["1"]).order[0].literals == {"value": 7}
    too_new = ng.workflow.from_json(doc({"1": {"type": "Old", "version": 3, "inputs": {}}}))
    with pytest.raises(ng.ValidationFailed) as info:
        ng.compile_workflow(too_new, registry, ["1"])
    assert info.value.errors[0].code == "node_version_too_new"


def test_node_declarations_are_checked_when_the_class_is_made():
    with pytest.raises(ng.NodeDefinitionError, match="reserved"):
        class Bad(ng.Node):
            version = ng.Int()
    with pytest.raises(ng.NodeDefinitionError, match="does not accept input"):
        class Bad2(ng.Node):
            x = ng.Int()

            def run(self, ctx):
                return None


def test_a_choice_outside_the_options_says_where_choices_come_from():
    folder = ["a.txt"]
    combo = ng.Combo(options=lambda settings: list(folder),
                     missing_hint=lambda settings: f"files are read from {len(folder)} place")
    [problem] = combo.check("b.txt")
    assert problem.code == "not_an_option"
    assert problem.message == "'b.txt' is not one of the choices: 'a.txt' (files are read from 1 place)"
    assert ng.Combo(options=["x"]).check("y")[0].message == "'y' is not one of the choices: 'x'"
    assert combo.check("a.txt") == []
