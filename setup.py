"""Build the optional native DPCA fast path; without a C compiler crossopd uses numpy only."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "crossopd.core._dpca",
            ["src/crossopd/core/_dpca.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
