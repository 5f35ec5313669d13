"""bench/persist_attn.py --cpu-check: the persistent-kernel prototype (NOTES v64) against production's
attention kernel under the Triton interpreter, bit for bit, on uneven lists (CPU, ~10 s)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_persist_prototype_matches_production():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "persist_attn.py"), "--cpu-check"],
                          cwd=os.path.join(ROOT, "bench"), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if "rel-L1 vs production" in ln]
    assert len(lines) == 4, proc.stdout  # every case ran: Q's tile by pointers and by TMA, at each tile and at a row's first
