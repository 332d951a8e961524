"""Reports a greenhouse's temperature: a cold night, then a sunny morning. Run it beside
greenhouse_controller.py, which reacts to every reading.

    python examples/greenhouse_sensor.py [PORT]
"""

import asyncio
import sys

from trio_bridge import NotFound
from trio_bridge.client import BridgeClient

READINGS = [20.5, 19.0, 17.5, 16.0, 18.5, 21.0, 23.0, 24.5]


async def main(port: int) -> None:
    async with BridgeClient("127.0.0.1", port) as client:
        try:
            await client.get("greenhouse", "temperature")
        except NotFound:
            sys.exit("no greenhouse yet: start examples/greenhouse_controller.py first")
        for reading in READINGS:
            await client.set("greenhouse", "temperature", reading, source="sensor")
            await asyncio.sleep(0.2)
        await client.set("greenhouse", "running", False, source="sensor")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50051))
