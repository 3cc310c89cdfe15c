"""The `pooler:` config section and how a pooler is chosen for a model.

Order of precedence, per field: the `pooler:` section (`pooling_type`, `normalize`), then the model folder's
sentence-transformers files (`modules.json` naming a Pooling module, whose `config.json` gives the mode, and a
Normalize module meaning normalize), then the default for decoder models: the last token, normalized (vLLM's
default for decoder-only embedding models).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from weavelm.errors import ConfigError

logger = logging.getLogger("weavelm.pooling")

PoolingType = Literal["LAST", "MEAN", "CLS"]
DEFAULT_POOLING_TYPE: PoolingType = "LAST"
DEFAULT_NORMALIZE = True
# sentence-transformers' Pooling config: the newer `pooling_mode` string, or the older boolean flags
_ST_MODES = {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST"}
_ST_FLAGS = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS", "pooling_mode_lasttoken": "LAST"}


class PoolerConfig(BaseModel):
    """The `pooler:` section (vLLM's `PoolerConfig`): overrides what the model folder says. Only with
    `runner: pooling`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    pooling_type: PoolingType | None = Field(None, description="LAST (the prompt's last token), MEAN (the mean over "
                                             "every prompt token) or CLS (the first token); None: from the model's "
                                             "sentence-transformers config, else LAST.")
    normalize: bool | None = Field(None, description="L2-normalize the embedding; None: from the model's "
                                   "sentence-transformers config (a Normalize module), else true.")


@dataclass(frozen=True)
class ResolvedPooler:
    """The pooler a runner builds: how to pool the final hidden states, whether to normalize, and where each
    choice came from (`source`: "config", "sentence-transformers" or "default")."""

    pooling_type: PoolingType
    normalize: bool
    source: str


def resolve_pooler(model_dir: str | None, override: PoolerConfig | None) -> ResolvedPooler:
    """The pooler for the model at `model_dir` (a folder; anything else has no sentence-transformers files) with
    the `pooler:` section `override` on top. ConfigError when the folder's sentence-transformers files are broken."""
    st_type, st_normalize = _sentence_transformers(model_dir) if model_dir and os.path.isdir(model_dir) else (None,
                                                                                                             None)
    override = override or PoolerConfig()
    pooling_type = override.pooling_type or st_type or DEFAULT_POOLING_TYPE
    normalize = next(v for v in (override.normalize, st_normalize, DEFAULT_NORMALIZE) if v is not None)
    source = ("config" if override.pooling_type or override.normalize is not None
              else "sentence-transformers" if st_type or st_normalize is not None else "default")
    return ResolvedPooler(pooling_type, normalize, source)


def _sentence_transformers(model_dir: str) -> tuple[PoolingType | None, bool | None]:
    """(pooling type, normalize) from `modules.json` and its Pooling module's config; (None, None) without one."""
    path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(path):
        return None, None
    modules = _read_json(path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ConfigError([("model", f"{path}: expected a list of modules ({{'type': ..., 'path': ...}})")])
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    normalize = "Normalize" in kinds
    if "Pooling" not in kinds:
        return None, normalize
    pooling_dir = os.path.join(model_dir, str(modules[kinds.index("Pooling")].get("path", "")))
    cfg = _read_json(os.path.join(pooling_dir, "config.json"))
    mode = cfg.get("pooling_mode") if isinstance(cfg, dict) else None
    if isinstance(mode, str):
        chosen = [_ST_MODES[mode]] if mode in _ST_MODES else [mode]
    else:
        chosen = [t for flag, t in _ST_FLAGS.items() if isinstance(cfg, dict) and cfg.get(flag)]
        others = [k for k, v in (cfg.items() if isinstance(cfg, dict) else ())
                  if k.startswith("pooling_mode_") and k not in _ST_FLAGS and v]
        chosen += others
    if len(chosen) != 1 or chosen[0] not in ("LAST", "MEAN", "CLS"):
        raise ConfigError([("pooler.pooling_type", f"{pooling_dir}/config.json asks for pooling {chosen or 'none'}; "
                            f"weavelm pools with exactly one of mean, cls, lasttoken: set pooler.pooling_type "
                            f"to MEAN, CLS or LAST to override it")])
    return chosen[0], normalize


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError([("model", f"cannot read sentence-transformers file {path}: {e}")]) from None
