"""infer_gpu."""
