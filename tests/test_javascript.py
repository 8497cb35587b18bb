"""The UI script's pure helpers, run under node when it is installed."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "javascript" / "sd_webui_seg.js"


def run_node(expression: str):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    code = f"const m = require({json.dumps(str(SCRIPT))}); console.log(JSON.stringify({expression}));"
    return json.loads(subprocess.run([node, "-e", code], capture_output=True, text=True, check=True).stdout)


def test_hires_fields_only_for_custom():
    assert run_node("['same','off','custom'].map(m.segHiresFieldsVisible)") == [False, False, True]


def test_sigma_hints():
    hints = run_node("['inf','10','-1','0.1','abc','-3',''].map(m.segSigmaProblem)")
    assert hints[:2] == ["", ""] and hints[2] == ""
    assert "nothing" in hints[3] and "number" in hints[4] and "inf" in hints[5] and "number" in hints[6]
