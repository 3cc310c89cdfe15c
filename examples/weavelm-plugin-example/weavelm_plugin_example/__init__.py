"""Example out-of-tree weavelm plugin."""
