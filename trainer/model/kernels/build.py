"""Build and load the fused injection's C++ library (trainer/model/kernels/cpu.py) so that no process ever
waits on a lock that no live process holds.

    python launch/build_kernels.py                     # build it now (once per torch install), print where
    python launch/build_kernels.py --dir /shared/kernels   # build once into a folder that nodes share

Why: torch's JIT tooling (`load_inline`) guards a build with FileBaton, a file created with O_EXCL
and deleted when the build ends. A process killed during the ~40 s first build (SIGKILL, the OOM
killer, SLURM after its grace period, a Ray worker restart) leaves that file behind, and every later
process of that user on that machine (or, with ~/.cache on a shared home, on every node) waits on it
for ever, without a word.

Here instead:
- the library lives in `<root>/llmrec_inject-<key>-torch<version>/llmrec_inject.so`, key = sha256 of
  the C++ source, the compiler flags, torch's version and commit, the Python ABI tag and the machine
  architecture; root = $LLMREC_KERNEL_DIR, else $TORCH_EXTENSIONS_DIR, else ~/.cache/llmrec. A new
  source or torch gets a new folder: nothing stale is ever loaded.
- A process that finds the library there loads it (torch.ops.load_library): no lock, no compiler, no
  ninja. The file only ever appears there complete: it is built elsewhere and renamed into place.
  So a node without a C++ compiler (the same library registers the ops that the CUDA kernels serve)
  runs from a library built once elsewhere with the same torch and Python. A GPU node still needs a
  C compiler for Triton's own launchers (check_triton_compiler, below).
- Otherwise the process takes an OS lock, fcntl.flock, on `build.lock` in that folder. The kernel
  releases such a lock when its holder dies, however it dies, so a lock never outlives its process.
  The holder builds with load_inline in a private subfolder (`build-<host>-<pid>`; torch's FileBaton
  there is never contended, and compilers orphaned by a killed builder write only into their own
  subfolder), renames the library into place and lets go. Subfolders of dead builders are deleted by
  the next holder (a live builder would hold the lock).
- Nothing waits silently: a waiter logs who holds the lock (host, pid) when it starts waiting and
  a warning every $LLMREC_KERNEL_WAIT_LOG_S seconds (30) after that; it loads the library as soon as
  it appears. A build that runs past $LLMREC_KERNEL_BUILD_WARN_S seconds (120; ~40 s is usual) says so,
  again every $LLMREC_KERNEL_WAIT_LOG_S seconds.
- A file system whose flock is refused (some Lustre/NFS mounts answer ENOLCK/ENOSYS) falls back, with
  a warning, to a node-local folder under the temporary directory.

Over NFS, Linux maps flock to NFS byte-range locks: they work across clients, and a dead client's
lock is dropped when its lease expires (NFSv4, ~90 s). Verified here on a local file system only.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
import torch

log = logging.getLogger("trainer.model.kernels")

NAME = "llmrec_inject"
LOCK = "build.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_THREADS = threading.Lock()  # flock is per open file: threads of one process are kept apart by this


class NoCompiler(RuntimeError):
    pass


class _FlockRefused(OSError):
    pass


def _seconds(var: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(var, default)))
    except ValueError:
        return default


def cache_root() -> str:
    """$LLMREC_KERNEL_DIR, else $TORCH_EXTENSIONS_DIR, else $XDG_CACHE_HOME/llmrec (~/.cache/llmrec)."""
    for var in ("LLMREC_KERNEL_DIR", "TORCH_EXTENSIONS_DIR"):
        if os.environ.get(var):
            return os.path.abspath(os.path.expanduser(os.environ[var]))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "llmrec")


def folder_name(source: str, cflags: list[str], ldflags: list[str]) -> str:
    """`llmrec_inject-<sha256[:12]>-torch<version>`: one folder per source, flags, torch and Python ABI."""
    h = hashlib.sha256()
    for part in (source, *cflags, "--", *ldflags, torch.__version__, torch.version.git_version or "",
                 str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")), sys.implementation.cache_tag,
                 platform.system(), platform.machine()):
        h.update(part.encode())
        h.update(b"\0")
    return f"{NAME}-{h.hexdigest()[:12]}-torch{torch.__version__}"


def load(source: str, cflags: list[str], ldflags: list[str], root: str | None = None) -> str:
    """Load the library into this process, building it first if no complete build exists; returns its path."""
    with _THREADS:
        return _load(source, cflags, ldflags, root)


def _load(source: str, cflags: list[str], ldflags: list[str], root: str | None) -> str:
    folder = os.path.join(root or cache_root(), folder_name(source, cflags, ldflags))
    lib = os.path.join(folder, NAME + ".so")
    built_here = False
    if not os.path.exists(lib):
        try:
            built_here = _build_locked(folder, lib, source, cflags, ldflags)
        except _FlockRefused as e:
            local = os.path.join(tempfile.gettempdir(), f"llmrec-kernels-{os.getuid()}", os.path.basename(folder))
            log.warning("%s refuses OS file locks (%s): building the fused injection op in the node-local %s instead",
                        folder, e, local)
            folder, lib = local, os.path.join(local, NAME + ".so")
            if not os.path.exists(lib):
                built_here = _build_locked(folder, lib, source, cflags, ldflags)
    if not built_here:  # the builder has it loaded already (load_inline loads what it builds)
        try:
            torch.ops.load_library(lib)
        except OSError as e:
            raise RuntimeError(f"could not load the fused injection op from {lib} ({e}); delete {folder} "
                               "to have it rebuilt") from e
    return lib


def _build_locked(folder: str, lib: str, source: str, cflags: list[str], ldflags: list[str]) -> bool:
    """Under the folder's flock: build unless another process did meanwhile. True if built (and loaded) here."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o664)
    except OSError as e:
        raise RuntimeError(f"the fused injection op is not built in {folder} and that folder is not writable ({e}): "
                           "set LLMREC_KERNEL_DIR to a writable folder, or build it there once with "
                           "`python launch/build_kernels.py` where it is writable") from e
    try:
        if not _acquire(fd, folder, lib):
            return False  # another process published it while this one waited
        try:
            if os.path.exists(lib):
                return False
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
            _build(folder, lib, source, cflags, ldflags)
            return True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(folder: str) -> str:
    try:
        with open(os.path.join(folder, LOCK)) as f:
            return f.read().strip() or "another process"
    except OSError:
        return "another process"


