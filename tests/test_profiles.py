"""SpargeProfile: safetensors round trip, per-layer params, and refusal of bad files (never unpickled)."""
import json
import math
import os
import pickle
import struct

from devkit.pack import load_pack

load_pack()

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sparge_attention.sparge_core import SpargeParams, sparge_attention  # noqa: E402
from sparge_attention.sparge_core.calibrate import Calibrator  # noqa: E402
from sparge_attention.sparge_core.profiles import SpargeProfile  # noqa: E402

L, H = 3, 4


def make_profile(mode="cdf", **over) -> SpargeProfile:
    g = torch.Generator()
    g.manual_seed(0)
    thr = 0.8 + 0.19 * torch.rand(L, H, generator=g)
    dense = torch.zeros(L, H, dtype=torch.bool)
    dense[1, 2] = True
    thr[1, 2] = 1.0
    calibrated = torch.tensor([True, True, False])
    dense[2] = True  # layer 2 never calibrated
    hs = torch.where(dense, 0.0, 0.3 + 0.5 * torch.rand(L, H, generator=g))
    kw = dict(
        mode=mode, scoring="lse", threshold=thr, simthreshd1=torch.where(dense, 1.0, -1.0 * torch.ones(L, H)),
        pvthreshd=torch.full((L, H), math.inf), dense=dense, calibrated=calibrated, head_sparsity=hs,
        head_rel_l1=torch.full((L, H), 0.04), sparsity=hs.mean(1), rel_l1=torch.tensor([0.041, 0.039, 0.0]),
        rel_l1_worst=torch.tensor([0.048, 0.045, 0.0]), model_family="wan2.1-t2v-1.3b", n_tokens=32760,
        grid=(21, 30, 52), target_l1=0.05, steps=30, calls=1800, pv_dtype="fp8",
    )
    kw.update(over)
    return SpargeProfile(**kw)


def rewrite(src, dst, tensors=None, meta=None, drop=(), drop_meta=()):
    """Copy a profile file with edited tensors / metadata (for the bad-file tests)."""
    t = load_file(src)
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        m = json.loads(f.read(n))["__metadata__"]
    t.update(tensors or {})
    m.update(meta or {})
    for k in drop:
        t.pop(k)
    for k in drop_meta:
        m.pop(k)
    save_file(t, dst, metadata=m)
    return dst


@pytest.fixture
def saved(tmp_path):
    p = make_profile()
    path = tmp_path / "wan.safetensors"
    p.save(path)
    return p, str(path)


def test_round_trip(saved, tmp_path):
    p, path = saved
    q = SpargeProfile.load(path, expect_heads=H, expect_layers=L)
    assert q == p
    assert q.grid == (21, 30, 52) and q.token_order == "hilbert" and q.pack_version == p.pack_version
    assert q.threshold.dtype == torch.float32 and q.dense.dtype == torch.bool
    t = make_profile(mode="topk", threshold=torch.full((L, H), 0.3).masked_fill(p.dense, 1.0), grid=None)
    t.save(tmp_path / "t.safetensors")
    t2 = SpargeProfile.load(tmp_path / "t.safetensors")
    assert t2 == t and t2.mode == "topk" and t2.grid is None and t2.token_order == "raster"
    assert t2 != q


def test_fill_flag_round_trip_and_older_files(saved, tmp_path):
    p, path = saved
    assert p.fill_skipped is False and p.params_for_layer(0).fill_skipped is False
    f = make_profile(fill_skipped=True)
    f.save(tmp_path / "f.safetensors")
    g = SpargeProfile.load(tmp_path / "f.safetensors")
    assert g.fill_skipped is True and g.params_for_layer(1).fill_skipped is True and "+ fill" in g.summary()
    # a file written before the flag existed has no such key: it runs as it was calibrated, dropping
    old = rewrite(str(tmp_path / "f.safetensors"), str(tmp_path / "old.safetensors"), drop_meta=("fill_skipped",))
    assert SpargeProfile.load(old).fill_skipped is False
    with pytest.raises(ValueError, match="fill_skipped"):
        make_profile(fill_skipped=True, scoring="pooled")


