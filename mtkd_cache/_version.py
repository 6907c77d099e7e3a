"""Versions: the package's and the on-disk cache format's."""

__version__ = "0.1.0"

#: The cache format this code writes. Readers refuse any other value by name (see docs/FORMAT.md).
FORMAT_VERSION = 2
FORMAT_NAME = "mtkd-cache"
