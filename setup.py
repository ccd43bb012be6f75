"""Build script: cythonize the compiled core ``kimiha/_core.pyx`` and the shared-memory ring
``kimiha/bridge/_shm.pyx`` (the same-host transport's hot path; POSIX only).

Environment variables select build variants:

* ``KIMIHA_TRACE=1``    -- compile with line tracing (coverage / profiling of the core).
* ``KIMIHA_ANNOTATE=1`` -- write ``kimiha/_core.html`` (``cython -a`` annotation).
* ``KIMIHA_DEBUG=1``    -- keep debug info and symbols (native profiling with ``py-spy --native``, gdb);
  release builds are compiled without debug info and stripped (0.4 MB instead of 2.5 MB).
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

trace = os.environ.get("KIMIHA_TRACE") == "1"
debug = os.environ.get("KIMIHA_DEBUG") == "1" or trace
posix = os.name != "nt"
compile_args = ["-O3"] + ([] if debug else ["-g0"]) if posix else []
link_args = ["-Wl,--strip-all"] if posix and not debug and sys.platform.startswith("linux") else []
macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if trace else []

extensions = [
    Extension(
        "kimiha._core",
        ["kimiha/_core.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]
if posix:
    extensions.append(
        Extension(
            "kimiha.bridge._shm",
            ["kimiha/bridge/_shm.pyx"],
            define_macros=macros,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    )

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
