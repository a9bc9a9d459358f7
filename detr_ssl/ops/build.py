"""Just-in-time builds of the compiled kernels, cached on disk.

Two extensions: "cpu" (ms_deform_attn's CPU kernel and the CPU kernel of :mod:`.seeded_dropout`) and
"cuda" (ms_deform_attn's CUDA kernel).

Nothing is compiled at import time: :func:`load_extension` builds a kernel the first time it
is needed, with ``torch.utils.cpp_extension.load``, into a directory named after the torch
version and a hash of everything that goes into the build (sources, flags, Python ABI, CUDA
architectures), so that later processes load it without compiling and a stale build is never
reused. cpp_extension's lock file in that directory makes concurrent builds wait for one another.

The cache root is ``$DETR_SSL_CACHE``, else ``$XDG_CACHE_HOME/detr_ssl``, else
``~/.cache/detr_ssl``. The CUDA kernel is built for ``$TORCH_CUDA_ARCH_LIST`` when it is set
(no GPU needed), else for the visible GPUs; a build made ahead of time with the variable set is
reused at run time only with the same value set.

    python -m detr_ssl.ops.build                  # CPU kernel, and CUDA kernel where CUDA can build
    TORCH_CUDA_ARCH_LIST=9.0 python -m detr_ssl.ops.build --cuda
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = {
    "cpu": ["cpu/ms_deform_attn_cpu.cpp", "cpu/dropout_cpu.cpp", "binding.cpp"],
    "cuda": ["cuda/ms_deform_attn_cuda.cu", "binding.cpp"],
}
CFLAGS = ["-O3", "-fopenmp"]
CPU_DEFINES = ["-DDETR_SSL_CPU_KERNELS"]  # binding.cpp: the CPU-only kernels
# Where PyTorch itself runs its AVX2 or AVX-512 kernels (so the CPU has AVX2 and FMA), the CPU kernel's
# channel loops are compiled 8 wide with fused multiply-adds: forward + backward 1.2-1.3x faster than
# the generic x86-64 build; AVX-512 code (-march=x86-64-v4) gained nothing more (docs/benchmarks.md).
VECTOR_CFLAGS = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx2", "-mfma"]}
LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3"]

logger = logging.getLogger("detr_ssl")

_loaded: dict[str, ModuleType | ExtensionBuildError] = {}


class ExtensionBuildError(RuntimeError):
    """A kernel could not be built or loaded; the compiler's message is in ``__cause__``."""


