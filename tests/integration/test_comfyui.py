"""The ComfyUI tier: this repository as a custom-node package inside a real ComfyUI, through its
HTTP API (``/object_info``, ``/prompt``, ``/history``, ``/view``).

Opt-in. Either point at a running ComfyUI that already has this repository in ``custom_nodes/``:
    SEG_COMFYUI_URL=http://127.0.0.1:8188
or let the tests start one (the repository is copied into its ``custom_nodes/`` folder and removed
after; started as ``main.py --cpu --listen 127.0.0.1 --disable-metadata``):
    SEG_COMFYUI_ROOT=/path/to/ComfyUI  [SEG_COMFYUI_PYTHON=/path/to/venv/bin/python]
Models (random weights are fine), by their names in ComfyUI's model folders:
    SEG_COMFYUI_SD15 (checkpoints/, default rand-sd15.safetensors)
    SEG_COMFYUI_SDXL (checkpoints/; SDXL tests skip without it)
    SEG_COMFYUI_FLUX=unet,clip_l,t5xxl,vae (diffusion_models/, text_encoders/, vae/; Flux tests skip
    without it) [SEG_COMFYUI_FLUX_DTYPE=fp8_e4m3fn: the UNETLoader's weight_dtype, Chroma's too]
    SEG_COMFYUI_CHROMA=unet,t5xxl,vae (Chroma tests skip without it)
Without SEG_COMFYUI_URL or SEG_COMFYUI_ROOT every test here is skipped with the reason.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from .conftest import _free_port

ROOT = Path(__file__).resolve().parents[2]
NODE = "SmoothedEnergyGuidance"
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", ".pytest_cache", "out", "*.png")
pytestmark = pytest.mark.webui


class ComfyUI:
    def __init__(self, url: str, log: Path | None = None):
        self.url = url.rstrip("/")
        self.log = log

    def request(self, method: str, path: str, body=None, timeout=60):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return response.status, raw
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def json(self, method: str, path: str, body=None):
        status, raw = self.request(method, path, body)
        return status, json.loads(raw) if raw else None

    def queue(self, prompt: dict) -> tuple[int, dict]:
        return self.json("POST", "/prompt", {"prompt": prompt, "client_id": "seg-tests"})

    def run(self, prompt: dict, timeout: float = 1800.0) -> list:
        """Queue ``prompt``, wait for it; the pixels of every image it saved (a list per image)."""
        status, answer = self.queue(prompt)
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, history = self.json("GET", f"/history/{prompt_id}")
            entry = (history or {}).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                assert entry["status"].get("status_str") == "success", entry["status"]
                return [self.image(image) for output in entry["outputs"].values()
                        for image in output.get("images", [])]  # fmt: skip
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s")

    def image(self, image: dict):
        from PIL import Image

        fields = {key: image.get(key, default) for key, default in
                  (("filename", ""), ("subfolder", ""), ("type", "output"))}  # fmt: skip
        query = urllib.parse.urlencode(fields)
        status, raw = self.request("GET", f"/view?{query}")
        assert status == 200
        return list(Image.open(io.BytesIO(raw)).convert("RGB").getdata())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None else ""

    def free(self) -> None:
        """Unload every model (one family at a time fits a small machine)."""
        self.request("POST", "/free", {"unload_models": True, "free_memory": True})


@pytest.fixture(scope="module")
def comfyui():
    url = os.environ.get("SEG_COMFYUI_URL")
    if url:
        yield ComfyUI(url)
        return
    root = os.environ.get("SEG_COMFYUI_ROOT")
    if not root:
        pytest.skip("ComfyUI tier: set SEG_COMFYUI_ROOT (or SEG_COMFYUI_URL) to run against a real ComfyUI")
    root_path = Path(root)
    python = os.environ.get("SEG_COMFYUI_PYTHON", "python3")
    installed = root_path / "custom_nodes" / f"sd-webui-seg-tests-{uuid.uuid4().hex[:6]}"
    shutil.copytree(ROOT, installed, ignore=COPY_IGNORE)
    scratch = Path(tempfile.mkdtemp(prefix="seg-comfyui-"))
    log = scratch / "comfyui.log"
    port = _free_port()
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-metadata",
               "--output-directory", str(scratch / "output")]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=root_path, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    server = ComfyUI(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited at start:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                if server.request("GET", "/system_stats", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            pytest.fail("ComfyUI did not answer within 600 s")
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(installed, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


# -- workflows (API format) ------------------------------------------------------------------------
def seg_node(model_link, **values) -> dict:
    inputs = {"scale": 3.0, "sigma": -1.0, "branch": "uncond", "blocks": "middle", "start_percent": 0.0,
              "end_percent": 1.0, **values, "model": model_link}  # fmt: skip
    return {"class_type": NODE, "inputs": inputs}


def sampled(loaders: dict, model, vae, positive, negative, latent, seed: int, steps: int, cfg: float,
            scheduler: str, seg: dict | None) -> dict:
    """``loaders`` (the nodes up to the conditioning and the empty latent) completed by the SEG node
    when ``seg`` is given, a KSampler, the VAE decode and the save."""
    prompt = dict(loaders)
    if seg is not None:
        prompt["seg"] = seg_node(model, **seg)
        model = ["seg", 0]
    prompt["sampler"] = {"class_type": "KSampler", "inputs": {
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": scheduler,
        "denoise": 1.0, "model": model, "positive": positive, "negative": negative, "latent_image": latent}}
    prompt["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": vae}}
    prompt["save"] = {"class_type": "SaveImage",
                      "inputs": {"filename_prefix": "seg", "images": ["decode", 0]}}
    return prompt  # fmt: skip


def checkpoint_workflow(checkpoint: str, size: int, steps: int, seed: int = 1, seg: dict | None = None):
    loaders = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in a forest", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
    }
    return sampled(loaders, ["1", 0], ["1", 2], ["2", 0], ["3", 0], ["4", 0], seed, steps, 5.0, "normal", seg)


def t5_loaders(clip_loader: dict, unet: str, vae: str) -> dict:
    """A transformer's UNETLoader, text encoder (T5 unpadded, as short prompts need) and VAE."""
    dtype = os.environ.get("SEG_COMFYUI_FLUX_DTYPE", "default")
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": dtype}},
        "2": clip_loader,
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "11": {"class_type": "T5TokenizerOptions",
               "inputs": {"clip": ["2", 0], "min_padding": 0, "min_length": 0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in a forest", "clip": ["11", 0]}},
    }  # fmt: skip


def flux_workflow(seed: int = 1, seg: dict | None = None) -> dict:
    unet, clip_l, t5, vae = os.environ["SEG_COMFYUI_FLUX"].split(",")
    clip = {"class_type": "DualCLIPLoader",
            "inputs": {"clip_name1": clip_l, "clip_name2": t5, "type": "flux"}}
    loaders = {
        **t5_loaders(clip, unet, vae),
        "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}},
        "6": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }  # fmt: skip
    return sampled(loaders, ["1", 0], ["3", 0], ["5", 0], ["6", 0], ["7", 0], seed, 1, 1.0, "simple", seg)


def chroma_workflow(seed: int = 1, seg: dict | None = None) -> dict:
    """Chroma at CFG 3 with a negative prompt, on an odd latent (9 × 7: a padded 5 × 4 token grid)."""
    unet, t5, vae = os.environ["SEG_COMFYUI_CHROMA"].split(",")
    clip = {"class_type": "CLIPLoader", "inputs": {"clip_name": t5, "type": "chroma"}}
    loaders = {
        **t5_loaders(clip, unet, vae),
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["11", 0]}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 72, "height": 56, "batch_size": 1}},
    }  # fmt: skip
    return sampled(loaders, ["1", 0], ["3", 0], ["4", 0], ["5", 0], ["7", 0], seed, 1, 3.0, "simple", seg)


