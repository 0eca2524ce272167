import asyncio

from relay.client import RelayClient


async def main() -> None:
    # wss://: RelayClient(url, key, ssl=ssl.create_default_context(cafile="ca.pem"))
    async with RelayClient("ws://127.0.0.1:8080/v1/stream", "sdk-demo-key") as client:
        await client.wait_ready(timeout=10)  # TimeoutError, saying why, if not connected
        print(f"v{client.version}", client.flags)
        async for change in client.changes():
            print(f"v{change.v} set {change.put} deleted {change.deleted}")


asyncio.run(main())
