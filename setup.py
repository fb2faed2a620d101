"""Builds the CUDA extension `cpoly_kernels._C` with CMake + ninja + pybind11.

Environment:
  CPOLY_BUILD_CUDA   unset: build when nvcc is found; "0": skip; "1": build
                     and fail if nvcc is missing or the build fails.
  CPOLY_CUDA_ARCHS   CUDA architectures, e.g. "80,90" (the default) or "90";
                     each gets SASS, the newest also PTX for newer GPUs.
nvcc is looked for on PATH, then in $CUDA_HOME/bin, then /usr/local/cuda/bin.
Metadata lives in pyproject.toml.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80,90"


def find_nvcc():
    """Path of nvcc, or None."""
    candidates = [shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def cmake_archs(spec):
    """CPOLY_CUDA_ARCHS ("80,90", "9.0", "sm_90a; 80") -> CMAKE_CUDA_ARCHITECTURES.

    Every architecture gets SASS ("-real"); the newest also gets PTX so newer
    GPUs can JIT it.
    """
    archs = []
    for item in re.split(r"[,;\s]+", spec.strip()):
        if not item:
            continue
        arch = item.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"[1-9][0-9]+[af]?", arch):
            raise ValueError(f"CPOLY_CUDA_ARCHS: expected architectures like '80,90', got {spec!r}")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError(f"CPOLY_CUDA_ARCHS: expected at least one architecture, got {spec!r}")
    archs.sort(key=lambda a: int(re.match(r"[0-9]+", a).group()))
    return ";".join([f"{a}-real" for a in archs[:-1]] + [archs[-1]])


def build_mode():
    """"skip", "auto" or "force", from CPOLY_BUILD_CUDA."""
    value = os.environ.get("CPOLY_BUILD_CUDA", "")
    modes = {"": "auto", "0": "skip", "1": "force"}
    if value not in modes:
        raise ValueError(f"CPOLY_BUILD_CUDA: expected unset, '0' or '1', got {value!r}")
    return modes[value]


def tool(module, name):
    """A build tool from its PyPI package (the build requirements), else from PATH."""
    try:
        mod = __import__(module)
        path = os.path.join(mod.BIN_DIR if module == "ninja" else mod.CMAKE_BIN_DIR, name)
        if os.path.isfile(path):
            return path
    except (ImportError, AttributeError):
        pass
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"cpoly_kernels._C: {name} not found (pip install {module})")
    return found


class CMakeExtension(Extension):
    def __init__(self, name, nvcc):
        super().__init__(name, sources=[])
        self.nvcc = nvcc


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = tool("cmake", "cmake")
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={tool('ninja', 'ninja')}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={cmake_archs(os.environ.get('CPOLY_CUDA_ARCHS', DEFAULT_ARCHS))}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCPOLY_OUTPUT_DIR={target.parent}",
            f"-DCPOLY_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        stamp = build_dir / "cpoly-configure.txt"
        if stamp.is_file() and stamp.read_text() != "\n".join(configure):
            shutil.rmtree(build_dir)  # another compiler, Python or build env: start afresh
            build_dir.mkdir(parents=True)
        subprocess.run(configure, check=True)
        stamp.write_text("\n".join(configure))
        subprocess.run([cmake, "--build", str(build_dir)], check=True)
        if not target.is_file():
            raise RuntimeError(f"cpoly_kernels._C: CMake did not produce {target}")


def extensions():
    mode = build_mode()
    if mode == "skip":
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "force":
            raise RuntimeError(
                "CPOLY_BUILD_CUDA=1: nvcc not found on PATH, in $CUDA_HOME/bin or in /usr/local/cuda/bin"
            )
        print("cpoly_kernels: nvcc not found, building without the CUDA extension", file=sys.stderr)
        return []
    return [CMakeExtension("cpoly_kernels._C", nvcc)]


if __name__ == "__main__":
    setup(ext_modules=extensions(), cmdclass={"build_ext": CMakeBuild})