def sd15() -> str:
    return os.environ.get("SEG_COMFYUI_SD15", "rand-sd15.safetensors")


def guided_lines(server: ComfyUI, since: int) -> list[str]:
    return [line for line in server.log_text()[since:].splitlines() if "guided evaluations" in line]


# -- tests ---------------------------------------------------------------------------------------------
def test_the_node_is_registered_with_its_inputs(comfyui):
    status, info = comfyui.json("GET", f"/object_info/{NODE}")
    assert status == 200 and NODE in info, info
    node = info[NODE]
    assert node["display_name"] == "Smoothed Energy Guidance"
    assert node["category"] == "model_patches" and node["output"] == ["MODEL"]
    required = node["input"]["required"]
    assert list(required) == ["model", "scale", "sigma", "branch", "blocks", "start_percent", "end_percent"]
    assert required["scale"][1]["default"] == 3.0 and required["sigma"][1]["default"] == -1.0
    assert "inf" in required["sigma"][1]["tooltip"]


def test_sd15_off_scale_zero_on_and_reproducible(comfyui):
    comfyui.free()
    off = comfyui.run(checkpoint_workflow(sd15(), 128, 2))
    assert comfyui.run(checkpoint_workflow(sd15(), 128, 2, seg={"scale": 0.0})) == off
    mark = len(comfyui.log_text())
    on = comfyui.run(checkpoint_workflow(sd15(), 128, 2, seg={}))
    assert on != off
    if comfyui.log is not None:
        assert guided_lines(comfyui, mark) == ["SEG: 2 guided evaluations (shared-prefix: 2)"]
    comfyui.run(checkpoint_workflow(sd15(), 128, 2, seed=2, seg={}))  # another graph: nothing cached
    assert comfyui.run(checkpoint_workflow(sd15(), 128, 2, seg={})) == on
    assert comfyui.run(checkpoint_workflow(sd15(), 128, 2, seg={"sigma": 2.0, "blocks": "input 4-5"})) != on


