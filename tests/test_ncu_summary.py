"""bench/ncu_kernels.py --summarize on a slice of a real Nsight Compute export (H100, 2026-12-07,
NOTES v68; tests/ncu_export: the columns it reads, two kernels, 30 SASS lines of the attention
loop): durations in the export's unit turned into us, the stall ratios and the SASS lines where
the samples gather, written as JSON and a table."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ncu_kernels  # noqa: E402

EXPORT = ROOT / "tests" / "ncu_export"


def test_summary_of_a_real_export(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    ncu_kernels.summarize(EXPORT, "H100", "test", note="slice", hot_share=0.05)
    res = json.loads((tmp_path / f"{ncu_kernels.datetime.date.today().isoformat()}-H100-ncu-test.json").read_text())
    attn, quant = res["kernels"]
    assert attn["kernel"] == "_sparse_attn_fwd" and quant["kernel"] == "_quant_pool_kernel"
    # the export gives ms: 7.526816 ms and 0.056992 ms
    assert abs(attn["us"] - 7526.816) < 1e-3 and abs(quant["us"] - 56.992) < 1e-3
    assert attn["registers"] == 165 and quant["registers"] == 102
    assert abs(attn["smem_kb"] - 73.78) < 1e-6 and abs(attn["dram_read_mb"] - 159.42912) < 1e-6  # Kbyte, Mbyte
    assert abs(attn["tensor_pct"] - 44.917) < 0.01 and abs(quant["dram_pct"] - 74.58) < 0.01
    assert abs(attn["stalls_per_issue"]["barrier"] - 1.136) < 1e-3
    assert abs(quant["stalls_per_issue"]["long_scoreboard"] - 4.03) < 0.01
    # in these 30 lines the wait for K's tile (a branch on the mbarrier's try-wait) and the wait for
    # Q.K^T hold most samples, each with its own main stall reason
    hot = res["attention_d1_sass_hot"]
    assert len(hot) == 2, hot
    k_wait, qk_wait = hot  # in code order
    assert " BRA " in k_wait["sass"] and next(iter(k_wait["main_stalls"])) == "long_sb"
    assert k_wait["sass"].startswith("@!P") and qk_wait["sass"].startswith("WARPGROUP.DEPBAR")
    assert next(iter(qk_wait["main_stalls"])) == "barrier"
    assert all(h["share"] >= 0.05 for h in hot)
    log = (tmp_path / f"{ncu_kernels.datetime.date.today().isoformat()}-H100-ncu-test.log").read_text()
    assert "_sparse_attn_fwd" in log and "WARPGROUP.DEPBAR" in log


def test_figures_in_the_unit_their_names_say():
    """ncu picks each column's unit by the figure's size: the summary converts to its names' units."""
    assert abs(ncu_kernels._in_unit("dram_read_mb", 1.5, "Gbyte") - 1500.0) < 1e-9
    assert abs(ncu_kernels._in_unit("smem_kb", 73780.0, "byte/block") - 73.78) < 1e-9
    assert abs(ncu_kernels._in_unit("us", 7.5, "ms") - 7500.0) < 1e-9
    assert ncu_kernels._in_unit("tensor_pct", 44.9, "%") == 44.9
    with pytest.raises(ValueError, match="cycle"):  # an unknown unit is not taken as the name's
        ncu_kernels._in_unit("us", 1.0, "cycle")
