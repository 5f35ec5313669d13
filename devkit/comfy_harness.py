"""Start and drive a REAL ComfyUI 0.3.75 server (no mocks) for tests, demos and benchmarks.

The server is the copy that scripts/setup.sh extracts to .comfyui/ComfyUI, run with the
project's .venv python in CPU mode, in its own process group, on a free 127.0.0.1 port, with a
throw-away ``--base-directory`` holding::

    custom_nodes/sparge_attention   -> repo root (the node pack; may be absent/broken: not needed)
    custom_nodes/sparge_test_nodes  -> devkit/comfy_test_nodes (SpargeTestConditioning)
    user/default/comfy.settings.json   {"Comfy.TutorialCompleted": true, ...}
    models/diffusion_models/           tiny models (add_model / install_tiny_models=True)
    output/  input/  temp/             ComfyUI's own
    comfyui.log                        server stdout+stderr

Usage::

    from devkit.comfy_harness import ComfyServer, wan21_t2v_graph
    with ComfyServer(install_tiny_models=True) as srv:
        pid = srv.queue(wan21_t2v_graph(srv.tiny_models["wan21"].name, seed=1))
        entry = srv.wait(pid, timeout=60)          # raises ExecutionFailed with the log tail
        files = srv.output_files(entry)            # [Path to output/latents/....latent]

The pytest fixture ``comfy_server`` (tests/comfy/conftest.py) gives a module-scoped server
with the tiny models installed.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
from pathlib import Path

from . import tiny_models
from .tiny_models import COMFY_ROOT, REPO_ROOT, venv_python

TEST_PACK_DIR = Path(__file__).resolve().parent / "comfy_test_nodes"
# The newest graph editor, extracted by scripts/setup.sh (the venv keeps 0.3.75's pinned 1.32.9).
FRONTEND_1_58 = REPO_ROOT / ".comfyui" / "frontend-1.58.1"
PACK_LINK_NAME = "sparge_attention"
TEST_PACK_LINK_NAME = "sparge_test_nodes"


class ComfyError(RuntimeError):
    pass


class ComfyStartupError(ComfyError):
    pass


class PromptRejected(ComfyError):
    """POST /prompt answered non-200 (validation error). ``.status`` and ``.body`` hold the reply."""

    def __init__(self, status, body, log_tail=""):
        self.status = status
        self.body = body
        super().__init__(f"prompt rejected (HTTP {status}): {json.dumps(body, indent=1)[:4000]}\n"
                         f"--- server log tail ---\n{log_tail}")


class ExecutionFailed(ComfyError):
    """The prompt ran and failed. ``.entry`` is the history entry, ``.error`` the execution_error data."""

    def __init__(self, prompt_id, entry, error, log_tail=""):
        self.prompt_id = prompt_id
        self.entry = entry
        self.error = error or {}
        msg = (f"prompt {prompt_id} failed in node {self.error.get('node_id')} "
               f"({self.error.get('node_type')}): {self.error.get('exception_type')}: "
               f"{self.error.get('exception_message')}\n"
               + "".join(self.error.get("traceback") or [])[-4000:]
               + f"\n--- server log tail ---\n{log_tail}")
        super().__init__(msg)


def front_end_args(root) -> list[str]:
    """extra_args that make the server serve the graph editor in `root` (e.g. FRONTEND_1_58)."""
    root = Path(root)
    if not (root / "index.html").is_file():
        raise ComfyStartupError(f"{root}/index.html missing: run `bash scripts/setup.sh` first")
    return ["--front-end-root", str(root)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LIVE = weakref.WeakSet()


@atexit.register
def _kill_leftovers():  # pragma: no cover - safety net if a test run dies
    for srv in list(_LIVE):
        try:
            srv.stop()
        except Exception:
            pass


class ComfyServer:
    """A real ComfyUI server in a subprocess. Use as a context manager or call start()/stop()."""

    def __init__(self, base_dir=None, *, link_pack: bool = True, link_test_pack: bool = True,
                 extra_custom_nodes: dict | None = None, extra_args=(), env: dict | None = None,
                 settings: dict | None = None, install_tiny_models: bool = False,
                 startup_timeout: float = 180.0, keep_dir: bool | None = None, python: str | None = None,
                 comfy_root=None):
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="sparge-comfy-"))
        self.link_pack = link_pack
        self.link_test_pack = link_test_pack
        self.extra_custom_nodes = dict(extra_custom_nodes or {})
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.settings = {"Comfy.TutorialCompleted": True}
        self.settings.update(settings or {})
        self.install_tiny = install_tiny_models
        self.startup_timeout = startup_timeout
        self.keep_dir = (os.environ.get("SPARGE_KEEP_COMFY_DIR") == "1") if keep_dir is None else keep_dir
        self.python = python or venv_python()
        self.comfy_root = Path(comfy_root) if comfy_root else COMFY_ROOT
        self.port = None
        self.proc = None
        self._log_fh = None
        self.tiny_models: dict[str, Path] = {}
        self.startup_seconds = None

    # ----------------------------------------------------------------- paths
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "comfyui.log"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def diffusion_models_dir(self) -> Path:
        return self.models_dir / "diffusion_models"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    # ----------------------------------------------------------------- lifecycle
    def prepare(self) -> None:
        """Lay out the base directory (idempotent); called by start()."""
        main_py = self.comfy_root / "main.py"
        if not main_py.exists():
            raise ComfyStartupError(f"{main_py} missing: run `bash scripts/setup.sh` first")
        self.custom_nodes_dir.mkdir(parents=True, exist_ok=True)
        links = {}
        if self.link_pack:
            links[PACK_LINK_NAME] = REPO_ROOT
        if self.link_test_pack:
            links[TEST_PACK_LINK_NAME] = TEST_PACK_DIR
        links.update({k: Path(v) for k, v in self.extra_custom_nodes.items()})
        for name, target in links.items():
            link = self.custom_nodes_dir / name
            if link.is_symlink() or link.exists():
                if link.is_symlink() and Path(os.readlink(link)) == Path(target):
                    continue
                if link.is_symlink() or link.is_file():
                    link.unlink()
                else:
                    shutil.rmtree(link)
            link.symlink_to(Path(target), target_is_directory=True)
        user_dir = self.base_dir / "user" / "default"
        user_dir.mkdir(parents=True, exist_ok=True)
        settings_file = user_dir / "comfy.settings.json"
        current = {}
        if settings_file.exists():
            try:
                current = json.loads(settings_file.read_text())
            except ValueError:
                current = {}
        current.update(self.settings)
        settings_file.write_text(json.dumps(current, indent=2))
        self.diffusion_models_dir.mkdir(parents=True, exist_ok=True)
        if self.install_tiny:
            self.tiny_models = tiny_models.install_into(self.diffusion_models_dir)

    def command(self) -> list[str]:
        return [self.python, str(self.comfy_root / "main.py"), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--base-directory", str(self.base_dir),
                "--disable-auto-launch", "--disable-api-nodes",
                "--database-url", "sqlite:///:memory:", *self.extra_args]

    def start(self) -> "ComfyServer":
        self.prepare()
        last_err = None
        for _attempt in range(3):
            self.port = free_port()
            try:
                self._spawn_and_wait()
                _LIVE.add(self)
                return self
            except ComfyStartupError as e:
                last_err = e
                self._kill()
                if "address already in use" not in self.log_text().lower():
                    break
        self.stop()
        raise last_err

    def _spawn_and_wait(self) -> None:
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        env.update(self.env)
        if self._log_fh:
            self._log_fh.close()
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"### sparge harness: {' '.join(self.command())}\n".encode())
        self._log_fh.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), cwd=str(self.base_dir), env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = t0 + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise ComfyStartupError(f"ComfyUI exited with {self.proc.returncode} during start-up\n"
                                        f"{self.log_tail(60)}")
            try:
                status, _ = self._request("GET", "/system_stats", timeout=2)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            if time.monotonic() > deadline:
                raise ComfyStartupError(f"ComfyUI did not answer within {self.startup_timeout}s\n"
                                        f"{self.log_tail(60)}")
            time.sleep(0.2)
        status, info = self._request("GET", "/object_info", timeout=max(5.0, deadline - time.monotonic()))
        if status != 200:
            raise ComfyStartupError(f"GET /object_info -> {status}\n{self.log_tail(60)}")
        self._object_info = info
        self.startup_seconds = time.monotonic() - t0

    def _kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = None
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    if pgid is not None:
                        os.killpg(pgid, sig)
                    else:
                        proc.send_signal(sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            # The leader is gone; its children (if any) may still be alive in the group.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc = None

    def stop(self) -> None:
        self._kill()
        _LIVE.discard(self)
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None
        if self._own_dir and not self.keep_dir and self.base_dir.exists():
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ----------------------------------------------------------------- HTTP
    def _request(self, method, path, data=None, timeout=30.0):
        body = None
        headers = {}
        if data is not None:
            body = json.dumps(data).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw = e.read()
            status = e.code
        try:
            return status, (json.loads(raw) if raw else None)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get_json(self, path, timeout=30.0):
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path} -> {status}: {body}")
        return body

    def post_json(self, path, data, timeout=30.0):
        """POST JSON; returns (status, parsed body)."""
        return self._request("POST", path, data, timeout=timeout)

    def object_info(self, node_class: str | None = None, refresh: bool = True) -> dict:
        """GET /object_info (or /object_info/{node_class}: returns that node's dict, {} if unknown)."""
        if node_class:
            info = self.get_json("/object_info/" + urllib.parse.quote(node_class))
            return info.get(node_class, {})
        if refresh or not getattr(self, "_object_info", None):
            self._object_info = self.get_json("/object_info", timeout=120)
        return self._object_info

    def post_prompt_raw(self, prompt: dict, client_id: str | None = None, extra: dict | None = None):
        """POST /prompt; returns (status, json) without raising (for validation-error tests)."""
        payload = {"prompt": prompt, "client_id": client_id or "sparge-tests"}
        payload.update(extra or {})
        return self.post_json("/prompt", payload)

    def queue(self, prompt: dict, client_id: str | None = None, extra: dict | None = None) -> str:
        """Queue an API-format graph; returns the prompt_id. Raises PromptRejected on validation errors."""
        status, body = self.post_prompt_raw(prompt, client_id=client_id, extra=extra)
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            raise PromptRejected(status, body, self.log_tail(40))
        return body["prompt_id"]

    def queue_and_listen(self, prompt: dict, timeout: float = 300.0) -> tuple[str, list]:
        """Queue `prompt` from a websocket client and collect every message the server sends it
        until that prompt's execution_success / execution_error (the last message returned)."""
        import asyncio

        import aiohttp

        client_id = f"sparge-ws-{uuid.uuid4().hex[:8]}"

        async def go():
            messages = []
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                    pid = self.queue(prompt, client_id=client_id)
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline:
                        msg = await ws.receive(timeout=max(1.0, deadline - time.monotonic()))
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue
                        m = json.loads(msg.data)
                        messages.append(m)
                        if m["type"] in ("execution_success", "execution_error") and m["data"].get("prompt_id") == pid:
                            return pid, messages
            raise TimeoutError(f"prompt {pid} did not finish within {timeout} s\n{self.log_tail(40)}")

        return asyncio.run(go())

    def history(self, prompt_id: str | None = None) -> dict:
        return self.get_json("/history" + (f"/{prompt_id}" if prompt_id else ""))

    def queue_state(self) -> dict:
        return self.get_json("/queue")

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.1) -> dict:
        """Wait until prompt_id is in /history; return its entry. Raises ExecutionFailed / TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.history(prompt_id)
            if prompt_id in h:
                entry = h[prompt_id]
                st = entry.get("status") or {}
                if st.get("status_str") == "error" or st.get("completed") is False:
                    err = None
                    for ev, data in st.get("messages", []):
                        if ev in ("execution_error", "execution_interrupted"):
                            err = dict(data, event=ev)
                    raise ExecutionFailed(prompt_id, entry, err, self.log_tail(80))
                return entry
            if not self.is_alive():
                raise ComfyError(f"ComfyUI died while running {prompt_id}\n{self.log_tail(80)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s; queue="
                                   f"{self.queue_state()}\n{self.log_tail(60)}")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """queue() + wait(); returns the history entry."""
        return self.wait(self.queue(prompt), timeout=timeout)

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})

    # ----------------------------------------------------------------- files and logs
    def add_model(self, src, folder: str = "diffusion_models", name: str | None = None) -> str:
        """Hard-link/copy a model file into models/<folder>/; returns the name to use in loaders."""
        src = Path(src)
        dst_dir = self.models_dir / folder
        dst_dir.mkdir(parents=True, exist_ok=True)
        dst = dst_dir / (name or src.name)
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        return dst.name

    def output_files(self, entry: dict) -> list[Path]:
        """Paths of the files a history entry's outputs name (images, latents, gifs, ...)."""
        out = []
        for node_out in (entry.get("outputs") or {}).values():
            for items in node_out.values():
                if not isinstance(items, list):
                    continue
                for it in items:
                    if isinstance(it, dict) and "filename" in it:
                        root = {"output": self.output_dir, "temp": self.base_dir / "temp",
                                "input": self.base_dir / "input"}.get(it.get("type", "output"), self.output_dir)
                        out.append(root / it.get("subfolder", "") / it["filename"])
        return out

    def log_text(self) -> str:
        try:
            if self._log_fh:
                self._log_fh.flush()
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


