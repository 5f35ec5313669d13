"""bench/goals.py: each of issue 14's goals finds a figure in bench/results, from production's files
only (the newest of its kind with a plain version tag), and the met column follows the figure."""
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import goals  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")


def test_every_goal_has_a_figure_in_the_results():
    rows = goals.goal_rows(goals.Path(RESULTS))
    assert len(rows) == len(goals.GOALS)
    for r in rows:
        assert r["figure"] is not None and r["file"], r["goal"]
        assert r["figure"] > 0, r
        op, target = r["target"].split()
        assert r["met"] == goals.MEETS[op](r["figure"], float(target))


def test_newest_plain_tag_wins_over_other_trees_and_older_versions(tmp_path):
    src = os.path.join(RESULTS, "2026-12-06-H100-fill_cost-v44.json")
    for name in ("2026-12-06-H100-fill_cost-v43.json", "2026-12-06-H100-fill_cost-v44.json",
                 "2026-12-06-H100-fill_cost-base-v45.json", "2026-12-07-H200-fill_cost-nocap-v46.json",
                 "2026-12-05-H200-fill_cost-v47.json"):
        shutil.copy(src, tmp_path / name)
    path, date, card = goals.newest(tmp_path, "fill_cost")
    assert path.name == "2026-12-06-H100-fill_cost-v44.json" and (date, card) == ("2026-12-06", "H100")
    assert goals.newest(tmp_path, "fill_cost", card="H200")[0].name == "2026-12-05-H200-fill_cost-v47.json"
    assert goals.newest(tmp_path, "realistic") is None


def test_a_figure_past_its_goal_is_not_met(tmp_path):
    d = json.loads(open(os.path.join(RESULTS, "2026-12-06-H100-fill_cost-v44.json")).read())
    for shape in d["shapes"].values():
        for row in shape["rows"]:
            row["x_cudnn"] = 0.01
    (tmp_path / "2026-12-08-H100-fill_cost-v50.json").write_text(json.dumps(d))
    rows = {r["goal"]: r for r in goals.goal_rows(tmp_path)}
    assert rows["prediction + quantization, Wan 480p"]["met"] is True
    assert rows["prediction + quantization, HunyuanVideo 544p"]["met"] is True
    assert rows["whole call at rel-L1 0.05, Wan 480p"]["figure"] is None


def test_the_kernel_goal_takes_the_paired_ratio_where_a_file_has_it(tmp_path):
    d = json.loads(open(os.path.join(RESULTS, "2026-12-06-H100-variants-v44c.json")).read())
    for shape in d["shapes"].values():
        for row in shape["rows"]:
            row["x_cudnn"], row["x_paired"] = 0.01, 5.0
    (tmp_path / "2026-12-08-H100-variants-v50.json").write_text(json.dumps(d))
    rows = {r["goal"]: r for r in goals.goal_rows(tmp_path)}
    assert rows["kernel at a mask, density 0.1, wan480"]["figure"] == 5.0
    assert rows["kernel at a mask, density 0.1, wan480"]["met"] is False
    for shape in d["shapes"].values():
        for row in shape["rows"]:
            del row["x_paired"]
    (tmp_path / "2026-12-08-H100-variants-v50.json").write_text(json.dumps(d))
    assert {r["goal"]: r for r in goals.goal_rows(tmp_path)}["kernel at a mask, density 0.1, wan480"]["figure"] == 0.01


def test_an_e2e_file_without_a_setting_gives_no_figure(tmp_path):
    """Files written before a row existed (the fixed setting run unmeasured) give no figure for it, not an error."""
    d = json.loads(open(os.path.join(RESULTS, "2026-12-06-H100-e2e_adapt-30-async-v44b.json")).read())
    assert all(r["setting"] != "Balanced fixed, unmeasured" for r in d["rows"])
    (tmp_path / "2026-12-08-H100-e2e_adapt-30-async-v50.json").write_text(json.dumps(d))
    rows = {r["goal"]: r for r in goals.goal_rows(tmp_path)}
    row = rows["e2e Wan 1.3B 480p, Balanced fixed as run (no measurement)"]
    assert row["figure"] is None and row["met"] is None and row["file"]
    assert rows["e2e Wan 1.3B 480p, Balanced fixed (realistic rel-L1 0.046)"]["figure"] > 2
