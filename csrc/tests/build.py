"""Builds the C++ sources straight, with no CMake: the kernel test driver csrc/tests/kernel_test.cpp
(no Python headers, no torch), and, for the sanitizer run, the extension sparseinfer._C itself.

    python csrc/tests/build.py aarch64 [--sanitize]     # prints the path of the driver binary
    python csrc/tests/build.py native --sanitize
    python csrc/tests/build.py extension                 # sparseinfer._C under ASan + UBSan: prints its path

Who runs what:

* tests/test_neon_qemu.py::test_neon_kernels_match_reference (and its neighbours): the driver, cross-compiled
  for aarch64 and run under qemu-user;
* tests/test_neon_qemu.py::test_native_kernels_under_sanitizers: the driver, native, with AddressSanitizer
  + UBSan (kernels, dispatch, thread pool);
* tests/test_native_sanitizers.py::test_bindings_and_weight_lifetime_under_sanitizers: the extension
  (bindings.cpp and everything it links) with AddressSanitizer + UBSan, loaded into a Python that
  preloads libasan and runs tests/native/binding_checks.py: argument checks, every format, and the
  weight-lifetime path (tensors moved or rewritten under a prepacked weight, concurrent rebuilds).

It compiles what the extension links -- dispatch.cpp, threadpool.cpp, ref/ and the ISA groups of the
target architecture (natively: those this CPU can run), each group with only its own flags plus
the per-file options of csrc/CMakeLists.txt -- and the driver (or bindings.cpp). Objects are cached by a
hash of the compiler, the flags and every source and header (in $SPARSEINFER_KERNEL_TEST_CACHE, else the
system temp dir), so a re-run after editing one kernel recompiles one file; the sanitized driver and
extension share their kernel objects.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1]

# The ISA groups of csrc/CMakeLists.txt (si_add_group calls), by target architecture: directory,
# the define dispatch.cpp sees when the group is built, and the group's flags. Keep in step.
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
GROUPS = {
    "x86_64": [("x86/avx2", "SPARSEINFER_HAVE_AVX2", _AVX2),
               ("x86/avx512", "SPARSEINFER_HAVE_AVX512",
                _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512cd"])],
    "aarch64": [("arm/neon", "SPARSEINFER_HAVE_NEON", [])],
}
# /proc/cpuinfo flags a native build needs to run a group (see host_can_run).
GROUP_CPU_FLAGS = {
    "x86/avx2": {"avx2", "fma", "f16c"},
    "x86/avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"},
}
# As SI_COMMON_FLAGS in csrc/CMakeLists.txt, at -O2 (compile time matters more here than in the module).
COMMON_FLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"]
# -g1: line tables only, enough for file:line in sanitizer reports, a quarter cheaper to compile than -g.
# -fPIC: the same objects link into the driver and into the extension (a shared module).
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g1", "-O1",
                  "-fPIC"]
QEMU_SYSROOT = "/usr/aarch64-linux-gnu"


class ToolMissing(RuntimeError):
    """A compiler or emulator is not installed; str() names it."""


class BuildError(RuntimeError):
    pass


@dataclass
class Toolchain:
    arch: str                                        # "x86_64" / "aarch64"
    cxx: str                                         # compiler executable
    runner: list[str] = field(default_factory=list)  # prefix to run a built binary (qemu), or []

    def run(self, binary: Path, args: list[str], timeout: float = 300, env: dict | None = None,
            cpu: str | None = None) -> subprocess.CompletedProcess:
        """Runs the driver; ``cpu`` picks qemu's CPU model (ignored when running natively)."""
        prefix = list(self.runner)
        if prefix and cpu:
            prefix[1:1] = ["-cpu", cpu]
        return subprocess.run(prefix + [str(binary)] + list(args), capture_output=True, text=True, timeout=timeout,
                              env=env)


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, m)


def toolchain(target: str) -> Toolchain:
    """``native`` or ``aarch64`` (cross-compiled and run under qemu-user unless the host is aarch64).
    Raises ToolMissing naming the missing executable."""
    host = host_arch()
    if target == "native" or target == host:
        cxx = os.environ.get("CXX", "g++")
        if not shutil.which(cxx):
            raise ToolMissing(cxx)
        return Toolchain(host, cxx)
    if target != "aarch64":
        raise ValueError(f"unknown target {target!r}; expected 'native' or 'aarch64'")
    for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64"):
        if not shutil.which(tool):
            raise ToolMissing(tool)
    return Toolchain("aarch64", "aarch64-linux-gnu-g++", ["qemu-aarch64", "-L", QEMU_SYSROOT])


