"""Build of rlhf_fast: the Python packages and the rlhf_fast._C extension (host C++, CUDA when nvcc is found)."""

from setuptools import setup

setup(
    packages=["rlhf_fast", "rlhf_fast.backends", "rlhf_fast.ops", "rlhf_fast.kernels"],
    package_dir={"rlhf_fast": "rlhf_fast", "rlhf_fast.kernels": "kernels"},
)
