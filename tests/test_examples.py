"""examples/ run as written against a real server (only the port is passed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from trio_bridge import RunningServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def test_greenhouse_controller_reacts_to_the_sensor(server: RunningServer) -> None:
    port = str(server.port)
    controller = await trio.lowlevel.open_process(
        [sys.executable, str(EXAMPLES / "greenhouse_controller.py"), port], stdout=subprocess.PIPE
    )
    assert controller.stdout is not None
    output = b""
    try:
        with trio.fail_after(60):
            while b"watching" not in output:
                chunk = await controller.stdout.receive_some()
                assert chunk, output
                output += chunk
            sensor = await trio.run_process([sys.executable, str(EXAMPLES / "greenhouse_sensor.py"), port])
            assert sensor.returncode == 0
            async for chunk in controller.stdout:
                output += chunk
            assert await controller.wait() == 0
    finally:
        if controller.returncode is None:
            controller.kill()
            await controller.wait()
    assert output.decode().splitlines() == [
        "watching",
        "20.5 °C",
        "19.0 °C",
        "17.5 °C: heater on",
        "16.0 °C",
        "18.5 °C",
        "21.0 °C",
        "23.0 °C: heater off",
        "24.5 °C",
        "sensor finished",
    ]
    heater = await server.store.get_variable("greenhouse", "heater")
    assert (heater.value, heater.version, heater.last_update_source) == (False, 3, "controller")
