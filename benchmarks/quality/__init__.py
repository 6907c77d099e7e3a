"""Student-quality experiments: real data sets, teachers trained here, students distilled from them."""
