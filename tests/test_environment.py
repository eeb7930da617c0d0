"""What can be checked here of what cannot run here: the Dockerfile, the pins, the setup step."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO
from speechlm.train.cpu_compat import SUPPORTED_VERSIONS

DOCKERFILE = (REPO / "Dockerfile").read_text()


def _dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)[1]


def test_one_set_of_megatron_pins_everywhere():
    lock = (REPO / "requirements.lock").read_text()
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert f"megatron-core=={SUPPORTED_VERSIONS['megatron-core']}" in lock.splitlines()
    assert re.search(r"^BRIDGE_VERSION=(\S+)$", setup, re.M)[1] == SUPPORTED_VERSIONS["megatron-bridge"]
    assert _dockerfile_arg("MEGATRON_CORE_VERSION") == SUPPORTED_VERSIONS["megatron-core"]
    assert _dockerfile_arg("MEGATRON_BRIDGE_VERSION") == SUPPORTED_VERSIONS["megatron-bridge"]
    from importlib.metadata import version

    assert {p: version(p) for p in SUPPORTED_VERSIONS} == SUPPORTED_VERSIONS  # the venv has them


def test_dockerfile_pins_its_base_and_copies_what_exists():
    base = _dockerfile_arg("NEMO_IMAGE")
    assert re.fullmatch(r"nvcr\.io/nvidia/nemo:\d\d\.\d\d(\.\d+)?", base), base  # a release tag, never :latest
    for src in re.findall(r"^COPY (\S+)", DOCKERFILE, re.M):
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    extras = re.search(r"--extras requirements.in \\\n\s+(.+)$", DOCKERFILE, re.M)[1].split()
    pinned = {l.split("==")[0] for l in (REPO / "requirements.in").read_text().splitlines() if "==" in l}
    assert extras and set(extras) <= pinned
    # the image is checked at the end of the build, after the project is installed
    assert DOCKERFILE.rstrip().splitlines()[-3].startswith("RUN python docker/check_container.py --bridge")


def test_container_check_refuses_another_release_line(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_container", REPO / "docker" / "check_container.py")
    check_container = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_container)
    monkeypatch.setattr(check_container, "installed", lambda pkg: "0.7.0")
    with pytest.raises(SystemExit, match="not the 0.6 line"):
        check_container.sync({"megatron-bridge": "0.6.2"})
    # Here the pins match but TransformerEngine cannot import: the image build would fail.
    proc = subprocess.run([sys.executable, "docker/check_container.py", "--bridge", "0.6.2", "--core", "0.19.2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "transformer_engine" in proc.stderr


def test_setup_is_idempotent_and_quick_when_done():
    proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout


def test_setup_fails_loudly_without_python312(tmp_path):
    proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": "python3.12-missing",
                               "SPEECHLM_VENV": str(tmp_path / "venv")})
    assert proc.returncode != 0
    assert "Python 3.12" in proc.stderr and "python3.12-missing" in proc.stderr
