"""train_tpu."""
