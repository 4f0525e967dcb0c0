"""Build of mtseg-kernels and its compiled extension ``mtseg_kernels._C``.

Install with ``pip install --no-build-isolation -e .``: the extension compiles against
the torch already installed, so pip must not build in an isolated environment (which
would download a second torch).

Backends:
* C++ CPU kernels are always built.
* CUDA kernels are built when torch is a CUDA build and nvcc is found (``CUDA_HOME``,
  else ``/usr/local/cuda``); no GPU is needed to compile. ``MTSEG_BUILD_CUDA=0`` turns
  them off, ``MTSEG_BUILD_CUDA=1`` makes their absence an error.
  ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0+PTX`` (A100, H100/H200, and PTX that
  newer GPUs compile at load time).
"""

import glob
import os
import sys

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


def _want_cuda():
    """Decide whether to compile the CUDA kernels, and say why."""
    flag = os.environ.get("MTSEG_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        sys.exit(f"MTSEG_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
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
        if flag == "1":
            sys.exit("MTSEG_BUILD_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {cpp_extension.CUDA_HOME}"


def _extensions():
    with_cuda, why = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP code, serial unless compiled with it;
    # the link resolves to the libgomp that torch ships, so there is one OpenMP runtime.
    # -fno-trapping-math lets GCC compute both arms of a select (no FP trap is ever
    # enabled here), which the vectorised exp/log loops need; it changes no result, unlike
    # -ffast-math. -ffp-contract=off keeps a*b+c rounded twice, as scikit-image computes it.
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
    define_macros = []
    extra = {"cxx": cxx_flags}
    kind = cpp_extension.CppExtension
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("MTSEG_WITH_CUDA", None))
        # No --use_fast_math: the kernels must round like the CPU ones.
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-fmad=false"]
        kind = cpp_extension.CUDAExtension
    backends = "cpu, cuda" if with_cuda else "cpu"
    arch = f", arch {os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else ""
    print(f"mtseg-kernels: building backends [{backends}]{arch} ({why})", flush=True)
    return [
        kind(
            name="mtseg_kernels._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc", "include")],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ]


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
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
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
        "harness": ["nibabel>=5", "pandas>=2", "scipy>=1.11", "scikit-image>=0.25", "pyyaml>=6", "matplotlib>=3.7",
                    "tqdm>=4.60", "pillow>=9", "tensorboard>=2.10"],
    },
    zip_safe=False,
)
