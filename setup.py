"""The native kernels ship prebuilt in a wheel (qwen_engine/kernels/build.py says how each variant compiles), so a
machine without a C compiler still gets them. Editable installs (`make`, `pip install -e`) skip this: a source
checkout compiles its CPU's variant at first use. Everything else about the package is in pyproject.toml."""

import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def kernel_builder():
    """qwen_engine/kernels/build.py, loaded by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("qwen_kernel_build", Path(__file__).parent / "qwen_engine/kernels/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithKernels(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        builder = kernel_builder()
        cc = builder.compiler()
        if cc is None:
            sys.stderr.write("qwen-engine: no C compiler, so this build carries no prebuilt kernels (they compile at "
                             "first use where a compiler is found)\n")
            return
        failed = builder.build_prebuilt(Path(self.build_lib) / "qwen_engine" / "kernels" / "prebuilt", cc)
        if failed:
            sys.stderr.write(f"qwen-engine: {cc} could not build the {', '.join(failed)} kernels; those compile at "
                             "first use\n")


setup(cmdclass={"build_py": BuildWithKernels})
