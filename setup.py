"""The optional C kernels, `lora_tools/io/_kernels.c` (everything else is in pyproject.toml).

`optional=True`: where no C compiler is found the package installs without them, and
`lora_tools.io.kernels.native` returns None: the FP8 re-quantization takes torch's passes
and the bf16 writers numpy's, with the same bytes, more slowly."""

import sys

from setuptools import Extension, setup

# -fno-trapping-math lets GCC vectorize the branch-free selects; it changes no result.
# -ffp-contract=off: no fused multiply-add, so each product is rounded as torch rounds it.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-fno-trapping-math", "-ffp-contract=off"]

setup(ext_modules=[Extension("lora_tools.io._kernels", ["lora_tools/io/_kernels.c"], extra_compile_args=FLAGS,
                             optional=True)])
