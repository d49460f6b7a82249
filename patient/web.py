"""The HTTP entrypoint: Nameko's ``@http`` with bearer-token checks, bounded
JSON bodies, and problem details for every error, expected or not."""

import json
import logging
import time
from functools import partial

import eventlet
from eventlet import wsgi
from eventlet.event import Event
from nameko.web.handlers import HttpRequestHandler
from nameko.web.server import HttpOnlyProtocol, WebServer, WsgiApp, parse_address
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.routing import RequestRedirect
from werkzeug.wrappers import Request, Response

from patient.auth import TokenVerifier, authorize
from patient.dependencies import guarded, internal_error
from patient.encoded import embed
from patient.errors import InvalidRequest, ServiceUnavailable
from patient.problems import (
    HTTP_ERRORS,
    MethodNotAllowed,
    PayloadTooLarge,
    RouteNotFound,
    UnsupportedMediaType,
    problem,
)

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:8000"
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
JSON = ("application/json",)
FHIR_JSON = ("application/json", "application/fhir+json")


class PatientWsgiApp(WsgiApp):
    """Nameko's WSGI app, answering unknown routes, wrong methods and any
    failure outside a worker with problem details, never a traceback."""

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        request = Request(environ, shallow=True)
        rule = "(no route)"
        try:
            adapter = self.url_map.bind_to_environ(environ)
            provider, values = adapter.match()
            rule = provider.url
            request.path_values = values
            response = provider.handle_request(request)
        except WerkzeugNotFound:
            response = problem(RouteNotFound())
        except WerkzeugMethodNotAllowed as exc:
            response = problem(MethodNotAllowed(exc.valid_methods or ()))
        except RequestRedirect:
            # Werkzeug would redirect (a doubled or trailing slash) to the
            # Host the caller named, query and all: no such route instead.
            response = problem(RouteNotFound())
        except HTTPException as exc:
            response = exc.get_response(environ)
        except Exception as exc:
            response = problem(internal_error("http request", exc))
        # The route, not the path or query: those can hold search criteria.
        log.info(
            "%s %s %s %.1f ms",
            request.method[:10],
            rule,
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response(environ, start_response)


class PatientWebServer(WebServer):
    """Nameko's web server, on 127.0.0.1 unless configured otherwise, with
    one token verifier for every route."""

    @property
    def bind_addr(self):
        address = self.container.config.get("WEB_SERVER_ADDRESS") or DEFAULT_ADDRESS
        return parse_address(address)

    def setup(self):
        super().setup()
        config = self.container.config
        self.verifier = TokenVerifier(config)
        self.max_body_bytes = int(
            config.get("MAX_BODY_BYTES") or DEFAULT_MAX_BODY_BYTES
        )

    def start(self):
        # Nameko's start, but without SO_REUSEPORT: with it, a second
        # process on the same port would share the traffic instead of failing.
        if not self._starting:
            self._starting = True
            self._sock = eventlet.listen(self.bind_addr, reuse_port=False)
            self._sock.settimeout(None)
            self._serv = self.get_wsgi_server(self._sock, self.get_wsgi_app())
            self._gt = self.container.spawn_managed_thread(self.run)

    def get_wsgi_app(self):
        return PatientWsgiApp(self)

    def get_wsgi_server(self, sock, wsgi_app, protocol=None, debug=False):
        # eventlet's access log holds the query string, search criteria and
        # all; PatientWsgiApp logs each request without it.
        timeout = float(self.container.config.get("HTTP_SOCKET_TIMEOUT_S", 30))
        return wsgi.Server(
            sock,
            sock.getsockname(),
            wsgi_app,
            protocol=protocol or QuietProtocol,
            log=logging.getLogger("nameko.web.server"),
            log_output=False,
            # A client that stops sending (a slow body, half the headers)
            # loses its connection instead of holding it for ever.
            socket_timeout=timeout,
        )


class QuietProtocol(HttpOnlyProtocol):
    """eventlet's protocol, without http.server's own log: on a request it
    refuses (a malformed request line, an oversized header) that log writes
    the raw request line, search criteria and all, to stderr."""

    def log_message(self, format, *args):
        code = args[0] if args and isinstance(args[0], int) else "?"
        log.info("refused a malformed HTTP request (%s)", code)


class PatientHttp(HttpRequestHandler):
    """An HTTP route. With an ``action``, the caller must hold a token whose
    roles may do it; the worker gets the ``user`` (a ``Principal``). With
    ``body`` (the media types it accepts), the worker gets the parsed JSON
    ``body``."""

    server = PatientWebServer()

    def __init__(self, method, url, action=None, body=(), **kwargs):
        super().__init__(method, url, **kwargs)
        self.action = action
        self.body = body

    def handle_request(self, request):
        request.shallow = False
        # For /health: a service that cannot check tokens serves nothing.
        request.tokens_checked = self.server.verifier.key is not None
        user = None
        try:
            kwargs = dict(request.path_values)
            if self.action is not None:
                token = request.headers.get("Authorization")
                user = self.server.verifier.principal(token)
                authorize(user, self.action)
                kwargs["user"] = user
            if self.body:
                limit = self.server.max_body_bytes
                kwargs["body"] = read_json(request, self.body, limit)
            return self._run_worker(request, kwargs)
        except HTTP_ERRORS as exc:
            return problem(exc, reveal_holder=user is None or not user.own_record_only)
        except Exception as exc:
            return problem(internal_error(self.method_name, exc))

    def _run_worker(self, request, kwargs):
        event = Event()
        try:
            self.container.spawn_worker(
                self,
                (request,),
                kwargs,
                context_data={},
                handle_result=partial(self.handle_result, event),
            )
        except Exception as exc:
            # The container is stopping.
            log.warning("no worker for %s: %s", self.method_name, type(exc).__name__)
            raise ServiceUnavailable("the service is stopping; retry") from None
        return event.wait()


def route(method, url, action=None, body=()):
    """An HTTP route on the service: ``guarded`` as every RPC method is."""

    def decorate(function):
        return PatientHttp.decorator(
            method, url, action=action, body=body, expected_exceptions=HTTP_ERRORS
        )(guarded(function))

    return decorate


def read_json(request, media_types, limit):
    """The request's JSON body, refused unread when it is over ``limit``
    bytes or not JSON in UTF-8, and refused with duplicate keys (parsers
    disagree on which one wins)."""
    charset = request.mimetype_params.get("charset", "utf-8").lower()
    if request.mimetype not in media_types or charset != "utf-8":
        raise UnsupportedMediaType(media_types)
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(limit)
    data = _read_at_most(_body_stream(request), limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(limit)
    # Known shortcoming: JSON numbers become floats here and in kombu's RPC
    # decoding, so a FHIR decimal keeps neither its precision nor its
    # trailing zeros (1.50 comes back 1.5, 1e-400 as 0.0). Parsing them as
    # Decimal on both paths, and encoding Decimal back as written, would.
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_refuse_constant,
        )
    except _DuplicateKey:
        raise InvalidRequest({"body": ["has a duplicate key in an object"]}) from None
    except (ValueError, RecursionError):
        raise InvalidRequest({"body": ["is not valid JSON"]}) from None


def _body_stream(request):
    # eventlet decodes a chunked body but does not tell Werkzeug, which
    # then reads it as empty.
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if request.content_length is None and chunked:
        return request.environ["wsgi.input"]
    return request.stream


def _read_at_most(stream, size):
    # A chunked body comes a chunk per read.
    parts, remaining = [], size
    while remaining > 0 and (part := stream.read(min(remaining, 65536))):
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


class _DuplicateKey(Exception):
    pass


def _dumps(value):
    return json.dumps(value, ensure_ascii=False)


def _object_without_duplicates(pairs):
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey()
    return result


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def json_response(body, status=200, headers=None):
    return Response(
        embed(body, _dumps),
        status=status,
        headers=headers,
        content_type="application/json",
    )
