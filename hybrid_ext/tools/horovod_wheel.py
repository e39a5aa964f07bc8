"""Build, cache and install a Horovod 0.28.1 wheel that works with the installed torch.

Horovod's last release (0.28.1, June 2023) does not build against torch >= 2.10: torch's headers need C++20
and Horovod's CMake forces C++14. Upstream fixed this on master (horovod/horovod PR #3998) but never made a
release. This tool applies the same two-line fix to the released sdist, builds a wheel with PyTorch + Gloo
support (no MPI, TensorFlow or MXNet) — plus NCCL GPU operations where a GPU is present (``HYBRID_EXT_HOROVOD_GPU``
forces either way) — and keeps it in a cache outside the repository, keyed by the Python, torch and CUDA
versions it was built against and whether it has GPU operations, so that later environments install it in
seconds instead of compiling for several minutes.

Usage::

    python -m hybrid_ext.tools.horovod_wheel            # install (build only if the cache has no wheel)
    python -m hybrid_ext.tools.horovod_wheel --rebuild  # ignore the cache
    hybrid-ext install-horovod                           # the same, from the CLI

The cache lives under ``$HYBRID_EXT_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/hybrid-ext``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

from hybrid_ext import config

HOROVOD_VERSION = "0.28.1"

# The C++ standard fix (what horovod PR #3998 does on master): these files force C++14; torch >= 2.10 needs 20.
# Gloo's own `set(CMAKE_CXX_STANDARD 17)`, prepended to its CMake by Horovod, is left alone.
CXX_STANDARD_FILES = ("CMakeLists.txt", "horovod/torch/CMakeLists.txt")
CXX14_LINE = "set(CMAKE_CXX_STANDARD 14)"
CXX20_LINE = "set(CMAKE_CXX_STANDARD 20)"

BUILD_ENV = {
    "HOROVOD_WITH_PYTORCH": "1",
    "HOROVOD_WITH_GLOO": "1",
    "HOROVOD_WITHOUT_MPI": "1",
    "HOROVOD_WITHOUT_TENSORFLOW": "1",
    "HOROVOD_WITHOUT_MXNET": "1",
    "HOROVOD_CPU_OPERATIONS": "GLOO",
    # Needed when a CMake >= 4 is on PATH: Horovod's third-party CMake files declare very old minimums.
    "CMAKE_POLICY_VERSION_MINIMUM": "3.5",
}


def log(message: str) -> None:
    print(f"[horovod-wheel] {message}", flush=True)


def cache_root() -> Path:
    return config.cache_dir()


GPU_ENV = "HYBRID_EXT_HOROVOD_GPU"  # on: build NCCL GPU operations; off: never; auto (default): when a GPU is present
# Data-centre and workstation GPUs of the last generations that CUDA 12/13 still compiles for (Turing to Hopper);
# override with HOROVOD_BUILD_CUDA_CC_LIST.
GPU_ARCHITECTURES = "75,80,86,89,90"


def gpu_operations_wanted() -> bool:
    """Build Horovod's NCCL GPU operations: when asked, else when this torch is a CUDA build and sees a GPU."""
    import torch

    choice = config.get(GPU_ENV)
    if choice != "auto":
        return choice == "on"
    return bool(torch.version.cuda) and torch.cuda.is_available()


def build_key() -> str:
    """What the built extension depends on: Python ABI, torch version (its C++ ABI), CUDA version, GPU ops."""
    import torch

    python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    torch_version = torch.__version__.split("+")[0]
    nccl = "-nccl" if gpu_operations_wanted() else ""
    return f"{python_tag}-torch{torch_version}-{cuda}{nccl}-{sysconfig.get_platform()}"


def cached_wheel_dir() -> Path:
    return cache_root() / "wheels" / f"horovod-{HOROVOD_VERSION}" / build_key()


def find_cached_wheel() -> Path | None:
    wheels = sorted(cached_wheel_dir().glob(f"horovod-{HOROVOD_VERSION}-*.whl"))
    return wheels[-1] if wheels else None


