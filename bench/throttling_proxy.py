"""A TCP proxy in front of DynamoDB for bench/chaos.sh: while FLAG exists, every request
gets DynamoDB's 400 ProvisionedThroughputExceededException (connections open when it
appears are cut, so kept-alive ones cannot slip past); otherwise bytes pass through.

Usage: python3 bench/throttling_proxy.py LISTEN_PORT UPSTREAM_HOST:PORT FLAG
Prints the requests refused when it gets SIGTERM.
"""
import asyncio
import os
import signal
import sys

THROTTLE = (
    b'{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",'
    b'"message":"injected by bench/chaos.sh"}'
)


async def main(port, upstream, flag):
    host, upstream_port = upstream.rsplit(":", 1)
    open_writers = set()
    refused = 0

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def serve(reader, writer):
        nonlocal refused
        if os.path.exists(flag):
            refused += 1
            try:
                await asyncio.wait_for(reader.read(65536), 1)
            except asyncio.TimeoutError:
                pass
            head = (
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.0\r\n"
                f"Content-Length: {len(THROTTLE)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + THROTTLE)
            await writer.drain()
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(upstream_port))
        except OSError:
            writer.close()
            return
        open_writers.update((writer, up_writer))
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass
        open_writers.difference_update((writer, up_writer))

    async def cut_when_flagged():
        was = False
        while True:
            now = os.path.exists(flag)
            if now and not was:
                for w in list(open_writers):
                    w.close()
            was = now
            await asyncio.sleep(0.1)

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    watcher = asyncio.create_task(cut_when_flagged())
    async with server:
        await stop.wait()
    watcher.cancel()
    print(refused, flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
