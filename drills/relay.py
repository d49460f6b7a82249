"""A TCP relay to PostgreSQL that can stop passing bytes on, as a frozen
database or a stalled network would, or pass them on late, as a slow one."""

import contextlib
import socket

import eventlet


class Relay:
    def __init__(self, port, host="127.0.0.1"):
        self.target = (host, port)
        self.server = eventlet.listen((host, 0))
        self.port = self.server.getsockname()[1]
        self.paused = False
        self.delay = 0.0
        self.thread = eventlet.spawn(self._accept)

    def _accept(self):
        while True:
            client, _ = self.server.accept()
            try:
                upstream = eventlet.connect(self.target)
            except OSError:
                client.close()
                continue
            eventlet.spawn(self._pipe, client, upstream)
            eventlet.spawn(self._pipe, upstream, client)

    def _pipe(self, source, sink):
        try:
            while data := source.recv(65536):
                while self.paused:
                    eventlet.sleep(0.05)
                if self.delay:
                    eventlet.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.thread.kill()
        self.server.close()
