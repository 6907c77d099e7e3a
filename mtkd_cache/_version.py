"""Versions: the package's and the on-disk cache format's."""

__version__ = "0.1.0"

#: The cache format this code writes. Readers refuse any other value by name (see docs/FORMAT.md).
FORMAT_VERSION = 3
#: Versions this code reads: 2 differs from 3 only by lacking the stored text and tokenizations
#: (docs/FORMAT.md, "Versioning"), so a version-2 cache is read as a version-3 one without text.
READABLE_FORMAT_VERSIONS = (2, 3)
FORMAT_NAME = "mtkd-cache"
