"""The integration tier: the extension inside a real webui, through its HTTP API.

Opt-in. Either point at a running webui that already has this extension installed:
    SEG_WEBUI_URL=http://127.0.0.1:7860
or let the tests start one (the extension is copied into its extensions/ folder):
    SEG_WEBUI_ROOT=/path/to/stable-diffusion-webui  [SEG_WEBUI_PYTHON=/path/to/venv/bin/python]
    [SEG_WEBUI_ARGS="--ckpt /path/to/model.safetensors ..."]
The webui (A1111 or Forge, told apart by Forge's ``backend/`` folder) must have a (random-weight is
fine) SD1.x checkpoint. Without these variables
every test here is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON_FLAGS = [
    "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
    "--skip-version-check", "--api", "--no-download-sd-model",
]  # fmt: skip
A1111_CPU_FLAGS = ["--use-cpu", "all", "--no-half", "--precision", "full"]
FORGE_CPU_FLAGS = ["--always-cpu", "--disable-nan-check"]


class WebUI:
    def __init__(self, url: str, log: Path | None = None, forge: bool | None = None):
        self.url = url.rstrip("/")
        self.log = log
        if forge is None:  # a running server: Forge has its own options (its cmd-flags route fails)
            status, options = self.get("/sdapi/v1/options")
            forge = status == 200 and any(key.startswith("forge_") for key in options or {})
        self.forge = forge

    def hires_fields(self) -> dict:
        """Forge's API needs these for hires; its second pass uses hr_cfg (default 1 = no CFG)."""
        return {"hr_additional_modules": ["Use same choices"], "hr_cfg": 7} if self.forge else {}

    def request(self, method: str, path: str, payload=None, timeout: float = 600):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, payload):
        return self.request("POST", path, payload)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(webui: WebUI, process: subprocess.Popen, timeout: float) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the webui exited during start-up; see {webui.log}")
        try:
            status, models = webui.get("/sdapi/v1/sd-models")
            # A1111 loads the checkpoint after the server answers; Forge at the first generation
            loaded = webui.forge or "Model loaded" in webui.log.read_text(errors="ignore")
            if status == 200 and models and loaded:
                return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the webui did not come up in {timeout:.0f} s; see {webui.log}")


@pytest.fixture(scope="session")
def webui(tmp_path_factory):
    url = os.environ.get("SEG_WEBUI_URL")
    if url:
        yield WebUI(url)
        return
    root = os.environ.get("SEG_WEBUI_ROOT")
    if not root:
        pytest.skip("integration tier: set SEG_WEBUI_ROOT (or SEG_WEBUI_URL) to run against a real webui")
    root_path = Path(root)
    link = root_path / "extensions" / "sd-webui-seg"
    created_link = False
    if not link.exists():
        # a copy, as "git clone" installs it: Forge's file= route refuses a symlink that leads out
        # of the webui folder, so a linked extension's JavaScript would not load there
        skipped = (".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "out")
        shutil.copytree(ROOT, link, ignore=shutil.ignore_patterns(*skipped))
        created_link = True
    python = os.environ.get("SEG_WEBUI_PYTHON", str(root_path / "venv" / "bin" / "python"))
    port = _free_port()
    log = tmp_path_factory.mktemp("webui") / "webui.log"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    forge = (root_path / "backend").is_dir()
    command = [python, "launch.py", *COMMON_FLAGS, *(FORGE_CPU_FLAGS if forge else A1111_CPU_FLAGS),
               "--port", str(port), *shlex.split(os.environ.get("SEG_WEBUI_ARGS", ""))]  # fmt: skip
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=root_path, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    server = WebUI(f"http://127.0.0.1:{port}", log, forge=forge)
    try:
        _wait(server, process, float(os.environ.get("SEG_WEBUI_START_TIMEOUT", "900")))
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        if created_link:
            shutil.rmtree(link)
