"""A newcomer's first commands (issue #12): the README's install block, followed literally in a fresh
virtualenv, leaves `trio-bridge` on the PATH, and with it the CLI, an example (as its docstring says to
run it) and the synchronous client work; `nox -s serve` installs once, then starts without pip.

pip runs offline here (tests use no network beyond loopback): ``nox -s tests`` first puts the wheels a
`pip install .` needs in a folder ($TRIO_BRIDGE_WHEELHOUSE), and pip is pointed at it through its
environment (``PIP_NO_INDEX``, ``PIP_FIND_LINKS``); the commands themselves are the README's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.doc_blocks import README, ROOT, commands, example, output
from tests.support import read_until, serving_port

WHEELHOUSE = os.environ.get("TRIO_BRIDGE_WHEELHOUSE", "")

pytestmark = pytest.mark.skipif(
    not WHEELHOUSE, reason="needs the wheels `nox -s tests` prepares ($TRIO_BRIDGE_WHEELHOUSE)"
)


def _copy_of_the_project(into: Path) -> Path:
    """The project's files, as a fresh clone has them (and those not committed yet)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    project = into / "trio_bridge"
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = project / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return project


def _offline(env: dict[str, str]) -> dict[str, str]:
    clean = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # Away from any virtualenv this test runs in: the README's commands make their own.
    path = [p for p in clean.get("PATH", "").split(os.pathsep) if p != str(Path(sys.executable).parent)]
    return {
        **clean,
        "PATH": os.pathsep.join(path),
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": WHEELHOUSE,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


async def _in_venv(command: str, project: Path, env: dict[str, str]) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(
        ["bash", "-c", command], cwd=project, env=env, capture_stdout=True, capture_stderr=True, check=False
    )


async def test_the_readmes_first_commands_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    # After the README's two commands there was no `trio-bridge` on the PATH, and the examples failed
    # with ModuleNotFoundError.
    project = _copy_of_the_project(tmp_path)
    *install, serve = commands(README, "install")
    assert serve == "trio-bridge serve"
    env = _offline(dict(os.environ))
    script = " && ".join(install)
    result = await trio.run_process(
        ["bash", "-c", script], cwd=project, env=env, capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    venv_bin = project / ".venv" / "bin"
    assert (venv_bin / "trio-bridge").exists()
    env["PATH"] = f"{venv_bin}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(project / ".venv")
    # The server, as the README starts it (only the port differs: 50051 may be taken on a test machine).
    server = await trio.lowlevel.open_process(
        ["bash", "-c", f"exec {serve} --port 0"], cwd=project, env=env, stdout=subprocess.PIPE
    )
    try:
        port = await serving_port(server)
        # The CLI, from the PATH.
        created = await trio.run_process(
            ["trio-bridge", "session", "create", "--id", "lab", "--port", str(port)],
            env=env,
            capture_stdout=True,
            check=False,
        )
        assert created.stdout == b"lab\n"
        # The examples, run as their docstrings say: the sensor alone says what to start first.
        for name in ("greenhouse_controller", "greenhouse_sensor"):
            docstring = (project / "examples" / f"{name}.py").read_text()
            assert f"python examples/{name}.py [PORT]" in docstring
        alone = await _in_venv(f"python examples/greenhouse_sensor.py {port}", project, env)
        assert alone.returncode == 1
        assert alone.stderr == b"no greenhouse yet: start examples/greenhouse_controller.py first\n"
        controller = await trio.lowlevel.open_process(
            ["bash", "-c", f"exec python examples/greenhouse_controller.py {port}"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
        )
        assert controller.stdout is not None
        shown = await read_until(controller.stdout, b"watching")
        with trio.fail_after(60):
            sensor = await _in_venv(f"python examples/greenhouse_sensor.py {port}", project, env)
            assert sensor.returncode == 0, sensor.stderr
            async for chunk in controller.stdout:
                shown += chunk
            assert await controller.wait() == 0
        assert shown.decode().endswith("23.0 °C: heater off\n24.5 °C\nsensor finished\n")
        # The synchronous client, as the README shows it.
        code = example(README, "sync").text.replace("50051", str(port))
        synchronous = await trio.run_process(
            ["python", "-c", code], env=env, capture_stdout=True, capture_stderr=True, check=False
        )
        assert synchronous.returncode == 0, synchronous.stderr.decode()
        assert synchronous.stdout.decode() == output(README, "sync")
    finally:
        server.send_signal(signal.SIGINT)
        with trio.move_on_after(10):
            await server.wait()
        server.kill()
        await server.wait()


@pytest.mark.skipif(shutil.which("nox") is None, reason="needs nox on the PATH (pip install nox)")
async def test_nox_serve_installs_once_then_starts_without_pip(tmp_path: Path) -> None:
    # `nox -s serve` reinstalled its virtualenv on every start (~10 s before it listened).
    project = _copy_of_the_project(tmp_path)
    env = _offline(dict(os.environ))
    outputs = []
    for _ in range(2):
        process = await trio.lowlevel.open_process(
            ["nox", "-s", "serve", "--envdir", str(tmp_path / "envs"), "--", "--port", "0"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            outputs.append(await read_until(process.stdout, b"serving on"))
        finally:
            os.killpg(process.pid, signal.SIGINT)
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    first, second = (output.decode() for output in outputs)
    assert "pip install -e ." in first
    assert "pip install" not in second and "installed already" in second, second
