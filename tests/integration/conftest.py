"""The integration tier: the extension inside a real webui, through its HTTP API.

Opt-in. Either point at a running webui that already has this extension installed:
    SEG_WEBUI_URL=http://127.0.0.1:7860
or let the tests start one (the extension is copied into its extensions/ folder):
    SEG_WEBUI_ROOT=/path/to/stable-diffusion-webui  [SEG_WEBUI_PYTHON=/path/to/venv/bin/python]
    [SEG_WEBUI_ARGS="--ckpt /path/to/model.safetensors ..."]
The webui (A1111, or one of the Forge family: Forge with its ``backend/`` folder, reForge or Forge
Classic with ``ldm_patched/``; all three have ``modules_forge/``; Forge Neo is a ``backend/`` webui
told apart from lllyasviel's Forge by its flags: ``--cpu``, no ``--always-cpu``) must have a
(random-weight is fine) SD1.x checkpoint. Without these variables every test here is skipped with
the reason.
"""

from __future__ import annotations

import json
import os
import re
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
# Forge Neo: no --always-cpu/--disable-nan-check/--no-download-sd-model (its parser refuses unknown
# flags); --no-hashing spares hashing every checkpoint at load
NEO_CPU_FLAGS = ["--cpu", "--no-hashing", "--skip-python-version-check"]


FORGE, LDM_PATCHED = "forge", "ldm_patched"


class WebUI:
    def __init__(self, url: str, log: Path | None = None, backend: str | None = None, neo: bool = False):
        """``backend``: None for A1111, ``"forge"`` (``backend/``: lllyasviel's Forge and Forge Neo)
        or ``"ldm_patched"`` (reForge, Forge Classic); ``neo``: Forge Neo. For a running server both
        are told from its options (Forge's own have a ``forge_`` prefix, only the ``backend/``
        webuis have ``forge_additional_modules``, and only Neo has ``VERSION_UID``)."""
        self.url = url.rstrip("/")
        self.log = log
        self._options: set[str] | None = None
        self._request_fields: set[str] | None = None
        if log is None:
            options = self.options()
            if "forge_additional_modules" in options:
                backend = FORGE
            elif any(key.startswith("forge_") for key in options):
                backend = LDM_PATCHED
            neo = backend == FORGE and "VERSION_UID" in options
        self.backend = backend
        self.forge = backend is not None  # the Forge family: SEG runs as a post-CFG function
        self.neo = neo
        # a live preview that needs no download (Neo has no "Approx cheap"; its default is "RGB")
        self.offline_preview = "RGB" if neo else "Approx cheap"

    def options(self) -> set[str]:
        if self._options is None:
            status, options = self.get("/sdapi/v1/options")
            self._options = set(options or {}) if status == 200 else set()
        return self._options

    def request_fields(self) -> set[str]:
        """The txt2img request's fields, from the webui's OpenAPI schema."""
        if self._request_fields is None:
            status, schema = self.get("/openapi.json")
            models = (schema or {}).get("components", {}).get("schemas", {}) if status == 200 else {}
            model = next((m for name, m in models.items() if "txt2img" in name.lower()), {})
            self._request_fields = set(model.get("properties", {}))
        return self._request_fields

    def hires_fields(self) -> dict:
        """Forge's API needs these for hires; its second pass uses hr_cfg (default 1 = no CFG)."""
        fields = {"hr_additional_modules": ["Use same choices"], "hr_cfg": 7}
        return {name: value for name, value in fields.items() if name in self.request_fields()}

    def upscaler(self, wanted: str) -> str:
        """The hires upscaler to send for ``wanted``. Neo has no latent upscale modes and lists no
        Lanczos/Nearest; its model upscalers download weights: offline, "None" (a plain resize)."""
        if not self.neo:
            return wanted
        names = set()
        for path in ("/sdapi/v1/upscalers", "/sdapi/v1/latent-upscale-modes"):
            status, listed = self.get(path)
            if status == 200:
                names |= {item.get("name") for item in listed or [] if isinstance(item, dict)}
        return wanted if wanted in names else "None"

    def request(self, method: str, path: str, payload=None, timeout: float | None = None):
        # a full-size transformer on a CPU takes minutes per image
        timeout = timeout or float(os.environ.get("SEG_WEBUI_REQUEST_TIMEOUT", "600"))
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
            # A1111 loads the checkpoint after the server answers; the Forge family at the first
            # generation, but runs always-on scripts without arguments until start-up is over
            text = webui.log.read_text(errors="ignore")
            loaded = "Startup time" in text if webui.forge else "Model loaded" in text
            if status == 200 and models and loaded:
                return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the webui did not come up in {timeout:.0f} s; see {webui.log}")


def _source(root: Path, *parts: str) -> str:
    path = root.joinpath(*parts)
    return path.read_text(errors="ignore") if path.is_file() else ""


def _offers(root: Path, flag: str) -> bool:
    """Whether the webui's own argument parser (modules/cmd_args.py) has ``flag``."""
    return f'"{flag}"' in _source(root, "modules", "cmd_args.py")


def _is_neo(root: Path) -> bool:
    """Forge Neo: a ``backend/`` webui whose device flags are ``--cpu`` etc., not ``--always-cpu``."""
    args = _source(root, "backend", "args.py")
    return '"--cpu"' in args and '"--always-cpu"' not in args


def _prepare_neo(root: Path) -> None:
    """Neo stops at an input() prompt unless config.json carries its current VERSION_UID."""
    found = re.search(r'VERSION_UID\b[^=\n]*=\s*"([^"]+)"', _source(root, "modules", "launch_utils.py"))
    if not found:
        return
    config_path = root / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("VERSION_UID") != found.group(1):
        config["VERSION_UID"] = found.group(1)
        config_path.write_text(json.dumps(config, indent=4))


# settings the tier sends as override_settings: the webui restores an override afterwards only for
# keys already in config.json (A1111's rule, kept by Neo), so a fresh config.json lets one leak
OVERRIDDEN_OPTIONS = ("skip_early_cond", "batch_cond_uncond", "pad_cond_uncond", "show_progress_type")


def _pin_overridden_options(server: WebUI) -> None:
    """Write the current values of the overridden settings into config.json (a fresh Neo has none)."""
    status, options = server.get("/sdapi/v1/options")
    if status == 200 and options:
        pinned = {key: options[key] for key in OVERRIDDEN_OPTIONS if key in options}
        if pinned:
            server.post("/sdapi/v1/options", pinned)


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
    backend = None
    if (root_path / "modules_forge").is_dir():
        backend = FORGE if (root_path / "backend").is_dir() else LDM_PATCHED
    neo = backend == FORGE and _is_neo(root_path)
    if neo:
        _prepare_neo(root_path)
        flags = [flag for flag in COMMON_FLAGS if _offers(root_path, flag)] + NEO_CPU_FLAGS
    else:
        flags = [*COMMON_FLAGS, *(FORGE_CPU_FLAGS if backend else A1111_CPU_FLAGS)]
    extra = shlex.split(os.environ.get("SEG_WEBUI_ARGS", ""))
    command = [python, "launch.py", *flags, "--port", str(port), *extra]
    with open(log, "w") as log_file:
        # no stdin: a webui that asks a question (Neo's "Press Enter") ends instead of waiting
        process = subprocess.Popen(command, cwd=root_path, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    server = WebUI(f"http://127.0.0.1:{port}", log, backend=backend, neo=neo)
    try:
        _wait(server, process, float(os.environ.get("SEG_WEBUI_START_TIMEOUT", "900")))
        if neo:
            _pin_overridden_options(server)
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        if created_link:
            shutil.rmtree(link)