def per_file_options() -> dict[str, list[str]]:
    """``set_source_files_properties(<files...> PROPERTIES COMPILE_OPTIONS <opts...>)`` calls of
    csrc/CMakeLists.txt (the one place per-file ISA extras such as VNNI or dotprod are declared), as
    {file relative to csrc/: options}."""
    text = "\n".join(line.split("#", 1)[0] for line in (CSRC / "CMakeLists.txt").read_text().splitlines())
    options: dict[str, list[str]] = {}
    for call in re.findall(r"set_source_files_properties\((.*?)\)", text, re.S):
        tokens = call.replace('"', " ").replace(";", " ").split()
        if "PROPERTIES" not in tokens or "COMPILE_OPTIONS" not in tokens:
            continue
        files = tokens[: tokens.index("PROPERTIES")]
        opts = []
        for tok in tokens[tokens.index("COMPILE_OPTIONS") + 1:]:
            if re.fullmatch(r"[A-Z_]+", tok):  # the next property name
                break
            opts.append(tok)
        for f in files:
            options[f] = opts
    return options


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def cache_root() -> Path:
    root = os.environ.get("SPARSEINFER_KERNEL_TEST_CACHE")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(root) if root else Path(tempfile.gettempdir()) / f"sparseinfer-kernel-test-{uid}"


def host_can_run(directory: str) -> bool:
    """Whether this machine's CPU runs a group (Linux /proc/cpuinfo; True when it cannot tell). A
    native driver skips the groups it could never run: compiling them (the AVX-512 VNNI files under
    ASan take longer than everything else together) would test nothing."""
    needed = GROUP_CPU_FLAGS.get(directory)
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), None)
    return needed is None or flags is None or needed <= set(flags)


def sources(arch: str, native: bool = False) -> list[tuple[Path, list[str], list[str]]]:
    """(source, extra flags, defines) for the kernels the driver and the extension link on ``arch``;
    ``native``: only the groups this CPU runs."""
    per_file = per_file_options()
    units = []
    defines = []
    for directory, define, flags in GROUPS.get(arch, []):
        files = sorted((CSRC / directory).glob("*.cpp"))
        if native and not host_can_run(directory):
            continue
        if files:  # an empty group is skipped, and its define left unset, as in CMake
            defines.append(f"-D{define}=1")
            units += [(f, flags + per_file.get(f"{directory}/{f.name}", [])) for f in files]
    base = [CSRC / "dispatch.cpp", CSRC / "threadpool.cpp", *sorted((CSRC / "ref").glob("*.cpp"))]
    return [(f, [], defines) for f in base] + [(f, flags, defines) for f, flags in units]


DRIVER = CSRC / "tests" / "kernel_test.cpp"
BINDINGS = CSRC / "bindings.cpp"


