"""The compiled CPU kernel of the top-k pass (``csrc/topk_rows.cpp``): built on first use, checked, then called.

``extract._topk_blocks`` spends most of a CPU precompute's overhead in O(V) passes over the logits
(``benchmarks/precompute_overhead.py``). The kernel does them in two reads of each row while it is in
the core's cache. It is plain C++ with no torch headers, built with the system's C++ compiler in about
a second into ``$MTKD_KERNEL_DIR`` (default ``~/.cache/mtkd/kernels``) under a name made of the source,
the compiler and the CPU, so a home folder shared by machines with other CPUs never loads a library
built for another instruction set. It is called through ``ctypes``, which releases the GIL, so the
reduction workers run it side by side (``torch.compile`` is not thread-safe; pytorch#136833).

Before first use the library is checked against the eager torch path on random rows (values, tail,
entropy, non-finite flags); a library that disagrees is not used. ``MTKD_NATIVE`` chooses:

* ``auto`` (default): use the kernel when it builds and passes the check, else warn once and use the
  eager path (same results up to float rounding and ties);
* ``1``: require it (raise ``RuntimeError`` naming the compiler's error);
* ``0``: never build or use it.

Nothing here runs code from a data folder: the only library loaded is the one built here from the
package's own source, from a kernel folder created private (mode 0700). A library, or a folder holding
it, that another user owns or that others can write is refused before it is loaded (loading a shared
library runs its constructors).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = ["available", "kernel_dir", "topk_rows"]

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "topk_rows.cpp"
HEADERS = (CSRC / "simd.h",)
"""Included by every kernel (``-I`` the csrc folder) and hashed into every kernel's name."""
ABI_VERSION = 1
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-pthread", f"-I{CSRC}"]
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def kernel_dir() -> Path:
    """Where built kernels live: ``$MTKD_KERNEL_DIR``, else ``~/.cache/mtkd/kernels``."""
    env = os.environ.get("MTKD_KERNEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mtkd" / "kernels"


def _mode() -> str:
    mode = os.environ.get("MTKD_NATIVE", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MTKD_NATIVE={mode!r} is not a choice; set it to auto, 1 (require the kernel) or 0 (eager)")
    return mode


def _cpu_signature() -> str:
    """The CPU's model and feature flags (Linux), else the machine name: part of the library's name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return platform.machine() + "\n" + "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


BUILD_PREFIX = ".mtkd-build-"
"""The name of every build folder `_build` makes in the kernel folder (it deletes no other)."""

STALE_BUILD_SECONDS = 3600.0
"""A build folder this old was left by a killed build (a live one is younger: the compiler's timeout is 300 s)."""


def _sweep_stale_builds(folder: Path) -> None:
    """Delete the build folders of killed builds (:data:`BUILD_PREFIX`, older than :data:`STALE_BUILD_SECONDS`)."""
    now = time.time()
    for path in folder.glob(BUILD_PREFIX + "*"):
        try:
            if path.is_dir() and not path.is_symlink() and now - path.lstat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # gone meanwhile (another process swept it)
            continue


def _build(compiler: str, source: Path = SOURCE) -> Path:
    """Compile a kernel (once per source, compiler and CPU) and return the library's path.

    ``source`` is a C++ file of this package (the top-k kernel by default; ``mtkd_train``'s loss kernel
    passes its own); it may include :data:`HEADERS`.
    """
    flags = [*_FLAGS, "-march=native"] if platform.machine() in ("x86_64", "AMD64") else _FLAGS
    cmd = shlex.split(compiler)  # CXX may carry a wrapper or flags, e.g. "ccache g++"
    version = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60).stdout
    texts = [source.read_text(), *(h.read_text() for h in HEADERS)]
    key = hashlib.sha256("\0".join([*texts, compiler, version, *flags, _cpu_signature()]).encode())
    target = kernel_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _sweep_stale_builds(target.parent)
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix=BUILD_PREFIX, dir=target.parent) as scratch:  # built aside, renamed: atomic
        out = Path(scratch) / target.name
        done = subprocess.run([*cmd, *flags, "-o", str(out), str(source)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise RuntimeError(f"{compiler} could not build {source.name}: {first}")
        os.chmod(out, 0o755)  # whatever the umask: a group-writable library would be refused by _check_owned
        os.replace(out, target)
    return target


def _check_owned(path: Path) -> None:
    """Refuse `path` and its folder unless this user owns them and no one else can write them (POSIX)."""
    if not hasattr(os, "getuid"):
        return
    for p in (path.parent, path):
        st = p.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise RuntimeError(f"{p} is owned by another user or writable by others, so the kernel there is not "
                               f"loaded; point MTKD_KERNEL_DIR at a private folder (mode 0700)")


def _load(path: Path) -> ctypes.CDLL:
    _check_owned(path)
    lib = ctypes.CDLL(str(path))
    if lib.mtkd_topk_rows_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has kernel version {lib.mtkd_topk_rows_version()}, expected {ABI_VERSION}; "
                           f"delete it and it is rebuilt")
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mtkd_topk_rows.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p, p]
    lib.mtkd_topk_rows.restype = None
    return lib


def _call(lib: ctypes.CDLL, x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    rows, vocab = x.shape
    idx = torch.empty(rows, k, dtype=torch.int64)
    logp = torch.empty(rows, k, dtype=torch.float32)
    tail, entropy, top1 = (torch.empty(rows, dtype=torch.float32) for _ in range(3))
    finite = torch.empty(rows, dtype=torch.uint8)
    lib.mtkd_topk_rows(x.data_ptr(), rows, vocab, x.stride(0), k, idx.data_ptr(), logp.data_ptr(),
                       tail.data_ptr(), entropy.data_ptr(), top1.data_ptr(), finite.data_ptr())
    return idx, logp, tail, entropy, top1, finite.bool()


def _self_check(lib: ctypes.CDLL) -> None:
    """Compare the library with float64 torch, including non-finite rows; raise on disagreement.

    Short rows at k = 64 (fewer groups than 2k: the exact path) and at k = 8, and long rows at k = 64
    (the pruning by a bound on the k-th value that real vocabularies take).
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5000, generator=gen) * 4
    x[1, 17] = float("nan")
    x[2, 4999] = float("inf")
    x[3, 0] = float("-inf")
    x[4] = 0.5  # every value tied
    long = torch.randn(3, 20_000, generator=gen) * 3
    long[1, 123] = 40.0  # one peaked row
    if not (_agrees(lib, x, 64) and _agrees(lib, x, 8) and _agrees(lib, long, 64)):
        raise RuntimeError("the compiled top-k kernel disagrees with torch on its self-check")


def _agrees(lib: ctypes.CDLL, x: torch.Tensor, k: int) -> bool:
    vocab = x.shape[1]
    idx, logp, tail, entropy, top1, finite = _call(lib, x, k)
    ref = torch.log_softmax(x.double(), dim=-1)
    want_finite = torch.isfinite(x).all(dim=-1)
    ok = bool((finite == want_finite).all())
    for r in want_finite.nonzero().flatten().tolist():
        kth = torch.topk(x[r], k).values[-1]
        ok = ok and bool((x[r][idx[r]] >= kth).all()) and idx[r].unique().numel() == k
        ok = ok and bool(torch.allclose(logp[r].double(), ref[r][idx[r]], atol=1e-5))
        kept = torch.zeros(vocab, dtype=torch.bool)
        kept[idx[r]] = True
        p = ref[r].exp()
        ok = ok and abs(float(tail[r]) - float(p[~kept].sum())) <= 1e-5 * max(1e-3, float(p[~kept].sum()))
        ok = ok and abs(float(entropy[r]) + float((p * ref[r]).sum())) <= 1e-4
        ok = ok and abs(float(top1[r]) - float(p.max())) <= 1e-6
    return ok


def _library() -> ctypes.CDLL | None:
    """The checked library, or None (eager path); built, checked and warned about once per process."""
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]  # type: ignore[return-value]
        mode = _mode()
        lib: ctypes.CDLL | None = None
        if mode != "0":
            try:
                compiler = _compiler()
                if compiler is None:
                    raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
                lib = _load(_build(compiler))
                _self_check(lib)
            # AttributeError: a library at the kernel's name that lacks its symbols
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as err:
                if mode == "1":
                    raise RuntimeError(f"MTKD_NATIVE=1 but the top-k kernel is unusable: {err}") from err
                warnings.warn(f"mtkd: the compiled top-k kernel is not used ({err}); the torch path is "
                              f"slower on the CPU. Set MTKD_NATIVE=0 to silence this.", stacklevel=3)
                lib = None
        _STATE["lib"] = lib
        return lib


def available() -> bool:
    """Whether the compiled kernel is in use in this process (building and checking it on first call)."""
    return _library() is not None


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...] | None:
    """The kernel's outputs for (n, V) float32 CPU rows (unit stride within a row), or None when it is not in use.

    Returns ``(indices, logp, tail, entropy, top1, finite)``: (n, k) int64 sorted ascending, (n, k)
    float32, then (n,) float32 three times and (n,) bool, as ``extract._topk_blocks`` defines them.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.ndim != 2 or x.stride(-1) != 1:
        return None
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"top-k of {k} from rows of {x.shape[1]}: k must be in 1..V")
    lib = _library()
    if lib is None:
        return None
    return _call(lib, x, k)
