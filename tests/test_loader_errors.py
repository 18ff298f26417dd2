"""Bad input to `mlx_moe.load`: one clear error each, naming the problem and the fix."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlx_moe
from mlx_moe import ModelLoadError, UnsupportedModelError
from tiny import write_tiny_qwen3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny"))


def copy_of(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_tiny_loads(tiny):
    model, tok = mlx_moe.load(str(tiny))
    assert len(mlx_moe.moe_layers(model)) == 2
    assert tok.encode("ab") == [97, 98]


def test_unknown_model_type_names_supported_families(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        mlx_moe.load(str(d))
    msg = str(e.value)
    assert "'llama'" in msg
    for family in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "longcat_flash"):
        assert family in msg


def test_missing_weight_files(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no weight files \(model\*\.safetensors\)"):
        mlx_moe.load(str(d))


def test_missing_shard_listed_in_index(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="missing: model-00002-of-00002.safetensors"):
        mlx_moe.load(str(d))


def test_tensor_of_wrong_shape(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    w = load_file(str(d / "model.safetensors"))
    key = "model.layers.1.mlp.gate.weight"
    w[key] = np.zeros((w[key].shape[0] + 1, w[key].shape[1]), np.float32)
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError) as e:
        mlx_moe.load(str(d))
    msg = str(e.value)
    assert "do not match config.json" in msg and "mlp.gate" in msg


def test_missing_tensor(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    w = load_file(str(d / "model.safetensors"))
    del w["model.layers.0.self_attn.q_proj.weight"]
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="q_proj"):
        mlx_moe.load(str(d))


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(tiny, tmp_path, damage):
    d = copy_of(tiny, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 16 + data[16:])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        mlx_moe.load(str(d))


def test_missing_config(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        mlx_moe.load(str(d))


def test_nonexistent_local_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        mlx_moe.load(str(tmp_path / "nope"))


def test_repo_id_without_network(monkeypatch):
    # No network here; HF_HUB_OFFLINE makes the failure immediate and certain.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        mlx_moe.load("mlx-moe-test/no-such-model-xyz")
    msg = str(e.value)
    assert "could not download 'mlx-moe-test/no-such-model-xyz'" in msg
    assert "network" in msg and "local model directory" in msg


def test_no_tokenizer_files(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        mlx_moe.load(str(d))
    model, tok = mlx_moe.load(str(d), tokenizer=False)
    assert tok is None


def test_unknown_kernels_name(tiny):
    with pytest.raises(ValueError, match="unknown kernels/backend 'fast'"):
        mlx_moe.load(str(tiny), kernels="fast")
