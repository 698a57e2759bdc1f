"""pip install . / pip install -e . — a pure-Python install that ships the C++/CUDA sources
(as sama_ext/_csrc) for the JIT build on first use. torch is not imported here unless an
ahead-of-time build is asked for with SAMA_EXT_AOT=1 (then use --no-build-isolation so the
installed torch is the one built against)."""
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
CSRC_SUFFIXES = {".h", ".cuh", ".cpp", ".cu"}


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as sama_ext/_csrc (the kernels' sources at run time)."""

    def run(self):
        super().run()
        if self.editable_mode:  # editable installs read csrc/ from the checkout
            return
        dest = Path(self.build_lib) / "sama_ext" / "_csrc"
        if dest.exists():
            shutil.rmtree(dest)
        for f in CSRC.rglob("*"):
            if f.is_file() and f.suffix in CSRC_SUFFIXES and "tests" not in f.relative_to(CSRC).parts:
                target = dest / f.relative_to(CSRC)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)


def aot_extension():
    """The optional ahead-of-time build (SAMA_EXT_AOT=1): the same sources and flags as the JIT
    build, minus -march=native (the wheel may run elsewhere); CUDA kernels whenever torch has
    CUDA and a toolkit of CUDA >= 12.1 is found (no GPU needed to compile), for the visible GPUs,
    TORCH_CUDA_ARCH_LIST, or else a default list of sm_70+ architectures (sama_ext/_build.py)."""
    if os.environ.get("SAMA_EXT_AOT") != "1":
        return [], {}
    import sys

    sys.path.insert(0, str(HERE))
    from sama_ext import _build  # imports torch: fine, the AOT build needs it anyway

    import torch

    cfg = _build.build_config(torch, aot=True)  # BuildError under SAMA_EXT_CUDA=1 if CUDA cannot be built
    if cfg.with_cuda:
        os.environ["CUDA_HOME"] = str(cfg.cuda_home)
        print(f"sama_ext: ahead-of-time build with CUDA kernels for {';'.join(str(a) for a in cfg.cuda_archs)} "
              f"({cfg.arch_source})")
    else:
        print(f"sama_ext: ahead-of-time build of the CPU kernels only: {cfg.why_no_cuda}")
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = str(cfg.cuda_home) if cfg.with_cuda else cpp_extension.CUDA_HOME
    sources = [f"csrc/{s}" for s in _build.SOURCES + (_build.CUDA_SOURCES if cfg.with_cuda else ())]
    cls = cpp_extension.CUDAExtension if cfg.with_cuda else cpp_extension.CppExtension
    ext = cls("sama_ext._C", sources, include_dirs=[str(CSRC)],
              extra_compile_args={"cxx": cfg.cflags, "nvcc": cfg.cuda_cflags}, extra_link_args=cfg.ldflags)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


exts, cmdclass = aot_extension()
cmdclass["build_py"] = BuildPyWithSources

setup(
    name="sama_ext",
    version="0.1.0",
    description="SAMA scalable meta learning for PyTorch: fused C++/CUDA kernels and DDP hooks",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sama_ext", "sama_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "ninja", "numpy"],
    extras_require={
        # the test suite also runs the demo and the examples (a small HuggingFace BERT built in code)
        # accelerate: transformers.Trainer needs it (sama_ext.hf); peft: LoRA adapters as θ (FSDP2 tests, example)
        "test": ["pytest", "hypothesis", "expecttest", "scikit-learn", "matplotlib", "tqdm", "transformers",
                 "accelerate", "peft"],
        "hf": ["transformers", "accelerate"],  # sama_ext.hf.SamaTrainer
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
    },
    ext_modules=exts,
    cmdclass=cmdclass,
    zip_safe=False,
)
