#!/usr/bin/env python3
"""A registry front end for msb pull's tests that authenticates the way Docker Hub does.

Requests under /v2/ without the token this proxy issued get 401 with
  WWW-Authenticate: Bearer realm="http://HOST:PORT/token",service="msb-test",scope="..."
/token hands out a token (as "token", or only as "access_token" with --access-token-only),
requiring basic credentials when --basic USER:PASSWORD is given. Authorized requests are
forwarded to --registry. With --redirect-blobs, blob GETs answer 307 to /storage/..., served
without auth, like the presigned object storage URLs that Docker Hub redirects to. With
--corrupt-blob DIGEST, that blob is served with its first byte changed.

With --forward-proxy it is instead a plain HTTP forward proxy, as http_proxy names one: it
forwards absolute-form requests ("GET http://HOST:PORT/v2/... HTTP/1.1") to HOST:PORT and
answers CONNECT (what https_proxy gets) with 502, so that a test can see which requests came
through it (--log) without a TLS server behind it.

Python 3 standard library only. Usage:
  registry_token_proxy.py --port PORT --registry http://127.0.0.1:RPORT [options]
  registry_token_proxy.py --port PORT --forward-proxy --log FILE
"""

import argparse
import base64
import http.client
import http.server
import json
import secrets
import sys
import threading
import urllib.parse

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authenticate", "proxy-authorization"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--registry", help="http://HOST:PORT of the registry")
    parser.add_argument("--forward-proxy", action="store_true",
                        help="be a forward proxy (http_proxy) instead of a registry front end")
    parser.add_argument("--basic", help="USER:PASSWORD that /token requires")
    parser.add_argument("--access-token-only", action="store_true")
    parser.add_argument("--redirect-blobs", action="store_true")
    parser.add_argument("--corrupt-blob", help="sha256:... to serve with one byte changed")
    parser.add_argument("--log", help="append one line per request to this file")
    args = parser.parse_args()
    if not args.forward_proxy and not args.registry:
        parser.error("--registry is required (unless --forward-proxy)")

    upstream = urllib.parse.urlsplit(args.registry or "")
    tokens = set()
    lock = threading.Lock()

    def log_request(command, path, headers):
        if args.log:
            with lock, open(args.log, "a") as f:
                f.write("%s %s %s\n" % (command, path,
                                        "auth" if headers.get("Authorization") else "-"))

    class Replying(http.server.BaseHTTPRequestHandler):
        def reply(self, status, body=b"", headers=()):
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    class ForwardProxy(Replying):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            pass  # each request is logged as it arrives

        def do_CONNECT(self):
            log_request(self.command, self.path, self.headers)
            self.close_connection = True
            self.reply(502, b"this test proxy does not tunnel\n")

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            log_request(self.command, self.path, self.headers)
            url = urllib.parse.urlsplit(self.path)
            if url.scheme != "http" or not url.hostname:
                return self.reply(400, b"not an absolute http:// URL\n")
            path = url.path + ("?" + url.query if url.query else "")
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in HOP_BY_HOP and not k.lower().startswith("proxy-")}
            conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=60)
            try:
                conn.request(self.command, path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except OSError as e:
                return self.reply(502, ("cannot reach %s: %s\n" % (url.netloc, e)).encode())
            finally:
                conn.close()
            out = [(k, v) for k, v in resp.getheaders()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
            self.reply(resp.status, body, out)

    class Handler(Replying):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            if args.log:
                with lock, open(args.log, "a") as f:
                    f.write("%s %s %s\n" % (self.command, self.path,
                                            "auth" if self.headers.get("Authorization") else "-"))

        def error(self, status, code, message, headers=()):
            body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
            self.reply(status, body, [("Content-Type", "application/json")] + list(headers))

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/token":
                return self.token(urllib.parse.parse_qs(url.query))
            if url.path.startswith("/storage/"):
                # The redirect target: no auth, like a presigned URL.
                return self.forward("/v2/" + url.path[len("/storage/"):])
            if not url.path.startswith("/v2/"):
                return self.error(404, "NOT_FOUND", "not a registry path")
            auth = self.headers.get("Authorization", "")
            if not (auth.startswith("Bearer ") and auth[7:] in tokens):
                scope = ""
                parts = url.path.split("/")
                if len(parts) > 4 and parts[-2] in ("manifests", "blobs"):
                    scope = ',scope="repository:%s:pull"' % "/".join(parts[2:-2])
                challenge = 'Bearer realm="http://%s:%d/token",service="msb-test"%s' % (
                    args.host, args.port, scope)
                return self.error(401, "UNAUTHORIZED", "authentication required",
                                  [("WWW-Authenticate", challenge)])
            parts = url.path.split("/")
            if args.redirect_blobs and len(parts) > 4 and parts[-2] == "blobs":
                location = "http://%s:%d/storage/%s" % (args.host, args.port, url.path[4:])
                return self.reply(307, b"", [("Location", location)])
            self.forward(self.path)

        def token(self, query):
            if query.get("service") != ["msb-test"]:
                return self.reply(400, b"wrong service\n")
            scope = query.get("scope", [""])[0]
            if not (scope.startswith("repository:") and scope.endswith(":pull")):
                return self.reply(400, b"wrong scope\n")
            if args.basic:
                expected = "Basic " + base64.b64encode(args.basic.encode()).decode()
                if self.headers.get("Authorization") != expected:
                    return self.reply(401, b'{"details":"incorrect username or password"}\n',
                                      [("Content-Type", "application/json")])
            token = secrets.token_hex(16)
            with lock:
                tokens.add(token)
            doc = {"access_token": token, "expires_in": 300}
            if not args.access_token_only:
                doc["token"] = token
            self.reply(200, json.dumps(doc).encode(), [("Content-Type", "application/json")])

        def forward(self, path):
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in HOP_BY_HOP and k.lower() not in ("host",
                                                                           "authorization")}
            conn.request(self.command, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            if (args.corrupt_blob and path.endswith("/blobs/" + args.corrupt_blob)
                    and resp.status == 200 and body):
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            out = []
            for k, v in resp.getheaders():
                if k.lower() in HOP_BY_HOP or k.lower() == "content-length":
                    continue
                if k.lower() == "location" and v.startswith(args.registry):
                    v = "http://%s:%d%s" % (args.host, args.port, v[len(args.registry):])
                out.append((k, v))
            self.reply(resp.status, body, out)

    handler = ForwardProxy if args.forward_proxy else Handler
    server = http.server.ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    print("listening on %s:%d" % (args.host, args.port), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
