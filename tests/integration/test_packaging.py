"""The wheel outside a checkout, and the container files (when docker is here).

The wheel is built from this checkout and installed without an index into a fresh
virtualenv whose dependencies come from the project's own virtualenv (a .pth line): no
download.  From a folder outside the checkout it must print its help and render the
supervisord configuration into its home folder ($XDG_STATE_HOME/sipcluster), never into
site-packages.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration


def run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], text=True, capture_output=True,
                          timeout=300, **kwargs)


def test_the_wheel_works_outside_a_checkout(tmp_path):
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "dist",
                 ROOT], cwd=tmp_path)
    if built.returncode != 0 and "setuptools" in built.stderr:  # offline: no build backend
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("sipcluster-*.whl")

    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(target),
                                                    "platbase": str(target)}))
    # The dependencies: those of the project's virtualenv, after the wheel's own files.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", target / "bin" / "python",
                     "install", "--no-index", "--no-deps", wheel], cwd=tmp_path)
    if installed.returncode != 0 and "no such option: --python" in installed.stderr:
        pytest.skip("this pip cannot install into another environment (--python)")
    assert installed.returncode == 0, installed.stderr

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "xdg"),
           "REDIS_URL": "redis://127.0.0.1:6399/0"}
    helped = run([target / "bin" / "sipctl", "--help"], cwd=outside, env=env)
    assert helped.returncode == 0, helped.stderr
    assert "sipctl users add" in helped.stdout

    rendered = run([target / "bin" / "sipcluster", "render"], cwd=outside, env=env)
    assert rendered.returncode == 0, rendered.stderr
    home = tmp_path / "xdg" / "sipcluster"
    conf = home / "run" / "supervisord.conf"
    assert rendered.stdout.strip() == str(conf)
    text = conf.read_text()
    assert f"directory = {home}" in text and "[program:worker]" in text
    assert "[program:redis]" not in text  # REDIS_URL: a Redis run elsewhere
    assert (home / "run" / "secret").is_file()
    assert not list(site.glob("run")) and not list(site.glob("state"))
    assert (site / "cluster" / "data" / "cluster.toml").is_file()

    chosen = tmp_path / "chosen"
    rendered = run([target / "bin" / "sipcluster", "--home", chosen, "render"], cwd=outside,
                   env=env)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout.strip() == str(chosen / "run" / "supervisord.conf")


def docker() -> str | None:
    """The docker client, when a daemon answers it."""
    client = shutil.which("docker")
    if client is None:
        return None
    try:
        info = subprocess.run([client, "info"], capture_output=True, timeout=20)
    except subprocess.TimeoutExpired:
        return None
    return client if info.returncode == 0 else None


DOCKER = docker()


@pytest.mark.skipif(DOCKER is None, reason="no docker daemon here")
def test_the_image_builds_and_the_compose_file_is_valid(tmp_path):
    built = run([DOCKER, "build", "-f", ROOT / "deploy" / "Dockerfile", "-t",
                 "sipcluster:test", ROOT])
    assert built.returncode == 0, built.stderr
    helped = run([DOCKER, "run", "--rm", "sipcluster:test", "sipctl", "--help"])
    assert helped.returncode == 0 and "sipctl users add" in helped.stdout
    checked = run([DOCKER, "compose", "-f", ROOT / "deploy" / "compose.yaml", "config"],
                  env={"PATH": "/usr/bin:/bin:/usr/local/bin", "REDIS_PASSWORD": "x"})
    assert checked.returncode == 0, checked.stderr
