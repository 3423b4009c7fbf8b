"""Optional C++ CPU kernels, compiled on first use (torch cpp_extension + ninja) and cached in
the user cache folder. If the build fails, callers fall back to the pure-torch path (and say so
once on the log): the kernels are an optimization, never a requirement."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
_lock = threading.Lock()
_module = None
_bound = None  # the extension as a Python module: direct pybind11 bindings (lora.cpp)
_failed = False


def cpu_tag(cpuinfo: str | None = None) -> str:
    """A short name for what `-march=native` compiles for on this CPU: its model name and
    instruction-set flags. Builds live in one folder per tag, because torch's extension cache
    rebuilds on a source or flag change but not on a CPU change: an AVX-512 build left in a
    home folder shared with an AVX2-only machine would die there of an illegal instruction."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model = flags = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = " ".join(sorted(value.split()))
    ident = f"{platform.machine()}|{model}|{flags}" if flags else \
        f"{platform.machine()}|{platform.processor()}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


# What a kernel build runs: torch starts ninja in the build folder, and the compiler driver,
# its passes and the linker inherit that working folder.
_BUILD_TOOLS = frozenset({"ninja", "c++", "g++", "gcc", "cc", "cc1plus", "as", "ld", "collect2",
                          "clang", "clang++"})


def _building_in(folder: Path) -> list[int]:
    """Ids of this user's build tools (ninja, compilers, linker) working in `folder` (Linux
    /proc; empty elsewhere). Other processes there, such as a shell, do not count."""
    pids = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return pids
    target = str(folder.resolve())
    for e in entries:
        if e.name.isdigit() and int(e.name) != os.getpid():
            try:
                if (os.readlink(e / "cwd") == target
                        and (e / "comm").read_text().strip() in _BUILD_TOOLS):
                    pids.append(int(e.name))
            except OSError:  # gone, or another user's
                pass
    return pids


