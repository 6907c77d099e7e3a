"""mtkd_train: train students from an mtkd teacher cache (no teacher is ever loaded)."""
