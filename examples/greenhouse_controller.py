"""Reacts to a greenhouse's temperature: switches the heater as the temperature crosses 18 and 22 °C.

Start it first (with a server running: `nox -s serve`), then run greenhouse_sensor.py beside it:

    python examples/greenhouse_controller.py [PORT]
"""

import asyncio
import contextlib
import sys

from trio_bridge import AlreadyExists
from trio_bridge.client import BridgeClient

SESSION = "greenhouse"


async def ensure_greenhouse(client: BridgeClient) -> None:
    """Create the session and its variables unless they exist already."""
    with contextlib.suppress(AlreadyExists):
        await client.create_session(SESSION)
    for name, vtype, initial in [
        ("temperature", "float", 20.0),
        ("heater", "boolean", False),
        ("running", "boolean", True),
    ]:
        with contextlib.suppress(AlreadyExists):
            await client.register_variable(SESSION, name, vtype, initial)


async def main(port: int) -> None:
    async with BridgeClient("127.0.0.1", port) as client:
        await ensure_greenhouse(client)
        await client.set(SESSION, "running", True)
        async for event in client.watch(SESSION, ["temperature", "running"]):
            if event.kind == "synced":
                print("watching", flush=True)
                continue
            variable = event.variable
            if variable is None:
                continue
            if variable.name == "running" and variable.value is False:
                print("sensor finished", flush=True)
                return
            if variable.name == "temperature" and event.kind == "value_change":
                heater = (await client.get(SESSION, "heater")).value
                if variable.value < 18 and not heater:
                    await client.set(SESSION, "heater", True, source="controller")
                    print(f"{variable.value} °C: heater on", flush=True)
                elif variable.value > 22 and heater:
                    await client.set(SESSION, "heater", False, source="controller")
                    print(f"{variable.value} °C: heater off", flush=True)
                else:
                    print(f"{variable.value} °C", flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50051))
