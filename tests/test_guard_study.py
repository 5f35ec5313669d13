"""bench/guard_study.py --quick: the guard construction and the study's bookkeeping (CPU, ~10 s)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_guard_study_quick(tmp_path):
    out = tmp_path / "guard.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "guard_study.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    # guarding every key block (mask all kept, every fill bias -inf) is exactly the keep-all result,
    # checked on a case whose unguarded mask does skip blocks
    assert res["identity"]["equal"] is True
    assert res["identity"]["sparse_density"] < 1.0
    import guard_study

    assert set(res["regimes"]) == set(guard_study.STUDY_REGIMES)
    for regime in guard_study.STUDY_REGIMES:  # one table per regime, one row per guard, in the log
        assert any(line.startswith(f"== {regime} seed") for line in res["log"]), regime
        assert set(res["gains"]["text"]) >= {regime}
        for s in res["regimes"][regime]:
            text_cost = s["guard_cost"]["text"]
            assert (text_cost > 0) == (s["n_text"] > 0), (regime, text_cost)
            assert set(s["compare"]) == set(guard_study.GUARDS)
            for name, curve in s["curves"].items():  # a guard only adds kept blocks
                for c, b in zip(curve, s["curves"]["none"]):
                    assert c["density"] >= b["density"] - 1e-9, (regime, name)
    assert set(res["verdict"]) == set(guard_study.GUARDS)
