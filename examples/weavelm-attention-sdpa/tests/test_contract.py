"""weavelm's shipped attention contract, run against this backend (found through the installed entry point)."""

from weavelm.testing.attention import AttentionContract


class TestSdpa(AttentionContract):
    backend = "sdpa"
