"""Rotary position embeddings (neox style: rotate halves), with the rope-scaling variants real checkpoints use.

`rope_parameters(hf_config)` reads the config's rope section (transformers 5's `rope_parameters`, or the older
`rope_scaling` plus `rope_theta`) into a checked `RopeParameters`; a bad value (a factor <= 0, a missing field, a
factor list of the wrong length, an unknown type) is a `ConfigError` naming the field and what it must be.
`RotaryEmbedding` precomputes cos/sin per position with the frequencies transformers computes
(`transformers.modeling_rope_utils`):

- `default`: `theta ** (-2i / d)`; `linear`: those divided by `factor`;
- `llama3`: low frequencies divided by `factor`, high ones kept, a smooth ramp between;
- `yarn`: interpolation/extrapolation blend over `beta_fast`/`beta_slow`, cos/sin scaled by the attention factor;
- `dynamic` (NTK): transformers recomputes the base from the current sequence length once it exceeds
  `max_position_embeddings`; here position p uses the base for a sequence of p + 1 tokens (the frequencies a
  decode step at p sees), so positions within the original context are exactly the default rope;
- `longrope` (`su`, Phi-3): `short_factor` for positions below `original_max_position_embeddings`, `long_factor`
  from there on (vLLM's rule; transformers switches every position of a sequence once it grows past the original
  context), cos/sin scaled by `sqrt(1 + ln(factor) / ln(original))`.

`partial_rotary_factor` < 1 rotates only the first `rotary_dim` features of each head and passes the rest.

`MRotaryEmbedding` is the multimodal rotary of Qwen2-VL / Qwen2.5-VL (M-RoPE): each token has three positions
(temporal, height, width) and the rotary frequencies are split into `mrope_section` runs, run i rotating by row
i % 3 (transformers reads a checkpoint's rope type `mrope` as `default` plus `mrope_section`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from weavelm.errors import ConfigError
from weavelm.layers import kernels
from weavelm.ops import native

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
_ALIASES = {"su": "longrope", "ntk": "dynamic"}


@dataclass(frozen=True)
class RopeParameters:
    """A checked rope section: `rope_type` (one of ROPE_TYPES), `theta`, `rotary_dim` (even, <= head_dim) and the
    type's own fields in `extra` (e.g. `factor`, `original_max_position_embeddings`, `short_factor`)."""

    rope_type: str
    theta: float
    head_dim: int
    rotary_dim: int
    max_position_embeddings: int
    extra: dict[str, Any] = field(default_factory=dict)


def _section(hf_config: Any) -> dict[str, Any]:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        raise ConfigError([("rope_parameters", f"must be a mapping (got {type(params).__name__})")])
    return dict(params)


def rope_parameters(hf_config: Any, head_dim: int) -> RopeParameters:
    """The checked rope section of `hf_config` for heads of `head_dim`; ConfigError listing every bad field."""
    params = _section(hf_config)
    raw_type = params.get("rope_type", params.get("type", "default")) or "default"
    rope_type = _ALIASES.get(raw_type, raw_type)
    errors: list[tuple[str, str]] = []
    if rope_type not in ROPE_TYPES:
        errors.append(("rope_parameters.rope_type", f"unsupported rope type {raw_type!r}; supported: "
                       f"{', '.join(ROPE_TYPES)} (and the aliases su, ntk)"))
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    if not _positive(theta):
        errors.append(("rope_parameters.rope_theta", f"must be a number > 0 (got {theta!r})"))
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0)
    rotary_dim = int(head_dim * partial) if _positive(partial) and partial <= 1 else 0
    if rotary_dim < 2 or rotary_dim % 2:
        errors.append(("rope_parameters.partial_rotary_factor", f"must be in (0, 1] and give an even rotary "
                       f"dimension of the head ({head_dim}) (got {partial!r})"))
    max_pos = getattr(hf_config, "max_position_embeddings", None) or 4096
    extra = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor")}
    if not errors:
        errors += _check_type(rope_type, extra, rotary_dim, hf_config)
    if errors:
        raise ConfigError(errors)
    if rope_type in ("yarn", "longrope", "llama3") and "original_max_position_embeddings" not in extra:
        extra["original_max_position_embeddings"] = getattr(hf_config, "original_max_position_embeddings")
    return RopeParameters(rope_type, float(theta), head_dim, rotary_dim, int(max_pos), extra)


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_type(rope_type: str, p: dict[str, Any], rotary_dim: int, hf_config: Any) -> list[tuple[str, str]]:
    """The type's own fields, as transformers requires them."""
    errors = []

    def need(key: str, what: str = "a number > 0", check=_positive, optional: bool = False) -> None:
        if key not in p or p[key] is None:
            if not optional:
                errors.append((f"rope_parameters.{key}", f"is required for rope type {rope_type!r} ({what})"))
        elif not check(p[key]):
            errors.append((f"rope_parameters.{key}", f"must be {what} (got {p[key]!r})"))

    original = p.get("original_max_position_embeddings", getattr(hf_config, "original_max_position_embeddings", None))
    if rope_type in ("linear", "dynamic", "llama3"):
        need("factor")
    if rope_type == "llama3":
        need("low_freq_factor")
        need("high_freq_factor")
        if not errors and p["high_freq_factor"] <= p["low_freq_factor"]:
            errors.append(("rope_parameters.high_freq_factor", f"must be > low_freq_factor "
                           f"({p['low_freq_factor']}) (got {p['high_freq_factor']})"))
    if rope_type in ("yarn", "longrope", "llama3") and not _positive(original):
        errors.append(("rope_parameters.original_max_position_embeddings", f"is required for rope type "
                       f"{rope_type!r} (a number > 0; got {original!r})"))
    if rope_type == "yarn":
        need("factor", optional=True)
        for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            need(key, optional=True)
    if rope_type == "longrope":
        need("factor", optional=True)
        need("attention_factor", optional=True)
        n = rotary_dim // 2

        def factors(v: Any) -> bool:
            return isinstance(v, (list, tuple)) and len(v) == n and all(_positive(x) for x in v)

        need("short_factor", f"a list of {n} numbers > 0", factors)
        need("long_factor", f"a list of {n} numbers > 0", factors)
    return errors


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rp: RopeParameters) -> tuple[torch.Tensor, float]:
    p, dim, base = rp.extra, rp.rotary_dim, rp.theta
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or rp.max_position_embeddings / original
    attention = p.get("attention_factor")
    if attention is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                     else _yarn_mscale(factor))
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)


