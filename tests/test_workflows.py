"""The example workflows in ``workflows/`` (saved in the format ComfyUI's page loads by drag and
drop): their links join existing nodes' slots of matching types, and the SEG node's widgets hold
the node's inputs, in order, at their defaults. ``tests/integration/test_comfyui.py`` runs one in a
real ComfyUI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lib_seg.comfyui import node_inputs

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
NODE = "SmoothedEnergyGuidance"


def test_there_are_examples_for_checkpoints_and_flux():
    assert {path.name for path in WORKFLOWS} >= {"seg-sd-checkpoint.json", "seg-flux.json"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_the_workflow_is_wired_and_holds_the_node_defaults(path):
    workflow = json.loads(path.read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert workflow["last_node_id"] == max(nodes) and workflow["last_link_id"] == len(workflow["links"])
    for link_id, source, slot, target, input_index, kind in workflow["links"]:
        output = nodes[source]["outputs"][slot]
        entry = nodes[target]["inputs"][input_index]
        assert link_id in output["links"] and entry["link"] == link_id
        assert output["type"] == entry["type"] == kind
    unlinked = [(node["type"], entry["name"]) for node in nodes.values() for entry in node.get("inputs", [])
                if entry["link"] is None]  # fmt: skip
    assert not unlinked
    (seg,) = [node for node in nodes.values() if node["type"] == NODE]
    required = node_inputs()["required"]
    defaults = [spec[1]["default"] for name, spec in required.items() if name != "model"]
    assert seg["widgets_values"] == defaults
    assert [entry["name"] for entry in seg["inputs"]] == ["model"] and seg["outputs"][0]["type"] == "MODEL"
    assert any(nodes[link[3]]["type"] == "KSampler" for link in workflow["links"] if link[1] == seg["id"])
