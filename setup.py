"""Build hook for the one compiled piece: the .skeleton text parser (stages/_skeleton_parser.c).

Everything else is declared in pyproject.toml. The extension is optional at run time:
stages.skeleton_text falls back to a pure-Python parser with the same results when it is absent.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "stages._skeleton_parser",
            sources=["stages/_skeleton_parser.c"],
            extra_compile_args=["-O3", "-std=c99"],
            optional=True,
        )
    ]
)
