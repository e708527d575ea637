"""HF safetensors folders: exact round-trips, the sharded index form, sharded placement, clear errors."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from hf_reference import make_reference
from sparsemem.checkpoints.hf import CheckpointMismatchError, load_hf_checkpoint, save_hf_checkpoint
from sparsemem.parallel.mesh import make_mesh


def flat_params(model):
    return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def hf_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    make_reference(request.param, folder)
    return folder


def test_save_load_round_trip_is_bit_exact(hf_folder, tmp_path):
    model = load_hf_checkpoint(hf_folder)
    save_hf_checkpoint(model, tmp_path)
    original, written = load_file(hf_folder / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(written) == set(original) - {"lm_head.weight"}
    for name, value in written.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    again = flat_params(load_hf_checkpoint(tmp_path))
    for name, value in flat_params(model).items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_sharded_index_folder_loads(hf_folder, tmp_path):
    tensors = load_file(hf_folder / "model.safetensors")
    names = sorted(tensors)
    halves = {"part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    expected = flat_params(load_hf_checkpoint(hf_folder))
    for name, value in flat_params(load_hf_checkpoint(tmp_path)).items():
        np.testing.assert_array_equal(value, expected[name])


def test_load_onto_mesh_places_shards(hf_folder):
    mesh = make_mesh({"data": 2, "model": 4})
    model = load_hf_checkpoint(hf_folder, mesh=mesh)
    w_up = model.layers.w_up[...]
    assert w_up.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    assert len(w_up.addressable_shards) == 8
    assert w_up.addressable_shards[0].data.shape == (w_up.shape[0], w_up.shape[1], w_up.shape[2] // 4)
    expected = flat_params(load_hf_checkpoint(hf_folder))
    np.testing.assert_array_equal(np.asarray(w_up), expected["layers.w_up"])


def test_every_mismatch_is_reported_together(hf_folder, tmp_path):
    tensors = load_file(hf_folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:-1]
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    with pytest.raises(CheckpointMismatchError) as err:
        load_hf_checkpoint(tmp_path)
    message = str(err.value)
    assert "1 missing" in message and "model.layers.1.mlp.up_proj.weight" in message
    assert "1 mis-shaped" in message and "q_proj" in message
    assert "1 unexpected" in message and "model.layers.0.extra.weight" in message


def test_missing_files_are_clear_errors(hf_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="No \\*.safetensors"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="Unsupported model_type 'gpt2'"):
        load_hf_checkpoint(tmp_path)
