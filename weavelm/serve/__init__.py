"""The OpenAI-compatible HTTP server (`weavelm serve`) on AsyncLLM: `build_app` in `weavelm.serve.app`. Needs the
`[serve]` extra (FastAPI, uvicorn, prometheus_client); importing this package alone imports none of them."""
