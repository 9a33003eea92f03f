"""Which folders become which packages; everything else about the project is in pyproject.toml.

The training configs and the fused ops' sources live at the top of the repository
(``configs/``, ``custom_ops/``), where people edit them. A wheel carries them inside the package,
as ``stylex/resources/configs`` and ``stylex/resources/custom_ops``, so that an installed StylEx
trains and compiles from any folder (:mod:`stylex.resources` finds either copy). pyproject.toml
can either discover packages or list them, not both; discovering ``stylex*`` and adding the two
mapped data packages needs this file.
"""

from setuptools import find_namespace_packages, setup

DATA = {  # package in the wheel -> folder in the repository
    "stylex.resources.configs": "configs",
    "stylex.resources.custom_ops": "custom_ops",
}

setup(
    packages=find_namespace_packages(include=["stylex", "stylex.*"]) + list(DATA),
    package_dir=DATA,
    package_data={
        "stylex.resources.configs": ["*.yaml", "**/*.yaml"],
        "stylex.resources.custom_ops": ["*.cpp", "*.cu", "*.cuh", "*.h", "*.md"],
    },
)
