"""Build the native DCNv2 extension: `dyhead build-ext [--build-dir DIR] [--cuda auto|on|off]`.

The C++ kernels (dyhead/csrc/*.cpp) are always compiled; the CUDA kernels (dyhead/csrc/cuda/*.cu)
when nvcc is found and torch has CUDA. Compilation uses torch.utils.cpp_extension (ninja, the
flags torch itself needs, `-O3 -fopenmp`) in a child process, so that
  * the library is linked and test-loaded away from the caller (a process can hold only one
    library registering the `dyhead` op namespace),
  * a crash or kill of the compiler cannot leave the caller half-initialised.

Layout of the build directory (default `build/ext` at the repository root, or $DYHEAD_EXT_DIR):
    work-cpu/, work-cuda/         ninja trees (incremental rebuilds), build.log
    dyhead_ext-<hash>-<cpu|cuda>.so   the finished library, copied in under a temporary name and
                                      renamed into place
    manifest.json                 written last, by rename, so it never names a broken library
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from dyhead.errors import DyheadError

from . import native

# V100 .. H100; +PTX lets newer GPUs (Blackwell) JIT the sm_90 code instead of failing to launch.
DEFAULT_ARCH_LIST = "7.0;7.5;8.0;8.6;8.9;9.0+PTX"
LIB_NAME = "dyhead_ext"
CXX_FLAGS = ["-O3", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3"]

# Runs in the child: compile + link with cpp_extension, then load the library to prove it links.
_WORKER = r"""
import json, sys
import torch
from torch.utils import cpp_extension
cfg = json.loads(sys.argv[1])
cpp_extension.load(
    name=cfg["name"], sources=cfg["sources"], extra_cflags=cfg["cflags"], extra_cuda_cflags=cfg["cuda_cflags"],
    extra_ldflags=cfg["ldflags"], build_directory=cfg["work_dir"], verbose=True, with_cuda=cfg["cuda"],
    is_python_module=False,
)
assert hasattr(torch.ops.dyhead, "deform_conv2d"), "library registered no dyhead::deform_conv2d"
assert bool(torch.ops.dyhead._has_cuda()) == cfg["cuda"], "CUDA kernels missing from the library"
print("DYHEAD_BUILD_OK")
"""


def _say(msg: str) -> None:
    print(f"[build-ext] {msg}", flush=True)


def find_cxx() -> str | None:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME, /usr/local/cuda, or PATH."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("nvcc")


def nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def nvcc_archs(nvcc: str) -> set[str] | None:
    """Compute capabilities nvcc can target, e.g. {'7.5', '8.0', ...} (None when it cannot say)."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = {f"{m.group(1)[:-1]}.{m.group(1)[-1]}" for m in re.finditer(r"compute_(\d+)", out)}
    return found or None


def resolve_arch_list(nvcc: str) -> tuple[str, list[str]]:
    """TORCH_CUDA_ARCH_LIST (or the default), minus what this nvcc cannot target; returns (list, dropped)."""
    requested = [a for a in re.split(r"[;\s]+", os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST) if a]
    supported = nvcc_archs(nvcc)
    kept, dropped = [], []
    for a in requested:
        base = re.sub(r"[af]$", "", a.split("+")[0])  # 9.0a / 10.0f: arch- and family-specific variants
        (kept if supported is None or base in supported else dropped).append(a)
    if not kept:
        raise DyheadError(
            f"build-ext: none of the CUDA architectures {';'.join(requested)} is supported by {nvcc}; "
            "set TORCH_CUDA_ARCH_LIST"
        )
    return ";".join(kept), dropped


def _decide_cuda(cuda: str) -> tuple[bool, str | None, str]:
    """(compile CUDA?, nvcc path, reason line)."""
    if cuda not in ("auto", "on", "off"):
        raise DyheadError(f"build-ext: --cuda must be auto, on or off, got {cuda!r}")
    if cuda == "off":
        return False, None, "CUDA kernels off (--cuda off)"
    nvcc = find_nvcc()
    problem = None
    if torch.version.cuda is None:
        problem = f"this torch ({torch.__version__}) is built without CUDA"
    elif nvcc is None:
        problem = "nvcc not found (looked in $CUDA_HOME/bin, /usr/local/cuda/bin and PATH)"
    else:
        ver = nvcc_version(nvcc)
        if ver is None:
            problem = f"could not run {nvcc} --version"
        elif ver.split(".")[0] != torch.version.cuda.split(".")[0]:
            problem = f"nvcc {ver} ({nvcc}) does not match torch's CUDA {torch.version.cuda}"
    if problem:
        if cuda == "on":
            raise DyheadError(f"build-ext: --cuda on, but {problem}")
        return False, None, f"CUDA kernels skipped: {problem}; building the CPU kernels only"
    return True, nvcc, f"CUDA kernels on: {nvcc} (nvcc {nvcc_version(nvcc)}, torch CUDA {torch.version.cuda})"


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Process lock held for the whole build of one work dir; the kernel drops it if we die."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _worker_env(cxx: str, cuda: bool, nvcc: str | None, arch_list: str) -> dict[str, str]:
    env = dict(os.environ)
    env["CXX"] = cxx  # cpp_extension compiles and links with $CXX (default c++)
    path_dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja  # the pip package ships the binary; cpp_extension needs it on PATH

        path_dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    env["PATH"] = os.pathsep.join(path_dirs + [env.get("PATH", "")])
    env.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    if cuda and nvcc:
        env["CUDA_HOME"] = str(Path(nvcc).resolve().parent.parent)
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
    return env


