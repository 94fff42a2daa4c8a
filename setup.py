"""Builds Ember's C kernels (ember/kernels/csrc) as a shared library next to the package; ctypes loads it."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "ember.kernels._ember_kernels",
    sources=["ember/kernels/csrc/ember_kernels.c"],
    # no -march: the ISA is chosen at run time; -ffp-contract=off keeps dequantization bit-identical
    extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-pthread", "-Wall"],
    extra_link_args=["-pthread"],
    libraries=["m"],
)])
