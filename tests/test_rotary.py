"""weavelm.layers' rope scaling against transformers' own tables (`ROPE_INIT_FUNCTIONS`), and its typed errors.

For each rope type real checkpoints use, the cos/sin rows the engine looks up per position equal transformers'
`inv_freq` times the position (times the attention scaling), on a config transformers built itself."""

from __future__ import annotations

import pytest
import torch

from weavelm.errors import ConfigError
from weavelm.layers import RotaryEmbedding, rope_parameters
from weavelm.layers.rotary import cos_sin_cache

HEAD = 16
CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.7,
                    "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + i / 10 for i in range(HEAD // 2)],
                 "long_factor": [2.0 + i for i in range(HEAD // 2)], "original_max_position_embeddings": 64},
}


def _config(rope: dict | None, max_pos: int = 256, **kw):
    from transformers import LlamaConfig
    params = {"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}
    return LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=max_pos,
                       rope_parameters=params, **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_tables_equal_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = _config(CASES[case])
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        inv = 1.0 / (10000.0 ** (torch.arange(0, HEAD, 2, dtype=torch.int64).float() / HEAD))
        scaling = 1.0
    else:
        inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    rope = RotaryEmbedding(cfg, HEAD, 64)  # positions within the original context
    pos = torch.arange(64, dtype=torch.float32)
    freqs = pos[:, None] * inv[None, :].float()
    torch.testing.assert_close(rope.cos_cache, freqs.cos() * scaling)
    torch.testing.assert_close(rope.sin_cache, freqs.sin() * scaling)


def test_long_positions_of_longrope_and_dynamic_follow_transformers_long_tables():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = _config(CASES["longrope"])
    long_inv, scaling = ROPE_INIT_FUNCTIONS["longrope"](cfg, torch.device("cpu"), seq_len=65)
    rope = RotaryEmbedding(cfg, HEAD, 128)
    pos = torch.arange(64, 128, dtype=torch.float32)
    torch.testing.assert_close(rope.cos_cache[64:], (pos[:, None] * long_inv[None, :]).cos() * scaling)
    cfg = _config(CASES["dynamic"], max_pos=64)
    rope = RotaryEmbedding(cfg, HEAD, 100)
    inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, torch.device("cpu"), seq_len=100)  # a step at position 99
    torch.testing.assert_close(rope.cos_cache[99], (99 * inv).cos())


def test_partial_rotary_passes_the_rest_of_the_head():
    cfg = _config(None)
    cfg.rope_parameters["partial_rotary_factor"] = 0.5
    rope = RotaryEmbedding(cfg, HEAD, 32)
    assert rope.rotary_dim == 8 and rope.cos_cache.shape == (32, 4)
    q, k = torch.randn(5, 4, HEAD), torch.randn(5, 2, HEAD)
    rq, rk = rope(torch.arange(5), q, k)
    assert torch.equal(rq[..., 8:], q[..., 8:]) and torch.equal(rk[..., 8:], k[..., 8:])
    assert not torch.equal(rq[1:, :, :8], q[1:, :, :8])


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "linear", "factor": 0}, "rope_parameters.factor: must be a number > 0 (got 0)"),
    ({"rope_type": "linear"}, "rope_parameters.factor: is required for rope type 'linear'"),
    ({"rope_type": "dynamic", "factor": -2.0}, "rope_parameters.factor: must be a number > 0 (got -2.0)"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 64}, "high_freq_factor: must be > low_freq_factor"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0] * 8,
      "original_max_position_embeddings": 64}, "short_factor: must be a list of 8 numbers > 0"),
    ({"rope_type": "mrope"}, "unsupported rope type 'mrope'; supported: default, linear, dynamic"),
    ({"rope_type": "default", "rope_theta": 0}, "rope_theta: must be a number > 0"),
])
def test_bad_rope_values_are_config_errors(rope, message):
    class Cfg:  # a config.json as written, unchecked by transformers
        max_position_embeddings = 128
        rope_parameters = rope
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        rope_parameters(Cfg, HEAD)


def test_su_alias_is_longrope():
    class Cfg:
        max_position_embeddings = 128
        original_max_position_embeddings = 64
        rope_scaling = {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    params = rope_parameters(Cfg, HEAD)
    assert params.rope_type == "longrope"
    cos, _ = cos_sin_cache(params, 4)
    assert cos.shape == (4, 8)
