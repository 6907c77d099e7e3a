"""Precompute: tokenize sources into a cache (prepare) and run teachers over it (run).

sources and prepare write the inputs; config holds a run's settings; models loads teachers, device
and distributed place them (one GPU or a GPU block per rank, gloo control messages), setup checks a
teacher against the cache before anything is written, lock keeps one run per teacher, batching
groups samples, extract turns logits into top-k / sampled targets and features, chunk runs one
chunk, and run is the resumable, shardable loop that ties them to the format's writer.
"""