# --------------------------------------------------------------------------- graph builders

def wan21_t2v_graph(unet_name: str, seed: int = 0, steps: int = 2, width: int = 256, height: int = 256,
                    length: int = 5, tokens: int = 16, cfg: float = 5.0, model_node: tuple | None = None,
                    sampler_name: str = "euler", scheduler: str = "simple", prefix: str = "sparge_wan") -> dict:
    """API graph: UNETLoader -> [model_node] -> KSampler(EmptyHunyuanLatentVideo) -> SaveLatent.

    ``model_node=(class_type, extra_inputs)`` inserts a MODEL->MODEL node (e.g. the pack's patch
    node) between the loader and the sampler as node "10", fed by input name "model".
    cfg > 1 (default 5.0, like Wan workflows) makes ComfyUI run cond and uncond as one batch of 2;
    cfg == 1.0 skips the uncond pass (batch 1).
    """
    return _video_graph(unet_name, seed, steps, width, height, length, cfg, sampler_name, scheduler,
                        prefix, model_node, {"width": tiny_models.WAN21_CONTEXT_DIM, "tokens": tokens,
                                             "seed": seed, "pooled_output": False})


def hunyuan_video_graph(unet_name: str, seed: int = 0, steps: int = 2, width: int = 256, height: int = 256,
                        length: int = 5, tokens: int = 16, cfg: float = 1.0, model_node: tuple | None = None,
                        sampler_name: str = "euler", scheduler: str = "simple",
                        prefix: str = "sparge_hunyuan") -> dict:
    """Same shape as wan21_t2v_graph, with width-256 conditioning and a 768-wide pooled_output.

    Default cfg 1.0 as in HunyuanVideo workflows (guidance is embedded, default 6.0): batch 1.
    """
    return _video_graph(unet_name, seed, steps, width, height, length, cfg, sampler_name, scheduler,
                        prefix, model_node, {"width": tiny_models.HUNYUAN_CONTEXT_DIM, "tokens": tokens,
                                             "seed": seed, "pooled_output": True,
                                             "pooled_width": tiny_models.HUNYUAN_POOLED_DIM})