def test_bad_values_give_a_clean_message(comfyui):
    status, answer = comfyui.queue(checkpoint_workflow(sd15(), 128, 2, seg={"sigma": "wide"}))
    assert status == 400 and "sigma" in json.dumps(answer)  # ComfyUI's own input validation
    status, answer = comfyui.queue(checkpoint_workflow(sd15(), 128, 2, seg={"scale": 99.0}))
    assert status == 400 and "scale" in json.dumps(answer)
    off = comfyui.run(checkpoint_workflow(sd15(), 128, 2, seed=3))
    mark = len(comfyui.log_text())
    assert comfyui.run(checkpoint_workflow(sd15(), 128, 2, seed=3, seg={"blocks": "sideways 3"})) == off
    assert comfyui.run(checkpoint_workflow(sd15(), 128, 2, seed=3, seg={"blocks": "double 7-9"})) == off
    if comfyui.log is not None:
        log = comfyui.log_text()[mark:]
        assert "SEG setting 'blocks'" in log and "match no self-attention in this UNet" in log


def test_sdxl(comfyui):
    checkpoint = os.environ.get("SEG_COMFYUI_SDXL")
    if not checkpoint:
        pytest.skip("set SEG_COMFYUI_SDXL to an SDXL checkpoint's name")
    comfyui.free()
    off = comfyui.run(checkpoint_workflow(checkpoint, 128, 2))
    assert comfyui.run(checkpoint_workflow(checkpoint, 128, 2, seg={"scale": 0.0})) == off
    mark = len(comfyui.log_text())
    on = comfyui.run(checkpoint_workflow(checkpoint, 128, 2, seg={}))
    assert on != off
    if comfyui.log is not None:
        assert guided_lines(comfyui, mark) == ["SEG: 2 guided evaluations (shared-prefix: 2)"]
    comfyui.free()


def test_flux_one_step(comfyui):
    if not os.environ.get("SEG_COMFYUI_FLUX"):
        pytest.skip("set SEG_COMFYUI_FLUX=unet,clip_l,t5xxl,vae (names in ComfyUI's model folders)")
    comfyui.free()
    off = comfyui.run(flux_workflow())
    mark = len(comfyui.log_text())
    on = comfyui.run(flux_workflow(seg={}))
    assert on != off
    if comfyui.log is not None:
        log = comfyui.log_text()[mark:]
        assert "Flux blocks: double_blocks.7, double_blocks.8, double_blocks.9" in log
        assert guided_lines(comfyui, mark) == ["SEG: 1 guided evaluations (shared-prefix: 1)"]
    assert comfyui.run(flux_workflow(seg={"scale": 0.0})) == off
    comfyui.free()


def test_chroma_with_cfg_and_an_odd_latent(comfyui):
    if not os.environ.get("SEG_COMFYUI_CHROMA"):
        pytest.skip("set SEG_COMFYUI_CHROMA=unet,t5xxl,vae (names in ComfyUI's model folders)")
    comfyui.free()
    off = comfyui.run(chroma_workflow())
    mark = len(comfyui.log_text())
    on = comfyui.run(chroma_workflow(seg={"sigma": 2.0}))
    assert on != off
    if comfyui.log is not None:
        assert "Chroma blocks" in comfyui.log_text()[mark:]
        assert guided_lines(comfyui, mark) == ["SEG: 1 guided evaluations (shared-prefix: 1)"]
    assert comfyui.run(chroma_workflow(seg={"scale": 0.0})) == off
    comfyui.free()


# -- the example workflow a user drags in ---------------------------------------------------------------
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def api_prompt(workflow: dict, object_info: dict) -> dict:
    """A workflow saved by ComfyUI's page (nodes with ``widgets_values``, links) in the API format
    ``/prompt`` takes: widget values in the order of the node's inputs (a seed's "control after
    generate" value skipped), links as ``[node id, output slot]``."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        declared = object_info[node["type"]]["input"]
        linked = {entry["name"]: entry["link"] for entry in node.get("inputs", [])
                  if entry.get("link") is not None}  # fmt: skip
        values = iter(node.get("widgets_values", []))
        inputs = {}
        for name, spec in {**declared.get("required", {}), **declared.get("optional", {})}.items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
            elif isinstance(kind, list) or kind in WIDGET_KINDS:
                inputs[name] = next(values)
                if options.get("control_after_generate"):
                    next(values)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_the_example_workflow_runs_as_saved(comfyui):
    workflow = json.loads((ROOT / "workflows" / "seg-sd-checkpoint.json").read_text())
    status, info = comfyui.json("GET", "/object_info")
    assert status == 200
    prompt = api_prompt(workflow, info)
    seg = next(node for node in prompt.values() if node["class_type"] == NODE)
    assert seg["inputs"]["scale"] == 3.0 and seg["inputs"]["blocks"] == "middle"
    for node in prompt.values():  # the test's model, small and fast
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = sd15()
        elif node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=128, height=128)
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    comfyui.free()
    on = comfyui.run(prompt)
    seg["inputs"]["scale"] = 0.0
    assert comfyui.run(prompt) != on