@contextlib.contextmanager
def build_lock(build: Path, wait_note_s: float = 2.0) -> Iterator[None]:
    """Hold the build folder's lock for one build-or-load of the kernels, and clear what an
    interrupted build left behind.

    torch's extension builder guards a folder with a plain `lock` file and waits, forever and
    silently, while that file exists; a build killed mid-way (kill -9, the OOM killer, a CI
    timeout's SIGKILL) leaves it behind, and every later start then hangs. So every loraplex
    process first takes an advisory lock (`flock`) on `build.flock` in the same folder, which
    the OS drops when its holder dies, however it dies. Holding it, a process knows no other
    loraplex process is building here; a `lock` file it then finds is stale once no process
    still works in the folder (a compiler orphaned by a killed build runs on: it is waited
    for), and it says so and removes it. A process that waits for the flock longer than
    `wait_note_s` says so.

    Limits: a loraplex version without this lock, or a flock that is local to each host (some
    NFS mounts) while the cache folder is shared between hosts of the same CPU kind, can make a
    live `lock` look stale. Where flock is not available, torch's lock alone guards the
    folder."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock alone
        fcntl = None
    with open(build / "build.flock", "a") as f:
        locked = False
        if fcntl is not None:
            try:
                _take_flock(fcntl, f, build, wait_note_s)
                locked = True
            except OSError as e:  # a file system without flock (some NFS mounts)
                log.warning("cannot lock %s (%s): a stale kernel build lock there would not "
                            "be detected", build, e)
        try:
            stale = build / "lock"
            if locked and stale.exists():
                _clear_stale(stale, build)
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


def _take_flock(fcntl, f, build: Path, wait_note_s: float) -> None:
    """Take the exclusive flock, saying so if another process holds it for long."""
    t0, noted = time.monotonic(), False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not noted and time.monotonic() - t0 > wait_note_s:
                log.warning("waiting for another process that is building or loading the C++ "
                            "kernels in %s", build)
                noted = True
            time.sleep(0.1)
    if noted:
        log.warning("the other process let the kernel folder go after %.0f s",
                    time.monotonic() - t0)


def _clear_stale(stale: Path, build: Path) -> None:
    """Remove torch's `lock` left by an interrupted build, once no process works in the
    folder (an orphaned ninja or compiler finishes first)."""
    busy = _building_in(build)
    if busy:
        log.warning("a kernel build lock %s has no live loraplex owner, but build tools %s "
                    "still work in that folder (from an interrupted build): waiting for them",
                    stale, busy)
        while _building_in(build):
            time.sleep(0.2)
    if stale.exists():
        log.warning("removing a stale kernel build lock %s: a build was interrupted and no "
                    "process holds the folder", stale)
        stale.unlink(missing_ok=True)


def kernels():
    """The compiled ops (torch.ops.loraplex), or None when they cannot be built here."""
    global _module, _bound, _failed
    if _module is not None or _failed:
        return _module
    if os.environ.get("LORAPLEX_NO_KERNELS"):
        _failed = True
        return None
    with _lock:
        if _module is not None or _failed:
            return _module
        try:
            from torch.utils.cpp_extension import load

            from loraplex.model.gguf_convert import cache_root

            build = cache_root() / "kernels" / cpu_tag()
            build.mkdir(parents=True, exist_ok=True)
            here = Path(__file__).parent
            srcs = [str(here / n) for n in ("paged_attention.cpp", "fused_ops.cpp", "lora.cpp",
                                             "amx_gemm.cpp")]
            import torch

            with build_lock(build):
                so = build / "loraplex_kernels.so"
                before = so.stat().st_mtime_ns if so.exists() else None
                if before is None:
                    log.warning("compiling the C++ kernels for this CPU into %s (first run "
                                "only; about a minute)", build)
                t0 = time.monotonic()
                _bound = load(name="loraplex_kernels", sources=srcs,
                              extra_cflags=["-O3", "-march=native", "-fopenmp"],
                              extra_ldflags=["-fopenmp"],
                              build_directory=str(build), verbose=False,
                              is_python_module=True)
                if so.exists() and so.stat().st_mtime_ns != before:
                    log.warning("built the C++ kernels in %.0f s", time.monotonic() - t0)
            _module = torch.ops.loraplex
            if os.environ.get("LORAPLEX_NO_LORA_AMX"):
                _bound.lora_set_amx(False)
        except Exception as e:  # no compiler, no ninja, ...: the torch path still works
            _failed = True
            log.warning("C++ paged attention unavailable (%s); using the torch path", e)
    return _module


def kernels_for(device, dtype, enabled: bool = True):
    """The C++ attention and fused ops if this engine should use them (CPU, float32 or
    bfloat16, not disabled), else None."""
    import torch

    if not enabled or device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    return kernels()


def lora_kernel_for(device, dtype, lora_dtype, enabled: bool = True):
    """The C++ segmented LoRA delta if it serves these activation and adapter dtypes (CPU,
    float32 or bfloat16 activations; float32, bfloat16 or float16 adapters), else None (the
    torch path)."""
    import torch

    ok = (torch.float32, torch.bfloat16)
    if (not enabled or device.type != "cpu" or dtype not in ok
            or lora_dtype not in (*ok, torch.float16)):
        return None
    # The op's direct binding: the same function as torch.ops.loraplex.lora_delta_, called
    # without the dispatcher (see the end of lora.cpp).
    return None if kernels() is None else _bound.lora_delta_


def amx_gemm_supported() -> bool:
    """Whether the bf16 AMX GEMM (amx_gemm.cpp, cpu_gemm "amx") runs here: an Intel CPU with
    AMX-BF16, a compiler that targets it, and the OS granting the tile state."""
    return kernels() is not None and bool(_bound.amx_gemm_supported())


def amx_linear_op():
    """The bf16 AMX GEMM's direct binding, amx_linear(y, x, wp, bias) (see amx_gemm.cpp), or
    None where it does not run."""
    return _bound.amx_linear if amx_gemm_supported() else None


def lora_pairs_supported() -> bool:
    """Whether the built LoRA kernel has the pair layout (bf16 activations and bf16 adapters on
    CPUs with AVX512-BF16: two multiply-adds per lane and instruction; see lora.cpp).
    LORAPLEX_NO_LORA_PAIRS=1 keeps engines built while it is set on the plain layout (for
    side-by-side benchmarks)."""
    if os.environ.get("LORAPLEX_NO_LORA_PAIRS"):
        return False
    return kernels() is not None and bool(_bound.lora_pairs_supported())


def lora_amx_supported() -> bool:
    """Whether the built LoRA kernel can run the pair layout on AMX tiles here (Intel CPUs
    with AMX-BF16, a compiler that knows AMX, and the OS granting the tile state; groups of
    >= 4 tokens of one adapter take them; see lora.cpp's namespace amx). Whether the path is
    on is `lora_amx_on()`: LORAPLEX_NO_LORA_AMX=1 turns it off when the kernels load."""
    return kernels() is not None and bool(_bound.lora_amx_supported())


def lora_amx_on() -> bool:
    """Whether the LoRA kernel's AMX tile path is on for later calls."""
    return kernels() is not None and bool(_bound.lora_amx_on())


def lora_amx_items() -> int:
    """Work items the LoRA kernel has run on AMX tiles in this process (tests use it to check
    that the tile path really runs)."""
    return int(_bound.lora_amx_items()) if kernels() is not None else 0


def set_lora_amx(on: bool) -> bool:
    """Turn the LoRA kernel's AMX tile path on or off for later calls (benchmarks and tests
    compare the two paths in one process; this overrides LORAPLEX_NO_LORA_AMX); returns
    whether it is now on."""
    return kernels() is not None and bool(_bound.lora_set_amx(on))
