"""Fashion-MNIST: the README main job (two real teachers -> cache -> student) and its models."""
