"""weavelm attention backend `sdpa`: PyTorch's scaled_dot_product_attention over the paged KV cache."""
