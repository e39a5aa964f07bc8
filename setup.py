"""hybrid-ext: butterfly allreduce and hybrid (data + model) parallelism for Horovod, DeepSpeed and torch."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "hybrid_ext" / "version.py").read_text()).group(1)

setup(
    name="hybrid-ext",
    version=VERSION,
    description=__doc__,
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `integrations/` sits at the top of the repository but installs as `hybrid_ext.integrations`,
    # so nothing called `integrations` lands at the top of site-packages.
    packages=[
        *find_packages(include=["hybrid_ext", "hybrid_ext.*"]),
        "hybrid_ext.integrations",
        *(f"hybrid_ext.integrations.{name}" for name in find_packages("integrations")),
    ],
    package_dir={"hybrid_ext.integrations": "integrations"},
    package_data={"hybrid_ext": ["data/*", "comm/transports/*.c"]},  # the shared-memory kernels, compiled on first use
    install_requires=["torch>=2.4", "numpy", "tqdm", "psutil"],
    extras_require={
        # Horovod 0.28.1 does not build against torch >= 2.10 as released: use `hybrid-ext install-horovod`,
        # which builds a patched wheel (see README). The extra is for stacks where the release builds.
        "horovod": ["horovod==0.28.1"],
        "deepspeed": ["deepspeed>=0.19"],
        "vision": ["torchvision", "tensorboard", "matplotlib", "scikit-learn"],
        "test": ["pytest>=8", "pytest-timeout", "hypothesis", "ruff"],
    },
    entry_points={"console_scripts": ["hybrid-ext = hybrid_ext.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: System :: Distributed Computing",
    ],
)
