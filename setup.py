"""Build script: cythonize the compiled core ``kimiha/_core.pyx``.

Environment variables select build variants:

* ``KIMIHA_TRACE=1``    -- compile with line tracing (coverage / profiling of the core).
* ``KIMIHA_ANNOTATE=1`` -- write ``kimiha/_core.html`` (``cython -a`` annotation).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

trace = os.environ.get("KIMIHA_TRACE") == "1"
macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if trace else []

extensions = [
    Extension(
        "kimiha._core",
        ["kimiha/_core.pyx"],
        define_macros=macros,
        extra_compile_args=["-O3"] if os.name != "nt" else [],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "embedsignature": True,
            "linetrace": trace,
        },
        annotate=os.environ.get("KIMIHA_ANNOTATE") == "1",
    )
)
