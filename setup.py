"""The one compiled part of the distribution: engine._cpu_kernels (engine/csrc/*.cpp).

Everything else about the package is declared in pyproject.toml. The extension is built against
the pinned torch (its C++ ABI), so the wheel is platform-specific; the Makefile builds it with
`--no-build-isolation` against the torch already in .venv. On x86-64 the kernels carry AVX-512,
AVX2 and baseline versions chosen at load time, so one wheel serves every node of the platform.
"""

from glob import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension(
            "engine._cpu_kernels",
            sorted(glob("engine/csrc/*.cpp")),
            # No -ffast-math: GCC 12 links crtfastmath into a shared object built with it, which
            # flushes denormals for the whole process (torch included).
            extra_compile_args=["-O3", "-g0", "-fno-math-errno", "-fno-trapping-math"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