def _video_graph(unet_name, seed, steps, width, height, length, cfg, sampler_name, scheduler, prefix,
                 model_node, cond_inputs) -> dict:
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "2": {"class_type": "SpargeTestConditioning", "inputs": cond_inputs},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": width, "height": height, "length": length, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
            "scheduler": scheduler, "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    if model_node is not None:
        class_type, extra_inputs = model_node
        g["10"] = {"class_type": class_type, "inputs": dict(extra_inputs or {}, model=["1", 0])}
        g["5"]["inputs"]["model"] = ["10", 0]
    return g


def wan22_two_stage_graph(high_name: str, low_name: str, seed: int = 0, steps: int = 4, switch_at: int = 2,
                          width: int = 256, height: int = 256, length: int = 5, tokens: int = 16,
                          cfg: float = 3.5, model_nodes: tuple | None = None, prefix: str = "sparge_wan22") -> dict:
    """Wan 2.2 style: two UNETLoaders, KSamplerAdvanced high-noise steps [0, switch_at) then low-noise.

    ``model_nodes=(class_type, extra_inputs)`` inserts that MODEL->MODEL node after BOTH loaders
    (nodes "10" and "11").
    """
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": high_name, "weight_dtype": "default"}},
        "7": {"class_type": "UNETLoader", "inputs": {"unet_name": low_name, "weight_dtype": "default"}},
        "2": {"class_type": "SpargeTestConditioning", "inputs": {
            "width": tiny_models.WAN21_CONTEXT_DIM, "tokens": tokens, "seed": seed, "pooled_output": False}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": width, "height": height, "length": length, "batch_size": 1}},
        "5": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "add_noise": "enable", "noise_seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": switch_at,
            "return_with_leftover_noise": "enable"}},
        "8": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["7", 0], "add_noise": "disable", "noise_seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0],
            "latent_image": ["5", 0], "start_at_step": switch_at, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    if model_nodes is not None:
        class_type, extra_inputs = model_nodes
        g["10"] = {"class_type": class_type, "inputs": dict(extra_inputs or {}, model=["1", 0])}
        g["11"] = {"class_type": class_type, "inputs": dict(extra_inputs or {}, model=["7", 0])}
        g["5"]["inputs"]["model"] = ["10", 0]
        g["8"]["inputs"]["model"] = ["11", 0]
    return g


