"""Build of fastmlm: pure Python plus one compiled module, fastmlm._C.

setup.py drives CMake (CMakeLists.txt) with ninja from a build_ext subclass,
as vLLM does; the module is plain pybind11 (no PyTorch at build time).

Environment:
  FASTMLM_BUILD_EXT=0     pure-Python install, no fastmlm._C (ops use other backends)
  FASTMLM_CUDA=auto|0|1   CUDA kernels when nvcc is found (default) / never / required
  FASTMLM_CUDA_ARCHS      CMake list ("80-real;90", the default: sm_80 and sm_90
                          machine code plus compute_90 PTX) or TORCH_CUDA_ARCH_LIST
                          style ("8.0 9.0+PTX")
  FASTMLM_BUILD_TYPE      CMake build type (Release)
  MAX_JOBS                parallel compile jobs (default: ninja's choice)
  CUDACXX                 the nvcc to use, if not the one on PATH

Development: `pip install --no-build-isolation -e .` or
`python setup.py build_ext --inplace` put fastmlm/_C*.so into the source tree.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def cuda_architectures(value: str) -> str:
    """CMake CUDA_ARCHITECTURES from either CMake syntax or TORCH_CUDA_ARCH_LIST syntax.

    "8.0 9.0+PTX" -> "80-real;90" (machine code for each, PTX where +PTX);
    "80;90" or "80-real;90" are passed through.
    """
    entries = [e for e in re.split(r"[;,\s]+", value.strip()) if e]
    if not any("." in e for e in entries):
        return ";".join(entries)
    converted = []
    for entry in entries:
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry, flags=re.IGNORECASE)
        if match is None:
            raise ValueError(f"FASTMLM_CUDA_ARCHS: cannot read {entry!r} (expected e.g. 8.0, 9.0a or 9.0+PTX)")
        major, minor, suffix, ptx = match.groups()
        arch = f"{major}{minor}{suffix.lower()}"
        converted.append(arch if ptx else f"{arch}-real")
    return ";".join(converted)


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt into the directory setuptools expects."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if shutil.which("cmake") is None:
            raise RuntimeError("building fastmlm._C needs cmake >= 3.21 (pip install cmake), "
                               "or install with FASTMLM_BUILD_EXT=0 for a pure-Python fastmlm")
        import pybind11

        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)

        cuda_mode = _env_flag("FASTMLM_CUDA", "auto")
        if cuda_mode not in ("auto", "0", "1", "off", "on", "no", "yes", "false", "true"):
            raise ValueError(f"FASTMLM_CUDA must be auto, 0 or 1, got {cuda_mode!r}")
        cmake_cuda = {"0": "OFF", "off": "OFF", "no": "OFF", "false": "OFF"}.get(
            cuda_mode, "AUTO" if cuda_mode == "auto" else "ON")
        args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('FASTMLM_BUILD_TYPE', 'Release')}",
            f"-DFASTMLM_OUTPUT_DIR={output_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTMLM_CUDA={cmake_cuda}",
            f"-DFASTMLM_CUDA_ARCHS={cuda_architectures(os.environ.get('FASTMLM_CUDA_ARCHS', '80-real;90'))}",
        ]
        if shutil.which("ninja") is not None:
            args.append("-GNinja")
        if cmake_cuda != "OFF" and "CUDACXX" not in os.environ and shutil.which("nvcc") is None:
            # CMake looks on PATH; also try the usual toolkit locations.
            for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
                if home and (Path(home) / "bin" / "nvcc").exists():
                    args.append(f"-DCMAKE_CUDA_COMPILER={Path(home) / 'bin' / 'nvcc'}")
                    break

        build_args = []
        if os.environ.get("MAX_JOBS"):
            build_args += ["--parallel", os.environ["MAX_JOBS"]]
        subprocess.run(["cmake", "-S", ext.source_dir, "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "_C", *build_args], check=True)


def extensions() -> list[Extension]:
    if _env_flag("FASTMLM_BUILD_EXT", "1") in ("0", "off", "no", "false"):
        return []
    return [CMakeExtension("fastmlm._C", ROOT)]


setup(ext_modules=extensions(), cmdclass={"build_ext": CMakeBuild})
