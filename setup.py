"""Build and install maml_fast with its compiled operators, the extension `maml_fast._C`.

The C++ CPU kernels are always built. The CUDA kernels are added when torch is a CUDA build and
nvcc is found under CUDA_HOME (default: /usr/local/cuda when it exists); MAML_FAST_BUILD_CUDA=1 or 0
forces the choice either way. The build compiles against the installed torch, so install with

    pip install -e . --no-build-isolation
"""
import importlib.util
import os
import re
import subprocess
import tempfile
from glob import glob
from pathlib import Path

# torch.utils.cpp_extension fixes CUDA_HOME when it is imported; unset, it guesses from the nvcc on
# PATH, which may be a wrapper script outside the CUDA tree (it is on the development machines).
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

# Machine code for Ampere (8.0, also runs on 8.6/8.9) and Hopper (9.0), plus 9.0 PTX that newer
# GPUs compile when the library loads. MAML_FAST_CUDA_ARCHS (e.g. "9.0") narrows the list, as a GPU machine
# building for its own device does: one nvcc pass per file instead of three.
CUDA_ARCHS = tuple(os.environ.get("MAML_FAST_CUDA_ARCHS", "8.0 9.0+PTX").split())
if not CUDA_ARCHS or not all(re.fullmatch(r"\d+\.\d+(\+PTX)?", arch) for arch in CUDA_ARCHS):
    raise SystemExit("MAML_FAST_CUDA_ARCHS must list compute capabilities like '8.0 9.0+PTX', got "
                     f"{os.environ.get('MAML_FAST_CUDA_ARCHS')!r}")


def build_cuda_kernels() -> bool:
    """MAML_FAST_BUILD_CUDA=0|1 decides; unset, build them when torch and nvcc allow it."""
    forced = os.environ.get("MAML_FAST_BUILD_CUDA", "")
    if forced not in ("", "0", "1"):
        raise SystemExit(f"MAML_FAST_BUILD_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False
    obstacles = []
    if torch.version.cuda is None:
        obstacles.append(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not Path(cuda_home, "bin", "nvcc").is_file():
        obstacles.append(f"no nvcc under CUDA_HOME={cuda_home!r}; set CUDA_HOME to the CUDA toolkit")
    if obstacles and forced == "1":
        raise SystemExit("MAML_FAST_BUILD_CUDA=1, but " + "; ".join(obstacles))
    if obstacles:
        print("maml_fast: building the CPU kernels only: " + "; ".join(obstacles))
    return not obstacles


def openmp_flags() -> list[str]:
    """["-fopenmp"] when torch runs at::parallel_for on OpenMP and the C++ compiler supports it.

    at::parallel_for is a header template: without OpenMP in our own compile it runs serially.
    """
    if not torch.backends.openmp.is_available():
        return []
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.cpp")
        probe.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        compiler = os.environ.get("CXX", "c++")
        result = subprocess.run(
            [compiler, "-fopenmp", str(probe), "-o", str(Path(tmp, "probe"))], capture_output=True
        )
    return ["-fopenmp"] if result.returncode == 0 else []


def nvcc_arch_flags() -> list[str]:
    """-gencode flags for CUDA_ARCHS (given explicitly, torch adds none of its own)."""
    flags = []
    for arch in CUDA_ARCHS:
        number = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def cuda_wheel_include_dirs() -> list[str]:
    """Headers of the CUDA libraries that torch's wheel ships (cuBLAS, cuSPARSE, ...).

    ATen/cuda/CUDAContext.h includes them and a bare CUDA toolkit may not have them.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or spec.submodule_search_locations is None:
        return []
    cuda_major = torch.version.cuda.split(".")[0]
    candidates = (Path(base, f"cu{cuda_major}", "include") for base in spec.submodule_search_locations)
    return [str(path) for path in candidates if path.is_dir()]


def compiled_extension():
    """maml_fast._C: the C++ sources always, the CUDA sources when build_cuda_kernels() says so."""
    openmp = openmp_flags()
    cxx_flags = ["-O3", *openmp]
    # The limited C API: the module only defines PyInit, so one build serves every Python >= 3.10.
    common = dict(extra_link_args=openmp, py_limited_api=True)
    cpp_sources = sorted(glob("csrc/*.cpp"))
    if not build_cuda_kernels():
        return cpp_extension.CppExtension(
            "maml_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, **common
        )
    extension = cpp_extension.CUDAExtension(
        "maml_fast._C",
        cpp_sources + sorted(glob("csrc/*.cu")),
        define_macros=[("MAML_FAST_CUDA_ARCHS", '"{}"'.format(" ".join(CUDA_ARCHS)))],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", *nvcc_arch_flags()]},
        **common,
    )
    # Appended after CUDAExtension's own include dirs, so the toolkit's headers come first.
    extension.include_dirs.extend(cuda_wheel_include_dirs())
    return extension


setup(
    name="maml_fast",
    version="0.1.0",
    description="Fast MAML meta-learning in PyTorch: task-batched ops on fused CUDA and Triton kernels",
    # The repository's kernels/ (Triton) installs inside the package, as maml_fast.kernels.
    packages=[*find_packages(include=["maml_fast", "maml_fast.*"]), "maml_fast.kernels"],
    package_dir={"maml_fast.kernels": "kernels"},
    package_data={
        "maml_fast": [
            "data/assets/*.npz",
            "data/assets/*.txt",
            "data/assets/*.md",
            "data/assets/*.py",
            "backends/conv_choices.json",   # the measured conv winners (maml_fast.backends.conv_choice)
        ]
    },
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "tqdm", "tensorboard", "matplotlib"],
    ext_modules=[compiled_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    entry_points={"console_scripts": ["maml-fast = maml_fast.cli:main"]},
)
