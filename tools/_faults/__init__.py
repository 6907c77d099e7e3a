"""Pieces of `tools.fault_matrix`: process running and judging, fixtures, case families, report.

Everything here drives mtkd through its command lines in subprocesses and judges the outcome from
exit codes, stderr and the bytes on disk (read with zarr / pyarrow / safetensors directly), never
through mtkd's internal Python API, so the matrix keeps working while that API changes.
"""
