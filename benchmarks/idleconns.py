"""Open N TLS connections (handshake completed) and keep them idle until stdin closes.

Used by benchmarks/run.py for the memory-per-idle-connection measurement:
    python idleconns.py PORT N [SNI] [CONCURRENCY]
prints "ready OPENED FAILED SECONDS" once every handshake is done (or failed), then holds
the connections until a line arrives on stdin (or stdin closes), and closes them.
"""
from __future__ import annotations

import asyncio
import ssl
import sys
import time


async def main() -> None:
    port, n = int(sys.argv[1]), int(sys.argv[2])
    sni = sys.argv[3] if len(sys.argv) > 3 else "localhost"
    concurrency = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sem = asyncio.Semaphore(concurrency)
    writers: list[asyncio.StreamWriter] = []
    failed = 0
    first_error = ""

    async def one() -> None:
        nonlocal failed, first_error
        async with sem:
            try:
                _, w = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni), 30)
                writers.append(w)
            except Exception as e:  # counted, reported
                failed += 1
                first_error = first_error or repr(e)

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    print(f"ready {len(writers)} {failed} {time.monotonic() - t0:.2f} {first_error}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    for w in writers:
        w.transport.abort()


if __name__ == "__main__":
    try:
        import uvloop  # noqa: F401  (faster client; optional)
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
