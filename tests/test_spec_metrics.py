"""Speculative-decoding metrics reach the server's `/metrics` (Prometheus text) from `EngineStats`."""

import pytest

pytest.importorskip("prometheus_client")

from weavelm.core.llm_engine import EngineStats  # noqa: E402
from weavelm.serve.metrics import ServerMetrics  # noqa: E402


def test_spec_metrics_are_exported():
    m = ServerMetrics("smol")
    m.set_stats(EngineStats(1, 0, 3, 64, 3 / 64, 0.0, spec_num_draft_tokens=40, spec_num_accepted_tokens=30,
                            spec_acceptance_rate=0.75, spec_mean_accepted_length=3.5, spec_proposer_time_s=0.25))
    text = m.render().decode()
    for line in ('weavelm:spec_decode_num_draft_tokens{model_name="smol"} 40.0',
                 'weavelm:spec_decode_num_accepted_tokens{model_name="smol"} 30.0',
                 'weavelm:spec_decode_acceptance_rate{model_name="smol"} 0.75',
                 'weavelm:spec_decode_mean_accepted_length{model_name="smol"} 3.5',
                 'weavelm:spec_decode_proposer_time_seconds{model_name="smol"} 0.25'):
        assert line in text, line
