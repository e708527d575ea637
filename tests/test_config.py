"""Model configs: presets, HF config.json round-trips, validation."""

import pytest
import transformers

from sparsemem.models.config import PRESETS, from_hf_config, preset, to_hf_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    cfg = preset(name)
    hf = to_hf_config(cfg)
    assert from_hf_config(hf) == cfg
    # transformers reads the same dict into the same architecture.
    reference = transformers.AutoConfig.for_model(**hf)
    assert (reference.num_hidden_layers, reference.num_key_value_heads, reference.head_dim) == (
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    assert from_hf_config(reference.to_dict()) == cfg


def test_gemma_layer_pattern():
    cfg = preset("gemma-3-270m")
    assert [i for i, t in enumerate(cfg.layer_types) if t == "global"] == [5, 11, 17]
    assert cfg.attn_scale == 256 ** -0.5
    assert cfg.replace(num_layers=7).layer_types.count("global") == 1


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="known presets: .*gemma-3-270m"):
        preset("gemma-4")
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        preset("llama-3.2-1b").replace(num_kv_heads=5)
    with pytest.raises(ValueError, match="Unsupported rope scaling type 'yarn'"):
        from_hf_config({**to_hf_config(preset("qwen3-0.6b")), "rope_parameters": {"rope_type": "yarn",
                                                                               "rope_theta": 1e6}})