def _acquire(fd: int, folder: str, lib: str) -> bool:
    """Take the flock (True), or return False as soon as the library appears; log while waiting."""
    every = _seconds("LLMREC_KERNEL_WAIT_LOG_S", 30) or 30
    start = time.monotonic()
    next_log = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno in _NO_FLOCK:
                raise _FlockRefused(e.errno, os.strerror(e.errno)) from e
            raise
        if os.path.exists(lib):
            return False
        waited = time.monotonic() - start
        if next_log is None:
            log.info("waiting for %s, which is building the fused injection op in %s", _holder(folder), folder)
            next_log = every
        elif waited >= next_log:
            log.warning("still waiting after %.0f s for %s to build the fused injection op in %s (the OS drops "
                        "this lock when its holder dies: a live process holds it)", waited, _holder(folder), folder)
            next_log = waited + every
        time.sleep(0.2)


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def triton_c_compiler() -> str | None:
    """The C compiler Triton uses on a GPU node (its runtime/build.py, Triton 3.x): $CC, else gcc, else clang."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("gcc") or shutil.which("clang")


def check_triton_compiler(option: str = "model.injection=fused") -> None:
    """ValueError naming this node when Triton will run (the fused op on CUDA) and finds no C compiler.

    Triton compiles, with a C compiler, the small host-side launcher of its CUDA driver and of each kernel,
    on each node, on first use (then it is cached in $TRITON_CACHE_DIR, ~/.triton/cache); the GPU code
    itself goes through the ptxas that Triton ships. So unlike the C++ library (which nodes can load
    prebuilt, above), the Triton path needs gcc or clang on every GPU node. Checked on the workers before
    the first step, not met halfway through the first forward."""
    if triton_c_compiler() is None:
        cc = os.environ.get("CC")
        raise ValueError(f"{option} on a GPU runs Triton kernels, and Triton compiles their launchers with a C "
                         f"compiler on first use; node {socket.gethostname()} has none "
                         f"({f'CC={cc} not found' if cc else 'no CC, gcc or clang on PATH'}): install gcc there "
                         "(apt-get install gcc), or set model.injection=reference")


def _build(folder: str, lib: str, source: str, cflags: list[str], ldflags: list[str]) -> None:
    if _compiler() is None:
        raise NoCompiler(
            f"the fused injection op is not built for this torch in {folder} and no C++ compiler "
            f"({os.environ.get('CXX', 'c++')} or g++) is on PATH to build it. Install one (apt-get install g++), "
            "or build it once where there is one, with the same torch and Python, into a folder this machine "
            "reads (`python launch/build_kernels.py --dir DIR`, then LLMREC_KERNEL_DIR=DIR here), "
            "or set model.injection=reference")
    from torch.utils.cpp_extension import load_inline

    for old in glob.glob(os.path.join(folder, "build-*")):  # killed builders' leftovers: a live one holds the lock
        shutil.rmtree(old, ignore_errors=True)
    work = os.path.join(folder, f"build-{socket.gethostname()}-{os.getpid()}")
    os.makedirs(work)
    log.info("building the fused injection op (first use with this torch, ~40 s with g++) in %s", folder)
    start = time.monotonic()
    done = threading.Event()

    def watch():
        bound, every = _seconds("LLMREC_KERNEL_BUILD_WARN_S", 120), _seconds("LLMREC_KERNEL_WAIT_LOG_S", 30) or 30
        wait = bound
        while not done.wait(wait):
            log.warning("still building the fused injection op after %.0f s in %s (~40 s is usual; a busy "
                        "machine is slower)", time.monotonic() - start, folder)
            wait = every

    watcher = threading.Thread(target=watch, name="llmrec-kernel-build-watch", daemon=True)
    watcher.start()
    try:
        load_inline(name=NAME, cpp_sources=[source], extra_cflags=cflags, extra_ldflags=ldflags,
                    is_python_module=False, build_directory=work, verbose=False)
        os.replace(os.path.join(work, NAME + ".so"), lib)  # the published library is always complete
    finally:
        done.set()
        shutil.rmtree(work, ignore_errors=True)
    log.info("built the fused injection op in %.0f s: %s", time.monotonic() - start, lib)
