"""Build script: cythonize the compiled core ``kimiha/_core.pyx``, the shared-memory ring
``kimiha/bridge/_shm.pyx`` (the same-host transport's hot path; POSIX only) and the benchmark's lower bounds
``kimiha/bench/_bounds.pyx`` (both it and the core include ``kimiha/_call.h``, the handler calls).

Environment variables select build variants:

* ``KIMIHA_TRACE=1``    -- compile with line tracing (coverage / profiling of the core).
* ``KIMIHA_ANNOTATE=1`` -- write ``kimiha/_core.html`` (``cython -a`` annotation).
* ``KIMIHA_DEBUG=1``    -- keep debug info and symbols (native profiling with ``py-spy --native``, gdb);
  release builds are compiled without debug info and stripped (0.4 MB instead of 2.5 MB).
* ``KIMIHA_BUILD_JOBS=N`` -- Cython and the C compiler work on the two extensions in N parallel jobs (default:
  the CPUs this process may use, at most 2; 1 builds one after the other).
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
# The two extensions are independent: translating and compiling them side by side takes the longer one's time
# instead of the sum (about 35 s instead of 60 s on 2 cores; every `pip install .` pays it).
try:
    cpus = len(os.sched_getaffinity(0))
except AttributeError:  # not Linux
    cpus = os.cpu_count() or 1
jobs_env = os.environ.get("KIMIHA_BUILD_JOBS", "")
try:
    jobs = int(jobs_env) if jobs_env else min(2, cpus)
except ValueError:
    jobs = 0
if jobs < 1:
    sys.exit(f"setup.py: KIMIHA_BUILD_JOBS: expected a number of parallel jobs >= 1, got {jobs_env!r}")

extensions = [
    Extension(
        "kimiha._core",
        ["kimiha/_core.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    ),
    # `kimiha bench compare`'s lower bounds: the least a compiled bus costs (calls handlers as _core does).
    Extension(
        "kimiha.bench._bounds",
        ["kimiha/bench/_bounds.pyx"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    ),
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
    options={"build_ext": {"parallel": jobs}} if jobs > 1 else {},
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "embedsignature": True,
            "linetrace": trace,
        },
        annotate=os.environ.get("KIMIHA_ANNOTATE") == "1",
        nthreads=jobs if jobs > 1 else 0,
    )
)
