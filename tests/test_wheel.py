"""The package as a user installs it: `python -m build` makes a wheel and an sdist; the wheel, installed
into a fresh virtual environment, runs `mend demo` and a server round trip from a directory outside
the repository, on the configs, world and trained defaults it carries.

The fresh environment gets the wheel alone (`--no-deps`); the already installed dependencies are made
visible to it by a path file, which does not process that environment's own path files, so the
repository's editable install is not: `mend` can only come from the wheel."""

import os
import re
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_works_from_any_directory(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)], check=True,
                   capture_output=True)
    (wheel,) = dist.glob("*.whl")
    assert list(dist.glob("*.tar.gz"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)  # ensurepip: offline
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                             text=True, check=True).stdout.strip()
    Path(purelib, "outer-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "MEND_HOME": str(tmp_path / "home"), "PYTHONPATH": ""}
    where = subprocess.run([python, "-c", "import mend, mend.resources as r; print(mend.__file__, r.SHIPPED)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where and "site-packages" in where, where

    demo = subprocess.run([env_dir / "bin" / "mend", "demo", "demo.edits=10", "device=cpu"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "random held-out edits" in demo.stdout and "reliability" in demo.stdout

    server = subprocess.Popen([env_dir / "bin" / "mend", "serve", "server.port=0", "device=cpu"], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = re.search(r"listening on 127\.0\.0\.1:(\d+)", server.stdout.readline()).group(1)
        client = subprocess.run([python, "-m", "server.example_client", f"127.0.0.1:{port}"], cwd=work, env=env,
                                capture_output=True, text=True, timeout=300)
        assert client.returncode == 0, client.stderr[-3000:]
        assert "applied edit-000001" in client.stdout and "rolled back" in client.stdout
    finally:
        server.terminate()
        server.wait(60)
    assert (tmp_path / "home" / "journal" / "journal.sqlite3").is_file()  # the journal went to the home, not the directory
    assert not any(work.iterdir())
