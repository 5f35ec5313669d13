"""Without Triton (a Windows install without triton-windows, a broken Triton): the pack loads, the
node says once what is missing and how to fix it, and the readout says why (issue 15).

Triton is hidden from a child process by devkit/hide_triton/sitecustomize.py (first on
PYTHONPATH): "missing" (ModuleNotFoundError), "broken-import" (found, but its import raises
ImportError from inside, as a Windows DLL that does not load) and "broken-runtime" (its import
raises RuntimeError).

* A REAL ComfyUI server (CPU) per hidden variant: the pack's nodes register, the tiny Wan graph runs
  twice through the Sparge node. The CPU runs the PyTorch reference, which needs no Triton, so the
  calls run sparse; the readout's notes and the log (once per process) say Triton is missing and that
  a CUDA GPU would run dense, with the original error and the fix.
* In a plain child process, every variant: sparge_core's answer (triton_status), an explicit
  backend="triton" refused with that reason, the reference still running; and the node's decision
  for a CUDA device (eligibility.backend_reason("cuda"): dense, "no triton", one warning).
  "broken-runtime" stops at sparge_core: torch._dynamo (and so torchvision, and so ComfyUI 0.3.75
  itself) does not import when Triton raises anything but ImportError; ComfyUI cannot start then.
* On a CUDA machine (skipped here): the node's override on real CUDA tensors without Triton runs
  ComfyUI's attention exactly, counted as "no triton", with the note and one warning.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # devkit, also when run as a script (the child processes below)
from devkit.comfy_harness import ComfyServer, load_latent_file, wan21_t2v_graph  # noqa: E402

HIDER = ROOT / "devkit" / "hide_triton"
PACK_NODES = ("SpargeAttention", "SpargeSparsityMap", "SpargeCalibrate", "LoadSpargeProfile")
REASONS = {  # the original error each variant gives, as the pack must repeat it
    "missing": "ModuleNotFoundError: No module named 'triton'",
    "broken-import": "ImportError: DLL load failed while importing libtriton",
    "broken-runtime": "RuntimeError: triton failed to initialize",
}
ONCE = "Sparge Attention: Triton could not be imported ("  # the start of backend_reason's log line
SPARGE = dict(preset="Custom", mode="topk", simthreshd1=-1.0, cdfthreshd=0.9, topk=0.5, pvthreshd=100.0,
              start_percent=0.0, end_percent=1.0, dense_blocks="", hilbert=True, min_tokens=256, verbose=False)


def hidden_env(mode: str) -> dict:
    pp = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(HIDER) + (os.pathsep + pp if pp else ""), "SPARGE_HIDE_TRITON": mode,
            "TRITON_INTERPRET": "1"}


def run_child(mode: str, what: str) -> tuple[dict, str]:
    """This file as a script in a child process with Triton hidden: (its RESULT json, its stderr)."""
    env = dict(os.environ, **hidden_env(mode))
    p = subprocess.run([sys.executable, __file__, what], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, f"child failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, p.stdout[-3000:]
    return json.loads(line[-1][len("RESULT "):]), p.stderr


# ----------------------------------------------------------------------------- a real ComfyUI server
@pytest.mark.comfy
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["missing", "broken-import"])
def test_comfyui_without_triton(mode):
    with ComfyServer(env=hidden_env(mode), install_tiny_models=True) as srv:
        info = srv.object_info()
        assert all(n in info for n in PACK_NODES), [n for n in PACK_NODES if n not in info]
        failed = [x for x in srv.log_text().splitlines() if "sparge" in x and ("IMPORT FAILED" in x or "Cannot import" in x)]
        assert not failed, failed
        wan = srv.tiny_models["wan21"].name
        for seed in (1, 2):  # two runs in one process: the log says it once, each readout says it
            pid = srv.queue(wan21_t2v_graph(wan, seed=seed, model_node=("SpargeAttention", SPARGE)))
            entry = srv.wait(pid, timeout=240)
            lat = load_latent_file(srv.output_files(entry)[0])
            assert bool(lat.isfinite().all())
            (r,) = srv.get_json(f"/sparge/readouts?prompt_id={pid}")["readouts"]
            assert r["completed"] and r["backend"] == "reference" and r["sparse_calls"] == 4  # 2 blocks x 2 steps
            assert "no triton" not in r["dense_calls"]  # the CPU needed no Triton
            notes = [n for n in r["notes"] if "Triton could not be imported" in n]
            assert len(notes) == 1 and REASONS[mode] in notes[0], r["notes"]
            assert "on a CUDA GPU attention would run dense" in notes[0]
        log = srv.log_text()
        assert log.count(ONCE) == 1, [x for x in log.splitlines() if "Triton" in x]
        line = next(x for x in log.splitlines() if ONCE in x)
        assert REASONS[mode] in line and "Fix: pip install" in line


# ----------------------------------------------------------------------------- a plain child process
@pytest.mark.parametrize("mode", ["missing", "broken-import", "broken-runtime"])
def test_pack_without_triton(mode):
    res, err = run_child(mode, "cpu")
    st = res["status"]
    assert st["available"] is False and REASONS[mode] in st["reason"] and "pip install" in st["fix"]
    assert ("--force-reinstall" in st["fix"]) == (mode != "missing")
    assert res["kernels_error"].startswith(REASONS[mode].split(":")[0])
    assert res["triton_backend_error"].startswith("the Triton backend is not available: " + st["reason"])
    assert res["auto_backend"] == "reference" and res["auto_close"]  # the reference runs, and right
    if mode == "broken-runtime":  # the child stops at sparge_core: ComfyUI itself cannot start (docstring)
        return
    nodes = res["nodes"]
    assert nodes["cuda"] == ["no triton"] * 3 and nodes["cpu"] == [None] * 3
    assert nodes["note_gpu"].startswith("5 calls ran dense ('no triton'): " + st["reason"])
    assert err.count("LOG WARNING " + ONCE) == 1 and err.count(ONCE) == 2, err[-3000:]  # + one INFO for the CPU


def test_with_triton_nothing_is_said(caplog):
    """In this process Triton imports: available, no decision against it, no note, no message
    (so the checks above can fail)."""
    from devkit.pack import load_pack

    load_pack()
    from sparge_attention.nodes import eligibility as E
    from sparge_attention.sparge_core.availability import triton_status

    assert triton_status() == (True, None, None)
    with caplog.at_level("INFO", logger="sparge_attention"):
        assert E.backend_reason("cuda") is None and E.backend_reason("cpu") is None
        assert E.triton_note(0, True) is None and E.triton_note(5, False) is None
    assert not caplog.records


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_override_without_triton_runs_comfy_attention():
    res, err = run_child("missing", "gpu")
    assert res["exact"] and res["dense"] == {"no triton": 3} and res["records"] == 0
    r = res["readout"]
    assert r["backend"] == "none" and r["sparse_calls"] == 0 and r["dense_calls"] == {"no triton": 3}
    assert any(n.startswith("3 calls ran dense ('no triton'): Triton could not be imported") for n in r["notes"])
    assert err.count("LOG WARNING " + ONCE) == 1, err[-3000:]
    api = res["api"]
    assert api["backend"] == "dense" and api["reason"].startswith("Triton could not be imported") and api["close"]


# ----------------------------------------------------------------------------- the child's side
def _child_cpu() -> dict:
    from devkit.pack import load_pack

    load_pack()
    from sparge_attention.kernels import import_error
    from sparge_attention.sparge_core.api import sparge_attention
    from sparge_attention.sparge_core.availability import triton_status
    from sparge_attention.sparge_core.params import SpargeParams

    e = import_error()
    res = {"status": triton_status()._asdict(), "kernels_error": f"{type(e).__name__}: {e}" if e else None}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 64, generator=g) for _ in range(3))
    try:
        sparge_attention(q, k, v, backend="triton")
        res["triton_backend_error"] = None
    except ValueError as err:
        res["triton_backend_error"] = str(err)
    keep_all = SpargeParams.for_mode("cdf", 1.0, simthreshd1=-1.0)
    out, stats = sparge_attention(q, k, v, keep_all, return_stats=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    res["auto_backend"] = stats.backend
    res["auto_close"] = bool((out - ref).abs().max() < 0.05)  # every block kept: exact up to quantization
    if os.environ.get("SPARGE_HIDE_TRITON") != "broken-runtime":
        from sparge_attention.nodes import eligibility as E

        res["nodes"] = {"cuda": [E.backend_reason("cuda") for _ in range(3)],
                        "cpu": [E.backend_reason("cpu") for _ in range(3)],
                        "note_gpu": E.triton_note(5, False)}
    return res


def _child_gpu() -> dict:
    from devkit.pack import load_pack

    load_pack()
    from sparge_attention.nodes.config import SpargeConfig
    from sparge_attention.nodes.override import SpargeOverride
    from sparge_attention.nodes.readout import build_readout
    from sparge_attention.nodes.stats import ForwardContext, RunStats, fold_forward

    B, N, H, D = 2, 2 * 16 * 16, 2, 128

    def sdpa(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kw):
        q, k, v = (t.view(B, -1, heads, D).transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    ov = SpargeOverride(SpargeConfig.from_widgets(**SPARGE), node_id="9")
    ctx = ForwardContext(0, 1.0, 0.0, True, ((2, 16, 16),), None, 0)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, N, H * D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    outs = [ov(sdpa, q, k, v, heads=H, transformer_options={ov.key: ctx}) for _ in range(3)]
    ref = sdpa(q, k, v, heads=H)
    res = {"exact": all(torch.equal(o, ref) for o in outs), "dense": dict(ctx.dense), "records": len(ctx.records)}
    ov.run = RunStats.start(torch.tensor([1.0, 0.0]))
    fold_forward(ov.run, ctx)
    r = build_readout(ov, ov.run)
    res["readout"] = {k: r[k] for k in ("backend", "sparse_calls", "dense_calls", "notes")}
    from sparge_attention.sparge_core.api import sparge_attention  # the API's "auto": dense, with the reason

    qh, kh, vh = (t.view(B, N, H, D).transpose(1, 2) for t in (q, k, v))
    out, st = sparge_attention(qh, kh, vh, return_stats=True)
    ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
    res["api"] = {"backend": st.backend, "reason": st.dense_reason, "close": bool((out - ref).abs().max() < 1e-2)}
    return res


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(levelname)s %(message)s")
    result = _child_gpu() if sys.argv[1:] == ["gpu"] else _child_cpu()
    print("RESULT " + json.dumps(result))
