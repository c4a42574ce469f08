"""Close HTTP connections that do not finish sending their request headers in time.

Upstream: https://github.com/encode/uvicorn/issues/157 (``--timeout-request-start``, open since 2018). Ray
Serve's proxy runs uvicorn (``ray/serve/_private/http_util.py``) and exposes only ``keep_alive_timeout_s``.

What goes wrong: uvicorn arms its keep-alive timer only after a response, and any byte received disarms it.
A client that opens a connection and sends nothing, or half a request line, or headers one byte at a time
(Slowloris), holds that connection and its file descriptor in the proxy forever; a few thousand of them
exhaust it. ASGI middleware cannot help: it runs after the headers are parsed. (The body is ce-ray's own
business: the ingress reads it under ``serve.request_timeout_s``.)

The workaround: :func:`install` wraps uvicorn's two HTTP protocol classes (httptools and h11) so each
connection must complete its request line and headers within ``CE_RAY_HEADER_TIMEOUT_S`` seconds (default
10; ``0`` turns it off), counted from the connection's start and, on a keep-alive connection, from the first
byte of each next request (idle time between requests stays uvicorn's keep-alive timeout). Late connections
are closed, as nginx does after ``client_header_timeout``. It runs in every Ray worker process of the jobs
ce-ray starts (``worker_process_setup_hook``, see :func:`ce_ray.runtime.ensure_ray`), so it reaches the Serve
proxies those jobs start; proxies an earlier job started keep what they had.

Remove when: uvicorn has a request-start timeout and Ray Serve passes one on (``HTTPOptions``); then
``tests/test_serve.py::test_half_sent_requests_are_closed_and_others_are_served`` must still pass with
that setting instead.
"""

from __future__ import annotations

import logging
import os

__all__ = ["DEFAULT_TIMEOUT_S", "ENV", "install"]

logger = logging.getLogger(__name__)

ENV = "CE_RAY_HEADER_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 10.0


def _timeout() -> float:
    try:
        return float(os.environ.get(ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; using %s", ENV, os.environ[ENV], DEFAULT_TIMEOUT_S)
        return DEFAULT_TIMEOUT_S


def _arm(protocol, timeout: float) -> None:
    _disarm(protocol)
    protocol._ce_ray_header_timer = protocol.loop.call_later(timeout, _expired, protocol)


def _disarm(protocol) -> None:
    timer = getattr(protocol, "_ce_ray_header_timer", None)
    if timer is not None:
        timer.cancel()
        protocol._ce_ray_header_timer = None


def _expired(protocol) -> None:
    protocol._ce_ray_header_timer = None
    if getattr(protocol, "_ce_ray_awaiting_headers", False) and not protocol.transport.is_closing():
        logger.info("closing %s: no complete request headers within the header timeout", protocol.client)
        protocol.transport.close()


def _headers_done(protocol) -> None:
    protocol._ce_ray_awaiting_headers = False
    _disarm(protocol)


def _wrap(cls, timeout: float, headers_in_after_data=None) -> None:
    """Wrap ``cls``' connection callbacks (once). The headers are known complete from ``on_headers_complete``
    where the class has that callback (httptools), else from ``headers_in_after_data(protocol)``, asked after
    each ``data_received`` (h11)."""
    if getattr(cls, "_ce_ray_header_timeout", None) is not None:
        return
    connection_made, data_received = cls.connection_made, cls.data_received
    connection_lost, on_response_complete = cls.connection_lost, cls.on_response_complete

    def made(self, transport):
        connection_made(self, transport)
        self._ce_ray_awaiting_headers = True
        _arm(self, timeout)

    def received(self, data):
        if getattr(self, "_ce_ray_awaiting_headers", False) and getattr(self, "_ce_ray_header_timer", None) is None:
            _arm(self, timeout)  # the first bytes of the next request on a kept-alive connection
        data_received(self, data)
        if headers_in_after_data is not None and getattr(self, "_ce_ray_awaiting_headers", False):
            if headers_in_after_data(self):
                _headers_done(self)

    def lost(self, exc):
        _disarm(self)
        connection_lost(self, exc)

    def response_complete(self):
        self._ce_ray_awaiting_headers = True  # timed again from the next request's first byte (see received)
        on_response_complete(self)

    cls.connection_made, cls.data_received, cls.connection_lost = made, received, lost
    cls.on_response_complete = response_complete
    if headers_in_after_data is None:
        on_headers_complete = cls.on_headers_complete

        def headers_complete(self):
            _headers_done(self)
            on_headers_complete(self)

        cls.on_headers_complete = headers_complete
    cls._ce_ray_header_timeout = timeout


def install() -> None:
    """Patch uvicorn's HTTP protocols in this process (a Ray ``worker_process_setup_hook``; safe to call twice,
    and a no-op where uvicorn is not installed)."""
    timeout = _timeout()
    if timeout <= 0:
        return
    try:
        import h11
        from uvicorn.protocols.http import h11_impl
    except ImportError:
        return
    _wrap(h11_impl.H11Protocol, timeout, lambda p: p.conn.their_state is not h11.IDLE)
    try:
        from uvicorn.protocols.http import httptools_impl
    except ImportError:  # httptools is optional: uvicorn then uses h11
        return
    _wrap(httptools_impl.HttpToolsProtocol, timeout)
