"""Builds the C++ CPU backend ``sparseinfer._C`` with CMake (see CMakeLists.txt, csrc/README.md).

    pip install .                          # builds the extension (isolated: pybind11, cmake, ninja from PyPI)
    pip install -e . --no-build-isolation  # editable: _C*.so lands next to sparseinfer/__init__.py
    python setup.py build_ext --inplace    # quick in-place rebuild while developing (incremental)

SPARSEINFER_BUILD_EXT selects what happens to the extension:
    auto (default)  build it; if CMake or a C++ compiler is missing or the build fails, say why and
                    install pure Python (the reference backend always works)
    1               build it, and fail the install if that fails (CI)
    0               skip it: pure-Python install
SPARSEINFER_BUILD_TYPE (Release) and SPARSEINFER_BUILD_JOBS (all cores) tune the CMake build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MODE = os.environ.get("SPARSEINFER_BUILD_EXT", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    sys.exit(f"SPARSEINFER_BUILD_EXT must be auto, 0 or 1, got {MODE!r}")


def _say(msg: str) -> None:
    print(f"sparseinfer: {msg}", file=sys.stderr, flush=True)


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = source_dir


def _tool(module: str, attr: str, exe: str) -> str | None:
    """The executable shipped by the pip package ``module`` (cmake, ninja), else the one on PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / exe
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    return shutil.which(exe)


class CMakeBuild(build_ext):
    """build_ext that runs CMake (pybind11's cmake_example), with a pure-Python fallback."""

    def build_extensions(self) -> None:
        self._failed: list[Extension] = []
        super().build_extensions()
        # Forget what failed, so that --inplace / editable installs do not try to copy it.
        self.extensions = [ext for ext in self.extensions if ext not in self._failed]

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        try:
            self._cmake_build(ext)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as err:
            if MODE == "1":
                raise
            self._failed.append(ext)
            _say(f"could not build the C++ extension sparseinfer._C ({err}).")
            _say("installing pure Python: the 'reference' backend works, the 'cpu' backend reports itself "
                 "unavailable. Install CMake >= 3.18 and a C++17 compiler, then reinstall (or run "
                 "`python setup.py build_ext --inplace`); set SPARSEINFER_BUILD_EXT=1 to make this an error.")

    def _cmake_build(self, ext: CMakeExtension) -> None:
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        if cmake is None:
            raise RuntimeError("CMake not found (pip install cmake)")
        try:
            import pybind11
        except ImportError as err:
            raise RuntimeError("pybind11 not found (pip install pybind11)") from err
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DSPARSEINFER_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SPARSEINFER_BUILD_TYPE', 'Release')}",
        ]
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        cache = build_dir / "CMakeCache.txt"
        if ninja and not (cache.exists() and "CMAKE_GENERATOR:INTERNAL=Ninja" not in cache.read_text()):
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        configure = [cmake, "-S", str(ext.source_dir), "-B", str(build_dir), *args]
        try:
            subprocess.run(configure, check=True)
        except subprocess.CalledProcessError:
            # A cache from another environment (an isolated build's temporary tools): start afresh.
            _say("CMake configure failed; retrying with a fresh build directory")
            shutil.rmtree(build_dir, ignore_errors=True)
            subprocess.run(configure, check=True)
        jobs = os.environ.get("SPARSEINFER_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


ext_modules = [] if MODE == "0" else [CMakeExtension("sparseinfer._C", ROOT)]
if MODE == "0":
    _say("SPARSEINFER_BUILD_EXT=0: skipping the C++ extension (pure-Python install)")

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