def run_latent_graph(srv, graph, shape=None, timeout=300.0, client_id=None):
    """Queue a graph whose one output is a saved latent and wait for it to succeed: (the latent,
    the Sparge readouts of this prompt in order, its history entry, its prompt id). The latent is
    finite and, with `shape`, of that shape."""
    pid = srv.queue(graph, client_id=client_id)
    entry = srv.wait(pid, timeout=timeout)
    assert entry["status"]["status_str"] == "success", entry["status"]
    files = srv.output_files(entry)
    assert len(files) == 1, entry["outputs"]
    lat = load_latent_file(files[0])
    assert (shape is None or tuple(lat.shape) == tuple(shape)) and bool(lat.isfinite().all()), lat.shape
    readouts = srv.get_json(f"/sparge/readouts?prompt_id={pid}")["readouts"]
    return lat, readouts, entry, pid


def only_readout(readouts, node_id="10"):
    """The one readout of `node_id` among a prompt's readouts."""
    mine = [r for r in readouts if r["node_id"] == node_id]
    assert len(mine) == 1, f"expected one readout from node {node_id}, got {len(mine)}: {readouts}"
    return mine[0]


def load_latent_file(path):
    """Read a SaveLatent .latent file (safetensors, key 'latent_tensor') -> torch tensor."""
    import safetensors.torch

    return safetensors.torch.load_file(str(path))["latent_tensor"]