def installed_horovod_works() -> bool:
    """True if a Horovod of the right version with its torch extension imports in this interpreter."""
    nccl = " and hvd.nccl_built()" if gpu_operations_wanted() else ""
    code = (
        "import horovod, horovod.torch as hvd, sys; "
        f"sys.exit(0 if horovod.__version__ == '{HOROVOD_VERSION}' and hvd.gloo_built(){nccl} else 1)"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def find_cuda_home() -> Path | None:
    """The CUDA toolkit a CUDA build of torch makes Horovod's CMake look for; None if not needed or not found."""
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDAToolkit_ROOT"):
        if os.environ.get(var) and Path(os.environ[var], "include", "cuda_runtime.h").exists():
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(nvcc).resolve().parent.parent
        if (home / "include" / "cuda_runtime.h").exists():
            return home
    default = Path("/usr/local/cuda")  # NVIDIA's default install location
    return default if (default / "include" / "cuda_runtime.h").exists() else None


def find_nccl() -> tuple[Path, Path] | None:
    """NCCL's include and library directories: ``NCCL_HOME``, else the ``nvidia-nccl`` wheel CUDA torch pulls in."""
    import importlib.util

    if os.environ.get("NCCL_HOME"):
        home = Path(os.environ["NCCL_HOME"])
        return home / "include", home / "lib"
    spec = importlib.util.find_spec("nvidia.nccl") if importlib.util.find_spec("nvidia") else None
    for location in (spec.submodule_search_locations or []) if spec else []:
        home = Path(location)
        if (home / "include" / "nccl.h").exists() and any((home / "lib").glob("libnccl.so*")):
            return home / "include", home / "lib"
    return None


def nccl_link_dir(lib: Path, work: Path) -> Path:
    """A directory with ``libnccl.so`` for the linker (the wheel ships only ``libnccl.so.2``)."""
    if (lib / "libnccl.so").exists():
        return lib
    (versioned,) = sorted(lib.glob("libnccl.so.*"))[:1]
    links = work / "nccl-lib"
    links.mkdir(exist_ok=True)
    (links / "libnccl.so").symlink_to(versioned)
    (links / versioned.name).symlink_to(versioned)
    return links


def build_environment(work: Path | None = None) -> dict[str, str]:
    import torch

    env = dict(os.environ)
    env.update(BUILD_ENV)
    env.setdefault("MAKEFLAGS", f"-j{os.cpu_count() or 2}")
    if torch.version.cuda:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            raise SystemExit(
                f"torch {torch.__version__} is a CUDA build, so Horovod's CMake needs the CUDA toolkit "
                "(headers and libcudart), and none was found: set CUDA_HOME, put nvcc on PATH, "
                "or install a CPU-only torch."
            )
        log(f"torch is a CUDA {torch.version.cuda} build; using the CUDA toolkit at {cuda_home}")
        env["CUDA_HOME"] = str(cuda_home)
        env["CUDAToolkit_ROOT"] = str(cuda_home)
        if gpu_operations_wanted():
            nccl = find_nccl()
            if nccl is None:
                raise SystemExit(
                    "GPU operations need NCCL's headers and library: set NCCL_HOME, or install torch's "
                    f"nvidia-nccl wheel (or set {GPU_ENV}=0 for a CPU-only Horovod)"
                )
            include, lib = nccl
            log(f"building NCCL GPU operations (NCCL at {include.parent}) for architectures {GPU_ARCHITECTURES}")
            env.update(
                HOROVOD_GPU_OPERATIONS="NCCL",
                HOROVOD_NCCL_INCLUDE=str(include),
                HOROVOD_NCCL_LIB=str(nccl_link_dir(lib, work or Path(tempfile.mkdtemp()))),
                HOROVOD_NCCL_LINK="SHARED",
            )
            env.setdefault("HOROVOD_BUILD_CUDA_CC_LIST", GPU_ARCHITECTURES)
        else:
            # No GPU operations: one architecture keeps the (unused) CUDA kernel build short.
            env.setdefault("HOROVOD_BUILD_CUDA_CC_LIST", "90")
    return env


def patch_cxx_standard(source: Path) -> None:
    for relative in CXX_STANDARD_FILES:
        path = source / relative
        text = path.read_text()
        if CXX14_LINE not in text:
            raise SystemExit(f"{path}: expected the line {CXX14_LINE!r}; is this Horovod {HOROVOD_VERSION}?")
        path.write_text(text.replace(CXX14_LINE, CXX20_LINE))
        log(f"patched {relative}: C++14 -> C++20")


def build_wheel(into: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="horovod-build-") as tmp:
        work = Path(tmp)
        log(f"downloading the horovod=={HOROVOD_VERSION} sdist")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"horovod=={HOROVOD_VERSION}", "-d", str(work)],
            check=True,
        )  # fmt: skip
        (sdist,) = glob.glob(str(work / f"horovod-{HOROVOD_VERSION}.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
        source = work / f"horovod-{HOROVOD_VERSION}"
        patch_cxx_standard(source)
        ops = "PyTorch + Gloo + NCCL" if gpu_operations_wanted() else "PyTorch + Gloo"
        log(f"building the wheel ({ops}; this takes several minutes on 2 cores)")
        out = work / "dist"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
            check=True,
            env=build_environment(work),
        )
        (wheel,) = out.glob("horovod-*.whl")
        into.mkdir(parents=True, exist_ok=True)
        target = into / wheel.name
        shutil.copy2(wheel, target.with_suffix(".partial"))
        os.replace(target.with_suffix(".partial"), target)  # atomic: a killed build leaves no half wheel
        return target


def install(rebuild: bool = False) -> Path | None:
    if not rebuild and installed_horovod_works():
        log(f"Horovod {HOROVOD_VERSION} with PyTorch + Gloo is already installed; nothing to do")
        return None
    wheel = None if rebuild else find_cached_wheel()
    if wheel is not None:
        log(f"reusing the cached wheel {wheel} (no compilation)")
    else:
        wheel = build_wheel(cached_wheel_dir())
        log(f"built and cached {wheel}")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
    )
    # Again with dependencies: Horovod's own runtime requirements (cffi, cloudpickle, psutil, pyyaml, packaging).
    subprocess.run([sys.executable, "-m", "pip", "install", str(wheel)], check=True)
    if not installed_horovod_works():
        raise SystemExit(f"installed {wheel}, but `import horovod.torch` fails or has no Gloo support")
    log(f"Horovod {HOROVOD_VERSION} installed from {wheel}")
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="build again even if a cached wheel exists")
    parser.add_argument("--print-cache", action="store_true", help="print the cache directory for this build and exit")
    args = parser.parse_args(argv)
    if args.print_cache:
        print(cached_wheel_dir())
        return 0
    install(rebuild=args.rebuild)
    return 0


if __name__ == "__main__":
    sys.exit(main())
