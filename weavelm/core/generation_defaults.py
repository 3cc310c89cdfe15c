"""`LLM.get_default_sampling_params()`: the model's generation_config.json defaults, as vLLM reads them."""

from __future__ import annotations

import json
import logging
import os

from weavelm.core.request import SamplingParams
from weavelm.errors import RequestError

logger = logging.getLogger("weavelm.llm")
# generation_config.json key -> SamplingParams field (vLLM's `get_diff_sampling_param`)
GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_config(model_path: str) -> dict:
    """The model folder's generation_config.json as a dict ({} when absent or unreadable)."""
    path = os.path.join(model_path, "generation_config.json") if os.path.isdir(model_path) else None
    if path is None or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        logger.warning("ignoring %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def default_sampling_params(model_path: str) -> SamplingParams:
    """SamplingParams with the model's defaults for the keys it sets; a value SamplingParams rejects is skipped
    with a warning."""
    config = generation_config(model_path)
    values = {}
    for key, field_name in GENERATION_KEYS.items():
        if config.get(key) is None:
            continue
        try:
            SamplingParams(**{field_name: config[key]})
        except RequestError as e:
            logger.warning("generation_config.json: ignoring %s (%s)", key, e)
            continue
        values[field_name] = config[key]
    try:
        return SamplingParams(**values)
    except RequestError as e:  # e.g. fields that are valid alone but not together
        logger.warning("generation_config.json: ignoring its sampling defaults (%s)", e)
        return SamplingParams()
