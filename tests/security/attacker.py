"""The attacking client of the starvation tests, run as its own process (`python attacker.py
MODE ...`) so that its work does not slow down the measured client's event loop.

Modes (all from one source address, 127.0.0.1 unless --source):
  slow-body  COUNT connections each send a POST's headers, then one body byte every
             INTERVAL seconds (a body that never completes);
  ws         open WebSockets to PATH at RATE handshakes/s until COUNT were tried, and hold
             every accepted one without sending anything (idle sockets, handshake floods).
Runs for SECONDS, then prints one JSON line of counts and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import time
from typing import Any


def _raise_open_files() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def slow_body(args: argparse.Namespace) -> dict[str, Any]:
    outcomes: collections.Counter[str] = collections.Counter()
    end = time.monotonic() + args.seconds
    head = (
        f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
        "Content-Type: application/didcomm-encrypted+json\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    gate = asyncio.Semaphore(200)  # connects in flight at once (the backlog is 2048)

    async def one() -> None:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", args.port, local_addr=(args.source, 0)), 10
                )
            except (OSError, TimeoutError):
                outcomes["connect_failed"] += 1
                return
        opened = time.monotonic()
        answer = asyncio.ensure_future(reader.read(200))
        try:
            writer.write(head)
            while time.monotonic() < end:
                done, _ = await asyncio.wait([answer], timeout=args.interval)
                if done:
                    data = answer.result()
                    status = (
                        data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
                    )
                    quick = "at_once" if time.monotonic() - opened < 1.0 else "later"
                    outcomes[f"{status}_{quick}"] += 1
                    return
                writer.write(b"x")
            outcomes["held_to_end"] += 1
        except OSError:
            outcomes["reset"] += 1
        finally:
            answer.cancel()
            writer.close()

    await asyncio.gather(*(one() for _ in range(args.count)))
    return dict(outcomes)


async def ws(args: argparse.Namespace) -> dict[str, Any]:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    outcomes: collections.Counter[str] = collections.Counter()
    end = time.monotonic() + args.seconds
    url = f"ws://127.0.0.1:{args.port}{args.path}"
    held: list[Any] = []

    async def one() -> None:
        try:
            sock = await connect(
                url,
                open_timeout=10,
                ping_interval=None,
                compression=None,
                proxy=None,
                local_addr=(args.source, 0),
            )
        except InvalidStatus as exc:
            outcomes[f"http_{exc.response.status_code}"] += 1
            return
        except (OSError, TimeoutError, ConnectionClosed):
            outcomes["connect_failed"] += 1
            return
        except Exception as exc:  # e.g. InvalidMessage: closed before any answer  # noqa: BLE001
            outcomes[type(exc).__name__] += 1
            return
        held.append(sock)
        try:
            await asyncio.wait_for(sock.wait_closed(), max(0.1, end - time.monotonic()))
            outcomes[f"closed_{sock.close_code}"] += 1
        except TimeoutError:
            outcomes["open_at_end"] += 1

    tasks = []
    started = time.monotonic()
    for n in range(args.count):
        delay = started + n / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.monotonic() >= end:
            break
        tasks.append(asyncio.ensure_future(one()))
    outcomes["tried"] = len(tasks)
    await asyncio.gather(*tasks)
    for sock in held:
        sock.transport.abort()
    return dict(outcomes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["slow-body", "ws"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--path", default="/ws")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--source", default="127.0.0.1")
    args = parser.parse_args()
    _raise_open_files()
    run = slow_body if args.mode == "slow-body" else ws
    print("READY", flush=True)
    print(json.dumps(asyncio.run(run(args)), sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