def cos_sin_cache(rp: RopeParameters, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (num_positions, rotary_dim // 2) float32 on the CPU, attention scaling folded in."""
    positions = torch.arange(num_positions, dtype=torch.float32)
    dim, p, scaling = rp.rotary_dim, rp.extra, 1.0
    inv = _base_inv_freq(rp.theta, dim)
    if rp.rope_type == "linear":
        inv = inv / p["factor"]
    elif rp.rope_type == "llama3":
        inv = _llama3(inv, p)
    elif rp.rope_type == "yarn":
        inv, scaling = _yarn(rp)
    elif rp.rope_type == "longrope":
        original = p["original_max_position_embeddings"]
        factor = p.get("factor") or rp.max_position_embeddings / original
        scaling = p.get("attention_factor") or (
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original)))
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        short = 1.0 / (torch.tensor(p["short_factor"], dtype=torch.float32) * rp.theta ** shape)
        long = 1.0 / (torch.tensor(p["long_factor"], dtype=torch.float32) * rp.theta ** shape)
        freqs = positions[:, None] * torch.where((positions < original)[:, None], short[None, :], long[None, :])
        return freqs.cos() * scaling, freqs.sin() * scaling
    freqs = positions[:, None] * inv[None, :]
    if rp.rope_type == "dynamic" and num_positions > rp.max_position_embeddings:
        m, factor = rp.max_position_embeddings, p["factor"]
        seq = positions[m:] + 1
        bases = rp.theta * ((factor * seq / m) - (factor - 1)) ** (dim / (dim - 2))
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        freqs[m:] = positions[m:, None] / (bases[:, None] ** shape[None, :])
    return freqs.cos() * scaling, freqs.sin() * scaling


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding, cos/sin looked up per flattened position (`max_positions` of them).

    Built from the transformers config (`rope_parameters`), or from a `RopeParameters` with `from_parameters`."""

    def __init__(self, hf_config: Any, head_dim: int, max_positions: int):
        super().__init__()
        self._setup(rope_parameters(hf_config, head_dim), max_positions)

    @classmethod
    def from_parameters(cls, params: RopeParameters, max_positions: int) -> RotaryEmbedding:
        rope = cls.__new__(cls)
        nn.Module.__init__(rope)
        rope._setup(params, max_positions)
        return rope

    def _setup(self, params: RopeParameters, max_positions: int) -> None:
        self.params = params
        cos, sin = cos_sin_cache(params, max_positions)  # on the CPU, in fp32, whatever the device
        device = torch.empty(0).device  # the device the model is being built on
        self.register_buffer("cos_cache", cos.to(device), persistent=False)
        self.register_buffer("sin_cache", sin.to(device), persistent=False)
        self.head_dim, self.rotary_dim = params.head_dim, params.rotary_dim
        self.use_triton = kernels.triton_ops_enabled() and self.rotary_dim == self.head_dim

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: (tokens, heads, head_dim), k: (tokens, kv_heads, head_dim); positions: (tokens,) int.

        The Triton path computes in fp32 and rounds once; the torch path rounds cos/sin and each product to q's
        dtype as transformers does (the two differ by a couple of ulps in bf16, not at all in fp32)."""
        if self.use_triton and kernels.triton_device(q):
            return kernels.ops().rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        if self.rotary_dim == self.head_dim:
            return _rotate(q, cos, sin), _rotate(k, cos, sin)
        r = self.rotary_dim
        return (torch.cat((_rotate(q[..., :r], cos, sin), q[..., r:]), dim=-1),
                torch.cat((_rotate(k[..., :r], cos, sin), k[..., r:]), dim=-1))

    def inplace_ok(self, positions: torch.Tensor, qkv: torch.Tensor) -> bool:
        """Whether `forward_inplace` can run: whole-head rotation, fp32 CPU rows with unit column stride, int64
        positions, one per row, and the native kernels built."""
        return (self.rotary_dim == self.head_dim and qkv.is_cpu and native.usable(qkv) and qkv.stride(-1) == 1
                and self.cos_cache.dtype == torch.float32 and positions.dtype == torch.int64
                and positions.is_contiguous() and positions.shape[0] == qkv.shape[0])

    def forward_inplace(self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> bool:
        """Rotate the q and k heads of a (tokens, (heads + 2 kv_heads) * head_dim) buffer in place with the native
        kernel; False (nothing done) where it cannot run (see `inplace_ok`)."""
        if not self.inplace_ok(positions, qkv):
            return False
        self.rotate_inplace(positions, qkv, num_heads, num_kv_heads)
        return True

    def rotate_inplace(self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
        """`forward_inplace` for a caller that already checked `inplace_ok`."""
        native.rotary_(qkv, 0, num_heads, num_heads * self.head_dim, num_kv_heads, self.head_dim, positions,
                       self.cos_cache, self.sin_cache)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def mrope_section(params: RopeParameters) -> tuple[int, ...]:
    """The checked `mrope_section` of a multimodal rope section: three positive ints (the frequencies rotated by
    the temporal, height and width positions) summing to `rotary_dim // 2`; ConfigError otherwise."""
    section = params.extra.get("mrope_section")
    half = params.rotary_dim // 2
    ok = (isinstance(section, (list, tuple)) and len(section) == 3 and
          all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in section) and sum(section) == half)
    if not ok:
        raise ConfigError([("rope_parameters.mrope_section", f"must be three positive integers summing to half the "
                            f"rotary dimension ({half}) (got {section!r})")])
    return tuple(section)


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal rotary embedding (M-RoPE, Qwen2-VL): `forward` takes positions (3, tokens) - temporal, height
    and width rows - and rotates frequency run i of `mrope_section` by row i % 3. Text tokens carry the same
    position on all three rows, so (tokens,) positions are accepted too and rotate exactly as the plain rotary
    (which also keeps the in-place native path for them)."""

    def _setup(self, params: RopeParameters, max_positions: int) -> None:
        super()._setup(params, max_positions)
        self.mrope_section = mrope_section(params)

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (tokens, rotary_dim // 2) in fp32 for (3, tokens) positions."""
        bounds, start = [], 0
        for n in self.mrope_section:
            bounds.append((start, start + n))
            start += n
        cos3, sin3 = self.cos_cache[positions], self.sin_cache[positions]  # (3, tokens, rotary_dim // 2)
        cos = torch.cat([cos3[i % 3, :, a:b] for i, (a, b) in enumerate(bounds)], dim=-1)
        sin = torch.cat([sin3[i % 3, :, a:b] for i, (a, b) in enumerate(bounds)], dim=-1)
        return cos, sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: (tokens, heads, head_dim), k: (tokens, kv_heads, head_dim); positions: (3, tokens) or (tokens,) int.
        Rounds cos/sin to q's dtype as transformers does."""
        if positions.ndim == 1:
            return super().forward(positions, q, k)
        cos, sin = self._cos_sin(positions)
        cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
        if self.rotary_dim == self.head_dim:
            return _rotate(q, cos, sin), _rotate(k, cos, sin)
        r = self.rotary_dim
        return (torch.cat((_rotate(q[..., :r], cos, sin), q[..., r:]), dim=-1),
                torch.cat((_rotate(k[..., :r], cos, sin), k[..., r:]), dim=-1))

    def inplace_ok(self, positions: torch.Tensor, qkv: torch.Tensor) -> bool:
        """Only (tokens,) positions take the native in-place path."""
        return positions.ndim == 1 and super().inplace_ok(positions, qkv)