def _compile(tc: Toolchain, units, flags: list[str], out: Path, jobs: int | None, uninstrumented=()) -> list[Path]:
    """Compiles (cached by content) each (source, extra flags, defines) unit into ``out``; sources in
    ``uninstrumented`` leave out the -fsanitize flags."""
    version = subprocess.run([tc.cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    headers = _digest(*(p.read_bytes() for p in sorted(CSRC.rglob("*.h"))))
    out.mkdir(parents=True, exist_ok=True)

    def compile_one(unit) -> Path:
        src, extra, defines = unit
        unit_flags = [f for f in flags if src not in uninstrumented or not f.startswith("-fsanitize")]
        cmd = [tc.cxx, *unit_flags, *extra, *defines, "-c", str(src)]
        obj = out / f"{src.stem}-{_digest(version, cmd, src.read_bytes(), headers)}.o"
        if not obj.exists():
            tmp = obj.with_suffix(f".{os.getpid()}.tmp")
            result = subprocess.run(cmd + ["-o", str(tmp)], capture_output=True, text=True)
            if result.returncode != 0:
                raise BuildError(f"{' '.join(cmd)}\n{result.stderr}")
            os.replace(tmp, obj)  # atomic: a concurrent build never sees half an object
        return obj

    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
        return list(pool.map(compile_one, units))


def _link(tc: Toolchain, cmd: list[str], binary: Path) -> Path:
    if not binary.exists():
        tmp = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
        result = subprocess.run(cmd + ["-o", str(tmp)], capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"{' '.join(cmd)}\n{result.stderr}")
        os.replace(tmp, binary)
    return binary


def build(target: str, sanitize: bool = False, jobs: int | None = None) -> tuple[Toolchain, Path]:
    """Compiles (cached) and links the driver for ``target``; returns its toolchain and path."""
    tc = toolchain(target)
    flags = COMMON_FLAGS + (SANITIZE_FLAGS if sanitize else []) + [f"-I{CSRC / 'include'}"]
    out = cache_root() / f"{tc.arch}{'-sanitize' if sanitize else ''}"
    # The harness itself is not instrumented (a third of the build time otherwise): the kernels,
    # dispatch and the pool are, and ASan's allocator still guards every buffer the driver hands them.
    kernels = sources(tc.arch, native=not tc.runner)
    units = kernels + [(DRIVER, [], kernels[0][2])]
    objects = _compile(tc, units, flags, out, jobs, uninstrumented=(DRIVER,))
    link = [tc.cxx, *flags, *(str(o) for o in objects), "-ldl"]  # threadpool.cpp looks for a loaded OpenMP
    return tc, _link(tc, link, out / f"kernel_test-{_digest(*link)}")


def build_extension(jobs: int | None = None) -> Path:
    """Compiles (cached) sparseinfer._C with AddressSanitizer + UBSan -- bindings.cpp and the kernels
    this CPU runs -- and returns the path of the shared module. Load it into a Python started with
    ``LD_PRELOAD=asan_runtime()`` (Python itself is not instrumented). Raises ToolMissing when
    pybind11's headers are not installed."""
    tc = toolchain("native")
    try:
        import pybind11
    except ImportError:
        raise ToolMissing("pybind11 (pip install pybind11)") from None
    flags = COMMON_FLAGS + SANITIZE_FLAGS + [f"-I{CSRC / 'include'}"]
    binding_flags = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", "-fvisibility=hidden"]
    kernels = sources(tc.arch, native=True)
    units = kernels + [(BINDINGS, binding_flags, kernels[0][2])]
    objects = _compile(tc, units, flags, cache_root() / f"{tc.arch}-sanitize", jobs)
    link = [tc.cxx, *flags, "-shared", *(str(o) for o in objects), "-ldl"]
    name = f"_C-{_digest(*link)}{sysconfig.get_config_var('EXT_SUFFIX')}"
    return _link(tc, link, cache_root() / f"{tc.arch}-sanitize" / name)


def sanitizers_missing() -> str | None:
    """None when the native compiler links -fsanitize=address,undefined, else what is missing."""
    try:
        tc = toolchain("native")
    except ToolMissing as err:
        return f"{err} (a C++ compiler; set CXX)"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("int main() { return 0; }\n")
        result = subprocess.run([tc.cxx, "-fsanitize=address,undefined", str(src), "-o", str(Path(tmp) / "probe")],
                                capture_output=True, text=True)
    if result.returncode != 0:
        return f"{tc.cxx} with libasan and libubsan (-fsanitize=address,undefined): {result.stderr[-300:]}"
    return None


def asan_preload() -> str:
    """LD_PRELOAD for an uninstrumented Python that loads the sanitized extension: the compiler's
    shared ASan runtime, and libstdc++ (ASan must find the real __cxa_throw when it starts)."""
    tc = toolchain("native")
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        path = subprocess.run([tc.cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not path or not Path(path).is_file():
            raise ToolMissing(f"{name} of {tc.cxx}")
        libs.append(str(Path(path).resolve()))
    return " ".join(libs)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["extension"]:
        try:
            print(build_extension())
        except ToolMissing as err:
            sys.exit(f"missing tool: {err}")
        sys.exit(0)
    if not args or args[0] not in ("native", "aarch64") or set(args[1:]) - {"--sanitize"}:
        sys.exit("usage: python csrc/tests/build.py native|aarch64 [--sanitize] | extension")
    try:
        tc, path = build(args[0], sanitize="--sanitize" in args)
    except ToolMissing as err:
        sys.exit(f"missing tool: {err}")
    print(" ".join(tc.runner + [str(path)]))
