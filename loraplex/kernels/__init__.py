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


@contextlib.contextmanager
def build_lock(build: Path) -> Iterator[None]:
    """Hold the build folder's lock for one build-or-load of the kernels, and clear what an
    interrupted build left behind.

    torch's extension builder guards a folder with a plain `lock` file and waits, forever and
    silently, while that file exists; a build killed mid-way (Ctrl-C, OOM, a CI timeout)
    leaves it behind, and every later start then hangs. So every loraplex process first takes
    an advisory lock (`flock`) on `build.flock` in the same folder: the kernel drops it when
    its holder dies, however it dies. A process that holds it knows no other loraplex process
    is building here, so a `lock` file it then finds is stale: it says so and removes it. A
    process that finds the flock taken says that it is waiting for another build."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock alone
        yield
        return
    with open(build / "build.flock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process that is building the C++ kernels in %s",
                        build)
            t0 = time.monotonic()
            fcntl.flock(f, fcntl.LOCK_EX)
            log.warning("the other kernel build finished after %.0f s of waiting",
                        time.monotonic() - t0)
        except OSError as e:  # a file system without flock (some NFS mounts): torch's lock only
            log.warning("cannot lock %s (%s): a stale kernel build lock there would not be "
                        "detected", build, e)
            yield
            return
        try:
            stale = build / "lock"
            if stale.exists():
                log.warning("removing a stale kernel build lock %s: a build was interrupted "
                            "and no process holds the folder", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
            srcs = [str(here / n) for n in ("paged_attention.cpp", "fused_ops.cpp", "lora.cpp")]
            import torch

            with build_lock(build):
                if not (build / "loraplex_kernels.so").exists():
                    log.warning("compiling the C++ kernels for this CPU into %s (first run "
                                "only; about a minute)", build)
                t0 = time.monotonic()
                _bound = load(name="loraplex_kernels", sources=srcs,
                              extra_cflags=["-O3", "-march=native", "-fopenmp"],
                              extra_ldflags=["-fopenmp"],
                              build_directory=str(build), verbose=False,
                              is_python_module=True)
                if time.monotonic() - t0 > 10:
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
    float32 or bfloat16 each), else None (the torch path)."""
    import torch

    ok = (torch.float32, torch.bfloat16)
    if not enabled or device.type != "cpu" or dtype not in ok or lora_dtype not in ok:
        return None
    # The op's direct binding: the same function as torch.ops.loraplex.lora_delta_, called
    # without the dispatcher (see the end of lora.cpp).
    return None if kernels() is None else _bound.lora_delta_


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