def test_file_is_plain_safetensors(saved):
    _, path = saved
    t = load_file(path)
    assert set(t) == {"cdfthreshd", "simthreshd1", "pvthreshd", "dense", "calibrated", "head_sparsity",
                      "head_rel_l1", "sparsity", "rel_l1", "rel_l1_worst"}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))["__metadata__"]
    assert meta["format"] == "sparge-attention-profile" and meta["heads"] == str(H) and meta["layers"] == str(L)
    assert json.loads(meta["grid"]) == [21, 30, 52] and float(meta["target_l1"]) == 0.05


def test_params_for_layer():
    p = make_profile()
    sp = p.params_for_layer(1)
    assert isinstance(sp, SpargeParams) and sp.mode == "cdf" and sp.scoring == "lse"
    thr = sp.per_head("cdfthreshd", H)
    sim = sp.per_head("simthreshd1", H)
    assert thr[2] == 1.0 and sim[2] == 1.0  # dense head: every block kept
    assert torch.equal(thr[[0, 1, 3]], p.threshold[1, [0, 1, 3]]) and (sim[[0, 1, 3]] == -1).all()
    assert torch.isinf(sp.per_head("pvthreshd", H)).all()
    assert p.params_for_layer(1) is sp  # cached: per-head tensors reach the GPU once
    assert p.dense_heads(1).tolist() == [False, False, True, False]
    assert p.dense_heads(2).all()  # not calibrated -> dense
    assert (p.params_for_layer(2).per_head("simthreshd1", H) == 1.0).all()
    assert p.params_for_layer(0, attention_sink=True).attention_sink
    with pytest.raises(ValueError, match="outside"):
        p.params_for_layer(3)


def test_dense_heads_run_fully_in_the_sparse_path():
    from devkit.realistic_inputs import make_video_qkv

    q, k, v, _ = make_video_qkv((4, 8, 16), H, 64)
    p = make_profile(n_tokens=512, grid=(4, 8, 16))
    _, stats = sparge_attention(q, k, v, p.params_for_layer(1), grid=(4, 8, 16), backend="reference",
                                return_stats=True)
    m = stats.block_mask.to_dense()
    assert m[:, 2].all() and not m[:, 0].all()
    _, stats = sparge_attention(q, k, v, p.params_for_layer(2), grid=(4, 8, 16), backend="reference",
                                return_stats=True)
    assert stats.sparsity == 0.0


def test_note_for():
    p = make_profile()
    assert p.note_for(32760, (21, 30, 52)) is None
    note = p.note_for(75600, (21, 45, 80))
    assert "32,760" in note and "75,600" in note and "calibrate again" in note
    assert "raster" in p.note_for(32760, None)
    assert "top-k" in make_profile(mode="topk", threshold=torch.full((L, H), 0.3)).note_for(1000)


def test_profile_from_calibrator_round_trip(tmp_path):
    from devkit.realistic_inputs import make_video_qkv

    q, k, v, _ = make_video_qkv((4, 16, 16), 2, 64)
    cb = Calibrator(0.05, sample_query_blocks=4)
    cb.observe(0, q, k, v, grid=(4, 16, 16))
    cb.observe(1, q, k, v, grid=(4, 16, 16))
    cb.mark_step()
    prof = cb.result(model_family="tiny")
    prof.save(tmp_path / "c.safetensors")
    back = SpargeProfile.load(tmp_path / "c.safetensors", expect_heads=2, expect_layers=2)
    assert back == prof and back.steps == 1 and back.calls == 2 and back.pv_dtype == "fp16"
    assert "tiny" in back.summary()