def _up_to_date(build_dir: Path, src_hash: str, with_cuda: bool, arch_list: str, cflags: list[str]) -> Path | None:
    """The library of an existing build of exactly this configuration, if there is one."""
    man = native.read_manifest(build_dir)
    if not man:
        return None
    lib = build_dir / str(man.get("library", ""))
    same = (
        man.get("source_hash") == src_hash
        and man.get("torch_version") == torch.__version__
        and man.get("cuda") is with_cuda
        and (man.get("arch_list") or "") == arch_list
        and man.get("cxx_flags") == cflags
    )
    return lib if same and lib.is_file() else None


def _remove_stale_temporaries(build_dir: Path) -> None:
    """Temporary files of builds that were killed before their rename (their pid is gone)."""
    for tmp in build_dir.glob("*.tmp*"):
        m = re.search(r"\.tmp(\d+)$", tmp.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except OSError:
            pass


def _first_error_line(log: str) -> str:
    for line in log.splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE) and "error:" in line.lower():
            return line.strip()[:300]
    for line in reversed(log.splitlines()):
        if line.strip():
            return line.strip()[:300]
    return "no output"


def build_extension(build_dir: Path | None = None, cuda: str = "auto", verbose: bool = False) -> Path:
    """Compile the extension into `build_dir` (default: `build/ext` at the repository root, or
    $DYHEAD_EXT_DIR) and return the path of the shared library; writes `manifest.json` beside it.

    cuda: "auto" compiles the CUDA kernels when nvcc (matching torch's CUDA) is found, "on"
    requires them, "off" skips them. Architectures come from TORCH_CUDA_ARCH_LIST, default
    "7.0;7.5;8.0;8.6;8.9;9.0+PTX", minus those the installed nvcc cannot target (CUDA 13 has no sm_70).
    Raises DyheadError (one line) when no compiler is found or the build fails.
    """
    build_dir = Path(build_dir).expanduser().resolve() if build_dir is not None else native.default_ext_dir()
    cxx = find_cxx()
    if cxx is None:
        raise DyheadError(
            "build-ext: no C++ compiler found (tried $CXX, c++, g++, clang++); install one (e.g. apt-get install g++) "
            "or keep dcn_backend=torchvision"
        )
    with_cuda, nvcc, reason = _decide_cuda(cuda)
    arch_list, dropped = ("", [])
    if with_cuda:
        arch_list, dropped = resolve_arch_list(nvcc)

    cpp_sources = sorted(native.CSRC_DIR.glob("*.cpp"))
    cu_sources = sorted((native.CSRC_DIR / "cuda").glob("*.cu")) if with_cuda else []
    src_hash = native.source_hash()
    flavour = "cuda" if with_cuda else "cpu"
    work_dir = build_dir / f"work-{flavour}"
    work_dir.mkdir(parents=True, exist_ok=True)

    _say(f"compiler: {cxx}; torch {torch.__version__}")
    _say(reason)
    if dropped:
        _say(f"skipping CUDA architectures {';'.join(dropped)}: not supported by this nvcc")
    cflags = CXX_FLAGS + (["-DWITH_CUDA"] if with_cuda else [])
    current = _up_to_date(build_dir, src_hash, with_cuda, arch_list, cflags)
    if current is not None:
        _say(f"up to date: {current}")
        return current
    _say(
        f"compiling {len(cpp_sources)} C++ source(s) [{' '.join(CXX_FLAGS)}]"
        + (f" and {len(cu_sources)} CUDA source(s) for {arch_list}" if with_cuda else "")
        + f" in {work_dir}"
    )
    cfg = {
        "name": LIB_NAME,
        "sources": [str(p) for p in cpp_sources + cu_sources],
        "cflags": cflags,
        "cuda_cflags": NVCC_FLAGS + ["-DWITH_CUDA"],
        "ldflags": LD_FLAGS,
        "work_dir": str(work_dir),
        "cuda": with_cuda,
    }
    log_path = work_dir / "build.log"
    t0 = time.perf_counter()
    with _exclusive(build_dir / f".build-{flavour}.lock"):
        built = _compile(cfg, _worker_env(cxx, with_cuda, nvcc, arch_list), build_dir, log_path, verbose)
        seconds = time.perf_counter() - t0
        manifest = {
            "cuda": with_cuda, "arch_list": arch_list if with_cuda else None, "arch_dropped": dropped,
            "torch_version": torch.__version__, "torch_cuda": torch.version.cuda, "source_hash": src_hash,
            "sources": [p.relative_to(native.CSRC_DIR).as_posix() for p in cpp_sources + cu_sources],
            "cxx": cxx, "cxx_flags": cflags, "nvcc": nvcc, "build_seconds": round(seconds, 1),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # still holding the flavour lock, so `built` cannot change under us
        lib, man_path = _publish(built, build_dir, f"{LIB_NAME}-{src_hash[:12]}-{flavour}.so", manifest)
    _say(f"built in {seconds:.1f} s ({'CPU + CUDA' if with_cuda else 'CPU only'})")
    _say(f"library: {lib}")
    _say(f"manifest: {man_path}")
    return lib


def _compile(cfg: dict, env: dict, build_dir: Path, log_path: Path, verbose: bool) -> Path:
    """Run the compile + link + load-test worker; the built library (in the work dir) or a one-line error."""
    work_dir = Path(cfg["work_dir"])
    # cpp_extension's own lock file is only left behind by a killed build (we hold the flock).
    (work_dir / "lock").unlink(missing_ok=True)
    _remove_stale_temporaries(build_dir)
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if verbose:
            sys.stdout.write(line)
            sys.stdout.flush()
    rc = proc.wait()
    log = "".join(lines)
    log_path.write_text(log)
    built = work_dir / f"{LIB_NAME}.so"
    if rc != 0 or "DYHEAD_BUILD_OK" not in log or not built.is_file():
        raise DyheadError(f"build-ext: compiling the DCN extension failed ({_first_error_line(log)}); full log: {log_path}")
    return built


def _publish(built: Path, build_dir: Path, name: str, manifest: dict) -> tuple[Path, Path]:
    """The library under its final name by rename, then the manifest by rename (under a build-dir-wide lock),
    so the manifest never names a missing or partial file; older libraries beyond the two newest go."""
    from dyhead.files import save_json

    with _exclusive(build_dir / ".publish.lock"):
        lib = build_dir / name
        tmp_lib = lib.with_name(lib.name + f".tmp{os.getpid()}")
        shutil.copy2(built, tmp_lib)
        os.replace(tmp_lib, lib)
        man_path = build_dir / native.MANIFEST_NAME
        save_json(man_path, {"library": lib.name, "library_path": str(lib), **manifest})
        # Keep the two newest older libraries (a process may be about to load the one the previous
        # manifest named; one that already mapped a deleted file keeps it), delete the rest.
        older = sorted((p for p in build_dir.glob(f"{LIB_NAME}-*.so") if p != lib), key=lambda p: p.stat().st_mtime)
        for old in older[:-2]:
            with contextlib.suppress(OSError):
                old.unlink()
    return lib, man_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dyhead build-ext",
        description=(
            "Compile the native modulated deformable convolution (DCNv2) used by dcn_backend=native/auto. "
            "CPU kernels are always built; CUDA kernels when nvcc is found. Needs a C++ compiler; without one "
            "the torchvision backend keeps working."
        ),
        epilog=(
            "Environment: TORCH_CUDA_ARCH_LIST (default %s, minus archs nvcc lacks), CUDA_HOME, CXX, MAX_JOBS, "
            "DYHEAD_EXT_DIR (default build directory)." % DEFAULT_ARCH_LIST
        ),
    )
    parser.add_argument(
        "--build-dir",
        type=Path,
        default=None,
        help=f"where to build and put the library + manifest.json (default: {native.default_ext_dir()})",
    )
    parser.add_argument(
        "--cuda",
        choices=("auto", "on", "off"),
        default="auto",
        help="compile the CUDA kernels: auto (when nvcc is found, default), on (required), off",
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="if the build fails, record that in the manifest and exit 0: dcn_backend 'auto' then "
                             "uses torchvision's op (the Snakemake rule and the DVC stage pass this)")
    args = parser.parse_args(argv)
    try:
        build_extension(args.build_dir, cuda=args.cuda, verbose=args.verbose)
    except DyheadError as e:
        print(f"dyhead: error: {e}", file=sys.stderr)
        if not args.allow_fallback:
            return 2
        record_fallback(Path(args.build_dir or native.default_ext_dir()))
    return 0


def record_fallback(build_dir: Path) -> None:
    """A manifest that says the build failed: `auto` resolves to torchvision's op, and the pipeline goes on."""
    from dyhead.files import save_json

    save_json(build_dir / native.MANIFEST_NAME, {"library": None, "native": False, "source_hash": native.source_hash(),
                                                 "reason": "build failed; see the build log above"})
    _say(f"native extension not built; trainings fall back to torchvision's op ({build_dir / native.MANIFEST_NAME})")


if __name__ == "__main__":
    sys.exit(main())
