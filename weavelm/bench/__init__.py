"""Benchmarks: throughput, latency and the A/B comparison of two engine compositions (`weavelm bench`, `weavelm ab`)."""