# ------------------------------------------------------------------ bad files
class _Marker:
    """Unpickling this would create a directory (what a malicious pickle could do, harmlessly)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_pickle_renamed_is_refused_and_never_run(tmp_path, protocol):
    marker = str(tmp_path / f"PWNED{protocol}")
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"cdfthreshd": _Marker(marker)}, protocol=protocol))
    with pytest.raises(ValueError, match="pickle|not a safetensors"):
        SpargeProfile.load(path)
    assert not os.path.exists(marker)


def test_torch_save_renamed_is_refused(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    torch.save({"cdfthreshd": torch.ones(L, H)}, path)
    with pytest.raises(ValueError, match="pickle"):
        SpargeProfile.load(path)


@pytest.mark.parametrize("cut", [0, 5, 8, 40, -20, -1])
def test_truncated(saved, tmp_path, cut):
    _, path = saved
    data = open(path, "rb").read()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(ValueError, match="truncated"):
        SpargeProfile.load(bad)


def test_garbage_and_missing(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 20)
    with pytest.raises(ValueError, match="not a safetensors"):
        SpargeProfile.load(bad)
    with pytest.raises(ValueError, match="cannot read"):
        SpargeProfile.load(tmp_path / "nope.safetensors")
    other = tmp_path / "lora.safetensors"  # a valid safetensors file that is not a profile
    save_file({"w": torch.ones(2)}, other)
    with pytest.raises(ValueError, match="not a Sparge Attention profile"):
        SpargeProfile.load(other)


def test_wrong_heads_or_layers(saved):
    _, path = saved
    with pytest.raises(ValueError, match="4 heads per layer but the model has 8"):
        SpargeProfile.load(path, expect_heads=8)
    with pytest.raises(ValueError, match="3 layers but the model has 30"):
        SpargeProfile.load(path, expect_layers=30)


@pytest.mark.parametrize("edit, match", [
    (dict(tensors={"cdfthreshd": torch.full((L, H), math.nan)}), "NaN"),
    (dict(tensors={"head_rel_l1": torch.full((L, H), math.nan)}), "NaN"),
    (dict(tensors={"cdfthreshd": torch.full((L, H), 1.5)}), r"\(0, 1\]"),
    (dict(tensors={"cdfthreshd": torch.zeros(L, H)}), r"\(0, 1\]"),
    (dict(tensors={"simthreshd1": torch.full((L, H), -3.0)}), "simthreshd1"),
    (dict(tensors={"pvthreshd": torch.zeros(L, H)}), "pvthreshd"),
    (dict(tensors={"cdfthreshd": torch.full((L, H), 0.9, dtype=torch.float64)}), "dtype"),
    (dict(tensors={"dense": torch.zeros(L, H)}), "dtype"),
    (dict(tensors={"cdfthreshd": torch.full((L, 8), 0.9)}), "has shape"),
    (dict(drop=("dense",)), "missing tensor"),
    (dict(tensors={"extra": torch.ones(1)}), "unexpected tensor"),
    # metadata that lies about the tensors
    (dict(meta={"heads": "12"}), "metadata says 3 layers x 12 heads"),
    (dict(meta={"layers": "40"}), "metadata says 40 layers"),
    (dict(meta={"heads": "twelve"}), "must be an integer"),
    (dict(meta={"mode": "topk"}), "missing tensor"),
    (dict(meta={"mode": "bisect"}), "mode"),
    (dict(meta={"scoring": "magic"}), "scoring"),
    (dict(meta={"target_l1": "nan"}), "target_l1"),
    (dict(meta={"grid": "[21, 30]"}), "grid"),
    (dict(meta={"grid": "[210, 300, 520]"}), "more tokens than n_tokens"),
    (dict(meta={"token_order": "raster"}), "token_order"),
    (dict(meta={"fill_skipped": "yes"}), "fill_skipped"),
    (dict(meta={"format_version": "99"}), "not supported"),
    (dict(drop_meta=("n_tokens",)), "'n_tokens' is missing"),
    (dict(tensors={"sparsity": torch.tensor([0.9, 0.9, 0.0])}), "does not match"),
    (dict(tensors={"head_sparsity": torch.full((L, H), 0.5), "sparsity": torch.full((L,), 0.5)}), "flagged dense"),
])
def test_bad_contents(saved, tmp_path, edit, match):
    _, path = saved
    bad = rewrite(path, str(tmp_path / "bad.safetensors"), **edit)
    with pytest.raises(ValueError, match=match):
        SpargeProfile.load(bad)


def test_invalid_profile_cannot_be_built_or_saved():
    with pytest.raises(ValueError, match="NaN"):
        make_profile(threshold=torch.full((L, H), math.nan))
    with pytest.raises(ValueError, match="has shape"):
        make_profile(simthreshd1=torch.zeros(L, H + 1))


def test_pack_version_is_pyprojects():
    """The version written into profiles is the one the pack is released under (pyproject's
    [project] version; read as text: tomllib needs Python 3.11 and the pack supports 3.10)."""
    import re

    from sparge_attention.sparge_core.profiles import PACK_VERSION

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml")) as f:
        project = f.read().split("[project]", 1)[1].split("\n[", 1)[0]
    assert PACK_VERSION == re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)
