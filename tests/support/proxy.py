"""A TCP proxy on loopback that can lose a reply: the request reaches the server, the answer not.

For Redis this reproduces what a Redis shutdown (or a connection broken at the wrong moment) does
to a client: the server has run the command — a dramatiq fetch has moved messages into the
worker's ack set — but the reply never arrives.

    with ReplyLosingProxy(redis_server.port) as proxy:
        url = proxy.url                                # redis://127.0.0.1:<proxy port>/0
        proxy.lose_reply_containing = b'"actor_name"'  # the first reply with it, and all after it
        ...                                            #   on that connection, are dropped
        assert proxy.lost.wait(10)
        proxy.cut()                                    # close every proxied connection
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType

LOOPBACK = "127.0.0.1"


class ReplyLosingProxy:
    def __init__(self, upstream_port: int, upstream_host: str = LOOPBACK) -> None:
        self.upstream = (upstream_host, upstream_port)
        #: the first reply chunk containing these bytes, and all later ones on its connection, are
        #: dropped instead of forwarded (once; None: forward everything)
        self.lose_reply_containing: bytes | None = None
        #: set when a reply was lost
        self.lost = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reply-losing-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> ReplyLosingProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, LOOPBACK, 0), self._loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        """Close every proxied connection, both sides, at once."""

        async def close_all() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(5)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.cut()

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> ReplyLosingProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, server_w))

        swallowing = False

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
            nonlocal swallowing
            try:
                while data := await src.read(65536):
                    marker = self.lose_reply_containing
                    if replies and not swallowing and marker is not None and marker in data:
                        self.lose_reply_containing = None
                        swallowing = True
                        self.lost.set()
                    if replies and swallowing:
                        continue
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                # one side gone: the other goes too, as with a real broken connection
                for writer in (client_w, server_w):
                    writer.transport.abort()
                    self._writers.discard(writer)

        with contextlib.suppress(Exception):
            await asyncio.gather(pump(client_r, server_w, False), pump(server_r, client_w, True))