def cache_root() -> Path:
    if os.environ.get("DETR_SSL_CACHE"):
        return Path(os.environ["DETR_SSL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "detr_ssl"


def cuda_arch_key() -> str:
    """The CUDA architectures a build targets: $TORCH_CUDA_ARCH_LIST, else the visible GPUs'."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if arch_list and arch_list != "native":
        return arch_list
    if not torch.cuda.is_available():
        raise ExtensionBuildError("no GPU is visible to build the CUDA kernel for: set TORCH_CUDA_ARCH_LIST, e.g. 9.0")
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return "native:" + ";".join(f"{major}.{minor}" for major, minor in capabilities)


def nvcc_toolkit() -> Path | None:
    """Root of the CUDA toolkit that the ``nvcc`` on PATH belongs to, as nvcc itself reports it.

    cpp_extension guesses the root as nvcc's grandparent directory, which is wrong where nvcc is
    a wrapper script (``/usr/local/bin/nvcc`` calling ``/usr/local/cuda-13.0/bin/nvcc``).
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry_run = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for line in dry_run.splitlines():
        if line.startswith("#$ _HERE_="):
            return Path(line.split("=", 1)[1].strip()).parent
    return None


def cflags(kind: str) -> list[str]:
    """The host compiler's flags: the vector units PyTorch found on this CPU for the CPU kernel
    (``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine gives the AVX2 build, as for PyTorch's own kernels)."""
    if kind != "cpu":
        return CFLAGS
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return CFLAGS + CPU_DEFINES
    return CFLAGS + CPU_DEFINES + VECTOR_CFLAGS.get(torch.backends.cpu.get_cpu_capability(), [])


def build_directory(kind: str) -> Path:
    """``<cache root>/ops/<kind>-<torch version>-<hash of the build inputs>``."""
    digest = hashlib.sha256()
    for path in [CSRC / source for source in SOURCES[kind]] + sorted(CSRC.rglob("*.h")):
        digest.update(path.relative_to(CSRC).as_posix().encode())
        digest.update(path.read_bytes())
    inputs = [kind, torch.__version__, str(torch.version.cuda), sys.implementation.cache_tag, cflags(kind), LDFLAGS]
    if kind == "cuda":
        inputs += [CUDA_CFLAGS, cuda_arch_key()]
    digest.update(repr(inputs).encode())
    return cache_root() / "ops" / f"{kind}-{torch.__version__}-{digest.hexdigest()[:16]}"


def load_extension(kind: str, verbose: bool = False) -> ModuleType:
    """The compiled ``kind`` kernel ("cpu" or "cuda"), built on first use.

    A failure is remembered for the rest of the process, so a broken toolchain costs one try.
    Raises :class:`ExtensionBuildError`.
    """
    if kind not in SOURCES:
        raise ValueError(f"unknown kernel {kind!r}; choose from {', '.join(SOURCES)}")
    if kind not in _loaded:
        try:
            _loaded[kind] = _build(kind, verbose)
        except Exception as err:
            summary = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if len(summary) > 100:  # cpp_extension's message goes on with the compiler's command line
                summary = summary[:100] + "..."
            error = ExtensionBuildError(f"could not build the {kind} kernels of detr_ssl ({summary}); "
                                        f"`python -m detr_ssl.ops.build --{kind}` shows the compiler's output")
            error.__cause__ = err
            _loaded[kind] = error
    result = _loaded[kind]
    if isinstance(result, ExtensionBuildError):
        raise result
    return result


def _build(kind: str, verbose: bool) -> ModuleType:
    directory = build_directory(kind)
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        logger.info("detr_ssl: compiling the %s kernels (first use, under a minute; cached in %s)", kind, directory)
    cpp_extension = _import_cpp_extension()
    if kind == "cuda":
        _find_cuda_toolkit(cpp_extension)
    return cpp_extension.load(
        name=f"detr_ssl_kernels_{kind}",
        sources=[str(CSRC / source) for source in SOURCES[kind]],
        extra_cflags=cflags(kind),
        extra_cuda_cflags=CUDA_CFLAGS if kind == "cuda" else None,
        extra_ldflags=LDFLAGS,
        build_directory=str(directory),
        verbose=verbose,
    )


def _import_cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension (slow to import, hence not at the top), without the warning it
    logs on machines without a GPU: noise for the CPU kernel, and the CUDA build finds its
    toolkit in :func:`_find_cuda_toolkit`."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)
    return cpp_extension


def _find_cuda_toolkit(cpp_extension: ModuleType) -> None:
    """Point cpp_extension at the toolkit of the nvcc on PATH where its own guess has no headers
    and neither $CUDA_HOME nor $CUDA_PATH says where the toolkit is."""
    guess = cpp_extension.CUDA_HOME
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if guess and (Path(guess) / "include" / "cuda_runtime.h").exists():
        return
    toolkit = nvcc_toolkit()
    if toolkit is None or not (toolkit / "include" / "cuda_runtime.h").exists():
        raise ExtensionBuildError(f"no CUDA toolkit found (cpp_extension guessed {guess}); set CUDA_HOME")
    cpp_extension.CUDA_HOME = str(toolkit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="build the CPU kernel")
    parser.add_argument("--cuda", action="store_true", help="build the CUDA kernel")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kinds = [kind for kind in SOURCES if getattr(args, kind)]
    if not kinds:
        cuda_buildable = torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        kinds = ["cpu", "cuda"] if cuda_buildable else ["cpu"]
    failed = False
    for kind in kinds:
        try:
            module = load_extension(kind, verbose=args.verbose)
        except ExtensionBuildError as err:
            print(f"{kind}: FAILED\n{err.__cause__ or err}", file=sys.stderr)
            failed = True
        else:
            print(f"{kind}: {module.__file__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
