"""The in-process ComfyUI tier: SEG's node on one tiny random-weight model per diffusion-transformer
family (SD3 with an even and an odd latent, Flux dev, Chroma, Qwen-Image, Lumina 2, Wan 2.1 T2V,
Cosmos-Predict2, an SD1.5-like UNet, and HunyuanVideo, which SEG must pass through), built by
ComfyUI's own model configs and sampled by ComfyUI's own sampler code on the CPU, no server and
no downloads. ``comfyui_models_check.py`` does the work in ComfyUI's python and prints one JSON
report; each family here is one test on it.

Opt-in:
    SEG_COMFYUI_ROOT=/path/to/ComfyUI  [SEG_COMFYUI_PYTHON=/path/to/ComfyUI's venv/bin/python]
(the check runs with ComfyUI's folder as working directory and on PYTHONPATH). Without
SEG_COMFYUI_ROOT every test here is skipped with the reason. About a minute on two CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .comfyui_models_check import family_specs

CHECK = Path(__file__).with_name("comfyui_models_check.py")
FAMILIES = list(family_specs())
TIME_LIMIT_S = 300
pytestmark = pytest.mark.webui


@pytest.fixture(scope="module")
def report() -> dict:
    root = os.environ.get("SEG_COMFYUI_ROOT")
    if not root:
        pytest.skip("in-process ComfyUI tier: set SEG_COMFYUI_ROOT (and SEG_COMFYUI_PYTHON, ComfyUI's "
                    "python) to run SEG's node on ComfyUI's own transformer classes")  # fmt: skip
    python = os.environ.get("SEG_COMFYUI_PYTHON", sys.executable)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    try:
        done = subprocess.run([python, str(CHECK)], cwd=root, env=env, capture_output=True, text=True,
                              timeout=TIME_LIMIT_S)  # fmt: skip
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the check ran past {TIME_LIMIT_S} s:\n{(error.stderr or '')[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        pytest.fail(f"the check exited {done.returncode} without a report:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def test_the_check_ran(report):
    assert "error" not in report, report.get("error")
    assert sorted(report["families"]) == sorted(FAMILIES)
    assert report["seconds"] < TIME_LIMIT_S


@pytest.mark.parametrize("family", FAMILIES, ids=lambda name: re.sub(r"\W+", "-", name).strip("-"))
def test_family(report, family):
    entry = report["families"].get(family)
    assert entry is not None, f"no result for {family}: {report.get('error')}"
    if entry["status"] == "skipped":
        pytest.skip(entry.get("reason", "skipped by the check"))
    details = [*entry.get("failures", []), entry.get("traceback", ""), "log:", *entry.get("log", [])]
    assert entry["status"] == "ok", "\n".join(details)
