"""Hand-built attention batches for the attention tests and benchmarks: the test kit's builders, re-exported."""

from weavelm.testing import AttentionBatch, make_batch, reference_output, rel_err

__all__ = ["AttentionBatch", "make_batch", "reference_output", "rel_err"]
