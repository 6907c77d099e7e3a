"""Precompute: tokenize sources into a cache (prepare) and run teachers over it (run).

sources and prepare write the inputs; models loads teachers, device and distributed place them,
batching groups samples, extract turns logits into top-k / sampled targets and features, run is the
resumable, shardable loop that ties them to the format's writer.
"""
