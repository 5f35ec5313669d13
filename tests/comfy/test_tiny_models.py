"""The tiny models are detected by ComfyUI 0.3.75's own model_detection, and are deterministic."""
import pytest

from devkit import tiny_models

pytestmark = [pytest.mark.comfy, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cached():
    return tiny_models.cached_tiny_models()


@pytest.fixture(scope="module")
def detected(cached):
    res = tiny_models.detect_many(cached.values())
    return {name: res[str(p)] for name, p in cached.items()}


@pytest.mark.parametrize("name,expected", [("wan21", "WAN21_T2V"), ("hunyuan", "HunyuanVideo"),
                                           ("wan22_high", "WAN21_T2V"), ("wan22_low", "WAN21_T2V")])
def test_detected_by_comfy(detected, name, expected):
    d = detected[name]
    assert d["model_config"] == expected, d
    if expected == "WAN21_T2V":
        assert d["unet_config"]["dim"] == 256 and d["unet_config"]["num_heads"] == 2
        assert d["unet_config"]["num_layers"] == 2 and d["unet_config"]["model_type"] == "t2v"
        assert d["n_params"] < 4_000_000
    else:
        assert d["unet_config"]["hidden_size"] == 256 and d["unet_config"]["num_heads"] == 2
        assert d["unet_config"]["depth"] == 1 and d["unet_config"]["depth_single_blocks"] == 1
        assert d["unet_config"]["vec_in_dim"] == 768 and d["unet_config"]["guidance_embed"]
        assert d["unet_config"]["context_in_dim"] == tiny_models.HUNYUAN_CONTEXT_DIM
        assert d["n_params"] < 8_000_000


def test_deterministic_and_seeded(cached, tmp_path):
    a = tiny_models.make_tiny_wan21_t2v(tmp_path / "a.safetensors")
    assert a.read_bytes() == cached["wan21"].read_bytes()
    high, low = cached["wan22_high"], cached["wan22_low"]
    assert high.read_bytes() != low.read_bytes()
    h = tiny_models.make_tiny_hunyuan_video(tmp_path / "h.safetensors")
    assert h.read_bytes() == cached["hunyuan"].read_bytes()
