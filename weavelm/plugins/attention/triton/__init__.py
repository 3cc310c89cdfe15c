"""The `triton` attention backend (see backend.py); kernels.py holds the Triton kernels."""
