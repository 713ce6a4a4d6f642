"""The master's live web dashboard (``remsh master --http [HOST:]PORT``).

- :mod:`remsh.web.options`: the ``--http``, ``--http-tls`` and
  ``--http-insecure`` options, the ``remsh web`` command and the
  ``STATE_DIR/web-url`` file (standard library only: a master without the
  ``remsh[web]`` extra still parses them and says what is missing);
- :mod:`remsh.web.server`: the HTTP server (uvicorn) on a thread of its own
  with its own event loop, inside the master process;
- :mod:`remsh.web.app`: the Starlette application: its security (token,
  cookie, CSRF, headers), its pages and its JSON API;
- :mod:`remsh.web.live`: the live updates (Server-Sent Events), computed
  only while a page is open;
- ``static/`` and ``pages/``: the front end, a few files shipped in the
  package (no build step, no network).

Rejected: a WebSocket (one-way updates are what the pages need, and SSE is
plain HTTP with the browser's own reconnection) and a hand-written HTTP
server (no HTTP parsing of our own).
"""
