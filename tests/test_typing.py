"""The hand-written stub ``kimiha/_core.pyi`` matches the compiled module (mypy.stubtest)."""

import pathlib
import subprocess
import sys

import kimiha

ALLOWLIST = pathlib.Path(__file__).with_name("stubtest-allowlist.txt")


def test_core_stub_matches_the_compiled_module(tmp_path):
    # An installed wheel is found by mypy as a PEP 561 package from anywhere; an editable install is
    # not, so there mypy has to run beside the source tree.
    package = pathlib.Path(kimiha.__file__).resolve().parent
    where = tmp_path if "site-packages" in package.parts else package.parent
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "kimiha._core", "--allowlist", str(ALLOWLIST),
         "--mypy-config-file", str(config)],
        capture_output=True, text=True, timeout=600, cwd=where,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success" in proc.stdout
