"""Build of mtseg-kernels and its compiled extension ``mtseg_kernels._C``.

Install with ``pip install --no-build-isolation -e .``: the extension compiles against
the torch already installed, so pip must not build in an isolated environment (which
would download a second torch). ``pip install -v ...`` shows the compiler's progress.

Backends:
* C++ CPU kernels are always built.
* CUDA kernels are built whenever torch is a CUDA build and nvcc is found (``CUDA_HOME``,
  else ``/usr/local/cuda``), also on a machine without a GPU. ``MTSEG_BUILD_CUDA=0``
  turns them off (a much shorter build), ``MTSEG_BUILD_CUDA=1`` makes their absence an
  error.
* ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"9.0"`` or ``"8.0;8.6+PTX"``) picks the GPUs. Unset, it
  is the list of architectures the installed torch was compiled for
  (``torch.cuda.get_arch_list()``, known without a GPU), less those the local nvcc cannot
  compile, with PTX of the newest one so that later GPUs can still JIT-compile the
  kernels: every GPU this torch runs on runs these kernels natively.

Incremental builds: objects are kept in ``build/temp.<platform>-<python>-<variant>``
(variants ``cuda``, ``cpu``, ``asan``) instead of pip's throw-away folder, so a repeated
``pip install -e .`` or ``setup.py build_ext --inplace`` recompiles only what changed
(ninja tracks sources, headers and flags). An explicit ``--build-temp`` wins.

Register spills: nvcc runs through ``tools/ptxas_log.py``, which keeps the ptxas resource
report of each CUDA object beside it (``<object>.ptxas``); ``tools/ptxas_check.py`` reads
them and fails on spills (``make ptxas-check``, part of ``make test``).

Sanitizers: ``MTSEG_SANITIZE=1`` builds the CPU kernels with AddressSanitizer and UBSan
(``make sanitize``). It refuses ``--inplace``, so it can never replace the normal build.
"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # the usual cause: pip's build isolation, which hides the installed torch
    sys.stderr.write(
        "\nmtseg-kernels compiles against your installed PyTorch, which this build cannot see.\n"
        "Install torch first, then build without isolation:\n\n"
        "    pip install --no-build-isolation -e .\n\n"
        "(a plain `pip install -e .` builds in an isolated environment that would download\n"
        "a second torch; this build stops instead).\n\n"
    )
    sys.exit(1)


def _env_flag(name):
    """An optional 0/1 switch from the environment: None when unset."""
    flag = os.environ.get(name, "").strip()
    if flag not in ("", "0", "1"):
        sys.exit(f"{name} must be 0 or 1, got {flag!r}")
    return None if flag == "" else flag == "1"


SANITIZE = bool(_env_flag("MTSEG_SANITIZE"))
# Every report aborts (no recovery), so a finding fails the run that triggered it.
# float-cast-overflow is not part of GCC's "undefined"; float division by zero is IEEE
# arithmetic here (it gives inf on purpose), so it stays off.
SANITIZE_FLAGS = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"]


def _nvcc_codes(nvcc):
    """The real (``sm_XY``) and virtual (``compute_XY``) targets this nvcc can compile, or
    None when it cannot say (nvcc before 11.0: then torch's list is taken as is)."""
    codes = set()
    for flag in ("--list-gpu-code", "--list-gpu-arch"):
        try:
            out = subprocess.run([nvcc, flag], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
        codes.update(out.split())
    return codes


def _arch_key(arch):
    """Sort key of "9.0", "10.0", "9.0a": numeric major, minor, then the suffix."""
    major, minor = arch.split(".")
    digits = minor.rstrip("abcdefghijklmnopqrstuvwxyz")
    return int(major), int(digits), minor[len(digits):]


def default_arch_list(torch_arches, nvcc_codes):
    """``TORCH_CUDA_ARCH_LIST`` covering the GPUs the installed torch was built for.

    ``torch_arches``: ``torch.cuda.get_arch_list()``, e.g. ``["sm_75", "sm_90a",
    "compute_90"]``; ``nvcc_codes``: what the local nvcc compiles (None: no filter).
    Returns ``(arch_list, dropped)``, e.g. ``("7.5;9.0a;9.0+PTX", [])``, or ``(None, ...)``
    when nothing is left. ``compute_XY`` entries become ``+PTX``; when torch ships no PTX,
    the newest architecture gets it, so GPUs newer than the list can still JIT the kernels.
    """
    real, ptx, dropped = [], [], []
    for name in torch_arches:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", name)
        if m is None:
            dropped.append(name)
            continue
        if nvcc_codes is not None and name not in nvcc_codes:
            dropped.append(name)
            continue
        arch = f"{m.group(2)}.{m.group(3)}{m.group(4)}"
        target = real if m.group(1) == "sm" else ptx
        if arch not in target:
            target.append(arch)
    real = sorted(set(real) | set(ptx), key=_arch_key)  # PTX needs its arch in the list
    if not real:
        return None, dropped
    ptx = set(ptx) or {real[-1]}
    return ";".join(a + "+PTX" if a in ptx else a for a in real), dropped


def _want_cuda():
    """Decide whether to compile the CUDA kernels, and say why."""
    flag = _env_flag("MTSEG_BUILD_CUDA")
    if SANITIZE:
        if flag:
            sys.exit("MTSEG_SANITIZE=1 builds the CPU kernels only; unset MTSEG_BUILD_CUDA=1")
        return False, "sanitizer build: CPU kernels only"
    if flag is False:
        return False, "MTSEG_BUILD_CUDA=0"
    if os.environ.get("CUDA_HOME") is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        cpp_extension.CUDA_HOME = "/usr/local/cuda"
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is a CPU-only build")
    if cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        reasons.append("nvcc not found (set CUDA_HOME)")
    if reasons:
        if flag:
            sys.exit("MTSEG_BUILD_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {cpp_extension.CUDA_HOME}"


def _set_arch_list():
    """Fill in the default ``TORCH_CUDA_ARCH_LIST``; returns a note for the build line."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return "from TORCH_CUDA_ARCH_LIST"
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    arch_list, dropped = default_arch_list(torch.cuda.get_arch_list(), _nvcc_codes(nvcc))
    if arch_list is None:
        sys.exit(
            f"no GPU architecture of this torch ({' '.join(torch.cuda.get_arch_list()) or 'none listed'}) "
            f"can be compiled by {nvcc}: set TORCH_CUDA_ARCH_LIST, or MTSEG_BUILD_CUDA=0"
        )
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    note = "torch's architectures"
    return note + (f"; nvcc cannot compile {' '.join(dropped)}" if dropped else "")


def _log_ptxas():
    """Route nvcc through tools/ptxas_log.py, which keeps each object's ptxas report."""
    wrapper = os.path.join(ROOT, "tools", "ptxas_log.py")
    if not os.path.exists(wrapper):  # e.g. an sdist without tools/: build without the reports
        return
    base = os.environ.get("PYTORCH_NVCC")  # torch's hook for a compiler launcher (ccache)
    compiler = shlex.split(base) if base else [os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")]
    os.environ["PYTORCH_NVCC"] = shlex.join([sys.executable, wrapper, *compiler, "--"])


def _ensure_ninja():
    """torch runs the ``ninja`` found on PATH and silently falls back to a slow build that
    recompiles everything when there is none; the ``ninja`` package installs one next to
    this interpreter, which is not on PATH unless the venv is activated: add it then."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and os.path.isfile(os.path.join(scripts, "ninja")):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def _extensions():
    global VARIANT
    _ensure_ninja()
    with_cuda, why = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP code, serial unless compiled with it;
    # the link resolves to the libgomp that torch ships, so there is one OpenMP runtime.
    # -fno-trapping-math lets GCC compute both arms of a select (no FP trap is ever
    # enabled here), which the vectorised exp/log loops need; it changes no result, unlike
    # -ffast-math. -ffp-contract=off keeps a*b+c rounded twice, as scikit-image computes it.
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if SANITIZE:
        cxx_flags = ["-O1", "-g", "-fno-omit-frame-pointer", *SANITIZE_FLAGS] + cxx_flags[1:]
        link_flags = link_flags + SANITIZE_FLAGS[:1]
    define_macros = []
    extra = {"cxx": cxx_flags}
    kind = cpp_extension.CppExtension
    arch = ""
    if with_cuda:
        note = _set_arch_list()
        arch = f", arch {os.environ['TORCH_CUDA_ARCH_LIST']} ({note})"
        _log_ptxas()
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("MTSEG_WITH_CUDA", None))
        # No --use_fast_math: the kernels must round like the CPU ones.
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-fmad=false"]
        kind = cpp_extension.CUDAExtension
    VARIANT = "asan" if SANITIZE else "cuda" if with_cuda else "cpu"
    backends = "cpu, cuda" if with_cuda else "cpu"
    print(f"mtseg-kernels: building backends [{backends}]{arch} ({why})", flush=True)
    return [
        kind(
            name="mtseg_kernels._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc", "include")],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=link_flags,
        )
    ]


VARIANT = None  # set by _extensions(): "cuda", "cpu" or "asan"


class BuildExtension(cpp_extension.BuildExtension):
    """torch's ninja build with a persistent object folder per variant (see the docstring)."""

    def finalize_options(self):
        explicit = self.build_temp is not None
        super().finalize_options()
        if not explicit:
            tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}-{VARIANT}"
            self.build_temp = os.path.join(ROOT, "build", f"temp.{tag}")
        if SANITIZE and (self.inplace or getattr(self, "editable_mode", False)):
            sys.exit("MTSEG_SANITIZE=1 must not build in place (it would replace the normal _C): "
                     "use `setup.py build_ext --build-lib DIR` and load it with MTSEG_EXTENSION")


# Guarded so that tests can import the helpers above; pip and `python setup.py` run it as
# __main__.
if __name__ == "__main__":
    setup(
        name="mtseg-kernels",
        version="0.1.0",
        description="Fused, exact, batched PyTorch operators for the auxiliary labels of multi-task medical image segmentation",
        long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        license="BSD-3-Clause",
        python_requires=">=3.10",
        packages=find_packages(include=["mtseg_kernels", "mtseg_kernels.*"])
        + ["mtseg_harness"]
        + ["mtseg_harness." + p for p in find_packages(where="harness")],
        # `harness/` installs as `mtseg_harness`: a top-level `harness` would collide in site-packages.
        package_dir={"mtseg_harness": "harness"},
        package_data={"mtseg_harness": ["assets/hc18_sample/*.csv", "assets/hc18_sample/*.md",
                                        "assets/hc18_sample/training_set/*.png"]},
        entry_points={"console_scripts": ["mtseg = mtseg_harness.cli:main"]},
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        install_requires=["torch>=2.6,<3", "numpy>=1.24"],
        extras_require={
            "test": ["pytest>=8", "hypothesis>=6.100", "scikit-image>=0.25", "scipy>=1.11", "expecttest",
                     "monai>=1.6,<1.7"],
            "mutation": ["cosmic-ray>=8.7,<9"],
            "bench": [
                "pytest-benchmark>=4",
                "scikit-image>=0.25",
                "opencv-python-headless>=4.8,<5",
                "edt>=3.1,<4",
                "connected-components-3d>=4.1,<5",
            ],
            "harness": ["nibabel>=5", "pandas>=2", "scipy>=1.11", "scikit-image>=0.25", "pyyaml>=6",
                        "pydantic>=2.7,<3", "matplotlib>=3.7", "tqdm>=4.60", "pillow>=9", "tensorboard>=2.10",
                        "opencv-python-headless>=4.8,<5"],  # the GrabCut pseudo-label baseline
        },
        zip_safe=False,
    )
