"""The optional C kernel of `lora_tools.io.fp8` (everything else is in pyproject.toml).

`optional=True`: where no C compiler is found the package installs without it, and the
FP8 re-quantization takes its torch passes instead (the same codes, slower)."""

import sys

from setuptools import Extension, setup

# -fno-trapping-math lets GCC vectorize the branch-free selects; it changes no result.
# -ffp-contract=off: no fused multiply-add, so each product is rounded as torch rounds it.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-fno-trapping-math", "-ffp-contract=off"]

setup(ext_modules=[Extension("lora_tools.io._kernels", ["lora_tools/io/_kernels.c"], extra_compile_args=FLAGS,
                             optional=True)])
