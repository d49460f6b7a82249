"""A TCP relay that can stop passing bytes on, as a frozen server or a
stalled network would, pass them on late, as a slow one, or cut its
connections with the bytes it holds, as a crash would."""

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
        self.sockets = set()
        self.thread = eventlet.spawn(self._accept)

    def _accept(self):
        while True:
            client, _ = self.server.accept()
            try:
                upstream = eventlet.connect(self.target)
            except OSError:
                client.close()
                continue
            self.sockets.update((client, upstream))
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
                self.sockets.discard(sock)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def drop(self):
        """Cut every open connection, discarding the bytes held back."""
        for sock in list(self.sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.sockets.clear()

    def close(self):
        self.thread.kill()
        self.server.close()
