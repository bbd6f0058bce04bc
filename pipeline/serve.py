"""`itr serve CONFIG [--port 8765]`: a search page for the collection on http://127.0.0.1:PORT (loopback only).

A query box (text -> images of the split), a grid of hits with their thumbnails (read from the shards), scores
and captions; clicking a hit lists the captions that match that image (image -> captions); the header links to
the MLflow runs of the model (train and eval). Standard library only (`http.server`), one `Searcher` shared by the
request threads behind a lock.

    GET /?q=TEXT&k=10          the page, with the hits of TEXT
    GET /?image=KEY&k=10       the page, with the captions that match image KEY
    GET /thumb/KEY.jpg         the sample's JPEG from its shard
    GET /api/search?q=TEXT&k=  the hits as JSON (also ?image=KEY)
"""
from __future__ import annotations

import argparse
import html
import json
import sys
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlparse

HOST = "127.0.0.1"  # never another interface: the page has no authentication
MAX_K = 100

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
header { display: flex; gap: 1em; align-items: baseline; flex-wrap: wrap; }
form { margin: 1em 0; }
input[name=q] { width: 32em; font-size: 1.1em; padding: .3em; }
.hits { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 1em; }
.hit { border: 1px solid #ddd; border-radius: 6px; padding: .6em; }
.hit img { width: 128px; height: 128px; image-rendering: pixelated; display: block; margin-bottom: .4em; }
.score { font-family: monospace; color: #555; }
.muted { color: #777; font-size: .9em; overflow-wrap: anywhere; }
ul { margin: .3em 0; padding-left: 1.2em; font-size: .9em; }
"""


class SearchApp:
    """What the handler serves: a `Searcher` (thread-safe behind `lock`) and the MLflow links of its model."""

    def __init__(self, searcher, tracking_uri: str):
        from pipeline.tracking.lineage import run_url

        self.searcher, self.lock = searcher, threading.Lock()
        loc = searcher.located
        self.links = {"train run": run_url(tracking_uri, loc.experiment_id, loc.trained.run_id)}
        if loc.run_id != loc.trained.run_id:
            self.links["eval run"] = run_url(tracking_uri, loc.experiment_id, loc.run_id)

    def hits(self, query: dict) -> tuple[str, list]:
        """Returns ("text" | "image", hits) for the query parameters (q or image, k)."""
        k = max(1, min(MAX_K, int((query.get("k") or ["10"])[0] or 10)))
        with self.lock:
            if query.get("image"):
                return "image", self.searcher.search_image(query["image"][0], k)
            if query.get("q") and query["q"][0].strip():
                return "text", self.searcher.search_text(query["q"][0].strip(), k)
        return "none", []

    def page(self, query: dict) -> str:
        """Returns the HTML page for the query parameters."""
        kind, hits = self.hits(query)
        q = html.escape((query.get("q") or [""])[0], quote=True)
        links = " · ".join(f'<a class="mlflow" href="{html.escape(u, quote=True)}">{html.escape(n)}</a>'
                           for n, u in self.links.items())
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>itr search</title><style>{STYLE}</style>"
                 "</head><body>",
                 f"<header><h1>itr search</h1><span class='muted'>{html.escape(self.searcher.describe())}</span>"
                 f"<span>MLflow: {links}</span></header>",
                 f"<form action='/' method='get'><input name='q' id='q' value='{q}' placeholder='a red circle left "
                 "of a blue square' autofocus> <input name='k' type='number' min='1' max='100' value='"
                 f"{html.escape((query.get('k') or ['10'])[0], quote=True)}' style='width:4em'> "
                 "<button type='submit' id='go'>Search</button></form>"]
        if kind == "image":
            key = query["image"][0]
            parts.append(f"<p>Captions that match <img src='/thumb/{quote(key)}.jpg' alt='{html.escape(key)}' "
                         f"style='width:64px;height:64px;image-rendering:pixelated;vertical-align:middle'> "
                         f"<code>{html.escape(key)}</code>:</p><ol id='captions'>")
            parts += [f"<li><span class='score'>{h.score:.4f}</span> {html.escape(h.captions[0])} "
                      f"<a class='muted' href='/?image={quote(h.key)}'>({html.escape(h.key)})</a></li>" for h in hits]
            parts.append("</ol>")
        elif kind == "text":
            parts.append(f"<p class='muted'>{len(hits)} images for <b>{q}</b></p><div class='hits' id='hits'>")
            for h in hits:
                captions = "".join(f"<li>{html.escape(c)}</li>" for c in h.captions)
                parts.append(f"<div class='hit'><a href='/?image={quote(h.key)}'><img class='thumb' "
                             f"src='/thumb/{quote(h.key)}.jpg' alt='{html.escape(h.key)}'></a>"
                             f"<b>#{h.rank}</b> <span class='score'>{h.score:.4f}</span> "
                             f"<code>{html.escape(h.key)}</code><ul>{captions}</ul>"
                             f"<div class='muted'>{html.escape(h.shard or '')}</div></div>")
            parts.append("</div>")
        parts.append("</body></html>")
        return "".join(parts)


def make_handler(app: SearchApp) -> type[BaseHTTPRequestHandler]:
    """Returns the request handler class serving `app`."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002  quiet: one line per request is noise here
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store" if content_type.startswith("text") else "max-age=3600")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            url = urlparse(self.path)
            query = parse_qs(url.query)
            try:
                if url.path == "/":
                    self._send(200, app.page(query).encode(), "text/html; charset=utf-8")
                elif url.path.startswith("/thumb/") and url.path.endswith(".jpg"):
                    with app.lock:
                        data = app.searcher.thumbnail(unquote(url.path[len("/thumb/"):-len(".jpg")]))
                    if data is None:
                        self._send(404, b"no such image", "text/plain")
                    else:
                        self._send(200, data, "image/jpeg")
                elif url.path == "/api/search":
                    kind, hits = app.hits(query)
                    body = json.dumps({"kind": kind, "hits": [asdict(h) for h in hits]})
                    self._send(200, body.encode(), "application/json")
                elif url.path == "/healthz":
                    self._send(200, b"ok", "text/plain")
                else:
                    self._send(404, b"not found", "text/plain")
            except (ValueError, KeyError, FileNotFoundError) as err:
                self._send(400, f"bad request: {err}".encode(), "text/plain")

    return Handler


def make_server(app: SearchApp, port: int = 0) -> ThreadingHTTPServer:
    """Returns the HTTP server of `app` bound to 127.0.0.1:`port` (0: a free port; see `server_address`)."""
    server = ThreadingHTTPServer((HOST, port), make_handler(app))
    server.daemon_threads = True
    return server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `itr serve`'s arguments."""
    parser.add_argument("config", help="experiment YAML (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0: any free one)")
    parser.add_argument("--split", help="the split to search (default: eval.split)")
    parser.add_argument("--frozen", action="store_true", help="the extractor's own embeddings, not the trained method")
    parser.add_argument("--run", help="the eval or train run whose model to use (default: the latest of this config)")


def main(args: argparse.Namespace) -> int:
    """`itr serve`: serves until interrupted; returns the exit status."""
    from pipeline.config import load_config
    from pipeline.search import Searcher

    cfg = load_config(args.config, args.overrides)
    searcher = Searcher(cfg, args.split, frozen=args.frozen, run_id=args.run)
    server = make_server(SearchApp(searcher, cfg.tracking_uri), args.port)
    host, port = server.server_address[:2]
    print(f"{searcher.describe()}\nserving on http://{host}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
