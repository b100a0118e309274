"""A Google Cloud Storage emulator for the tests, reached by TensorFlow, tensorstore and gcloud.

The store is `gcp-storage-emulator` (a Python implementation of the GCS JSON API, from PyPI) on a
free loopback port, behind a small forwarding layer (`_Forward`) that papers over two gaps of the
emulator: empty objects (TF's directory markers) and the bucket `storageLayout` call. How each
client is pointed at it:

- tensorstore's `gcs` kvstore (t5x's array writer):
  `TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:<port>` and `GOOGLE_AUTH_TOKEN_FOR_TESTING` (a fixed
  bearer token instead of Google credentials).
- gcloud (t5x finalises a checkpoint on `gs://` with `gcloud storage mv`):
  `CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE=http://127.0.0.1:<port>/`,
  `CLOUDSDK_AUTH_DISABLE_CREDENTIALS=true` and a throw-away `CLOUDSDK_CONFIG`.
- TensorFlow's GCS filesystem (`tf.io.gfile` on `gs://`, used by t5x for checkpoint directories and
  by flip.paths): its endpoints are compiled in (`https://www.googleapis.com/storage/v1/`, no
  setting overrides them), but its libcurl honours `HTTPS_PROXY` and `CURL_CA_BUNDLE`. So this
  module also runs a loopback proxy that accepts `CONNECT` to TF's two storage hosts, terminates
  TLS with a certificate for those names signed by a throw-away CA made here (`openssl`), and
  forwards each request to the emulator. `NO_GCE_CHECK=true` and `GOOGLE_AUTH_TOKEN_FOR_TESTING` keep TF's
  auth away from the metadata server. Nothing leaves the machine.

Run as `python tests/gcs_emulator.py <dir>`: prints one JSON line with the ports, then serves
until killed; `start(dir)` does that in a child process and returns the clients' environment.
"""

import http.client
import http.server
import json
import os
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import threading

TF_STORAGE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
TEST_TOKEN = "emulator-test-token"
# TF asks for a bucket's storage layout (hierarchical namespace or not) before a rename; the
# emulator does not implement that call, so the proxy answers it for the buckets that exist.
STORAGE_LAYOUT = re.compile(r"^/storage/v1/b/([^/?]+)/storageLayout(?:\?.*)?$")


def environment(api_port: int, proxy_port: int, ca_file: str, gcloud_config: str) -> dict:
  """The environment variables that point TensorFlow, tensorstore and gcloud at the emulator."""
  proxy = f"http://127.0.0.1:{proxy_port}"
  return {
      "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{api_port}",
      "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": f"http://127.0.0.1:{api_port}/",
      "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
      "CLOUDSDK_CORE_PROJECT": "flip-test",
      "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
      "CLOUDSDK_CONFIG": gcloud_config,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": TEST_TOKEN,
      "NO_GCE_CHECK": "true",
      "HTTPS_PROXY": proxy, "https_proxy": proxy,
      "CURL_CA_BUNDLE": ca_file,
      "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
  }


def make_certificate(directory: str):
  """A CA and a certificate for TF_STORAGE_HOSTS signed by it -> (ca file, cert file, key file)."""
  ca_key, ca_crt = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.crt")
  key, csr, crt = (os.path.join(directory, f"server.{ext}") for ext in ("key", "csr", "crt"))
  ext_file = os.path.join(directory, "server.ext")
  with open(ext_file, "w") as f:
    f.write("subjectAltName=" + ",".join(f"DNS:{host}" for host in TF_STORAGE_HOSTS) + "\n")
  commands = [
      ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_crt,
       "-days", "2", "-subj", "/CN=flip-test-ca"],
      ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
       "-subj", f"/CN={TF_STORAGE_HOSTS[0]}"],
      ["x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-out", crt,
       "-days", "2", "-extfile", ext_file],
  ]
  for args in commands:
    subprocess.run(["openssl", *args], check=True, capture_output=True)
  return ca_crt, crt, key


def _empty_object_as_multipart(path: str, headers: dict):
  """An empty media upload (TF's directory markers) as the equivalent multipart upload: the
  emulator stores empty objects only through the latter."""
  sep = "emulator-boundary"
  body = (f"--{sep}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n"
          f"--{sep}\r\nContent-Type: application/octet-stream\r\n\r\n\r\n--{sep}--\r\n").encode()
  headers = {k: v for k, v in headers.items()
             if k.lower() not in ("content-type", "content-length")}
  headers["Content-Type"] = f"multipart/related; boundary={sep}"
  return path.replace("uploadType=media", "uploadType=multipart"), body, headers


class _Forward(http.server.BaseHTTPRequestHandler):
  """One decrypted HTTP request from TF -> the emulator, and its answer back."""
  protocol_version = "HTTP/1.1"
  disable_nagle_algorithm = True  # headers and body go in separate writes: no 40 ms ACK stalls
  upstream_port = 0
  behind_tls = False  # True when TF reached it through the CONNECT tunnel (https URLs)

  def _body(self):
    """The request body; a chunked transfer encoding wins over Content-Length (TF sends both)."""
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      body = b""
      while True:
        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
          while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
          return body
        body += self.rfile.read(size)
        self.rfile.readline()
    length = int(self.headers.get("Content-Length") or 0)
    return self.rfile.read(length) if length else None

  def _upstream(self, method, path, body, headers):
    upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=120)
    upstream.request(method, path, body=body, headers=headers)
    answer = upstream.getresponse()
    data = answer.read()
    upstream.close()
    return answer.status, answer.reason, answer.getheaders(), data

  def _forward(self):
    body = self._body()
    headers = {k: v for k, v in self.headers.items()
               if k.lower() not in ("connection", "proxy-connection", "transfer-encoding")}
    path = self.path
    if self.command == "POST" and "uploadType=media" in path and not body:
      path, body, headers = _empty_object_as_multipart(path, headers)
    layout = STORAGE_LAYOUT.match(path)
    status, reason, answer_headers, data = self._upstream(
        "GET" if layout else self.command, f"/storage/v1/b/{layout.group(1)}" if layout else path,
        body, headers)
    if layout and status == 200:  # a flat bucket, as every emulated one is
      data = json.dumps({"kind": "storage#storageLayout", "bucket": layout.group(1),
                         "hierarchicalNamespace": {"enabled": False}}).encode()
    self.send_response(status, reason)
    for key, value in answer_headers:
      if key.lower() in ("content-length", "connection", "transfer-encoding", "server", "date"):
        continue
      if key.lower() == "location" and self.behind_tls:
        value = value.replace("http://", "https://", 1)
      self.send_header(key, value)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(data)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    print(f"{self.command} {self.path} -> " + format % args, file=sys.stderr, flush=True)


class _Api(http.server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 256


class _Proxy(socketserver.ThreadingTCPServer):
  daemon_threads = True
  request_queue_size = 256
  allow_reuse_address = True


def _proxy_handler(tls: ssl.SSLContext, upstream_port: int):

  class Handler(socketserver.BaseRequestHandler):

    def handle(self):
      head = b""
      while b"\r\n\r\n" not in head:
        chunk = self.request.recv(4096)
        if not chunk:
          return
        head += chunk
      line = head.split(b"\r\n", 1)[0].decode()
      if line.split(" ")[:2] not in (["CONNECT", f"{host}:443"] for host in TF_STORAGE_HOSTS):
        self.request.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        return
      self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      conn = tls.wrap_socket(self.request, server_side=True)
      forward = type("Forward", (_Forward,), {"upstream_port": upstream_port, "behind_tls": True})
      try:
        forward(conn, self.client_address, self.server)
      except (ConnectionError, ssl.SSLError, OSError) as err:
        print(f"proxy connection ended: {err!r}", file=sys.stderr, flush=True)

  return Handler


def serve(directory: str):
  """Starts the emulator and the proxy on free loopback ports; prints their ports; blocks."""
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  # Its handler writes the headers and the body separately too; without TCP_NODELAY every answer
  # waits for the client's delayed ACK (40 ms), which makes a checkpoint save take minutes.
  server.RequestHandler.disable_nagle_algorithm = True
  # It serves one request at a time; tensorstore sends dozens at once, which overflow the default
  # listen backlog of 5 (connections reset, retried after back-off).
  http.server.HTTPServer.request_queue_size = 256
  ca_file, crt, key = make_certificate(directory)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    emulator_port = s.getsockname()[1]
  emulator = server.create_server("127.0.0.1", emulator_port, in_memory=True)
  emulator.start()
  tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  tls.load_cert_chain(crt, key)
  proxy = _Proxy(("127.0.0.1", 0), _proxy_handler(tls, emulator_port))
  api = _Api(("127.0.0.1", 0), type("Forward", (_Forward,), {"upstream_port": emulator_port}))
  threading.Thread(target=api.serve_forever, daemon=True).start()
  print(json.dumps({"api_port": api.server_address[1], "proxy_port": proxy.server_address[1],
                    "ca_file": ca_file}), flush=True)
  proxy.serve_forever()


def start(directory: str):
  """Runs `serve` in a child process -> (process, client environment)."""
  log = os.path.join(directory, "emulator.log")
  with open(log, "w") as stderr:
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), directory],
                               stdout=subprocess.PIPE, stderr=stderr, text=True)
  line = process.stdout.readline()
  if not line:
    process.kill()
    with open(log) as f:
      raise RuntimeError(f"GCS emulator did not start: {f.read()[-2000:]}")
  ports = json.loads(line)
  return process, environment(ports["api_port"], ports["proxy_port"], ports["ca_file"],
                              os.path.join(directory, "gcloud"))


def create_bucket(env: dict, bucket: str):
  """Creates `bucket` on the emulator (the JSON API's buckets.insert)."""
  port = int(env["TENSORSTORE_GCS_HTTP_URL"].rsplit(":", 1)[1])
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  conn.request("POST", "/storage/v1/b?project=test", body=json.dumps({"name": bucket}),
               headers={"Content-Type": "application/json"})
  answer = conn.getresponse()
  answer.read()
  conn.close()
  if answer.status != 200:
    raise RuntimeError(f"creating bucket {bucket} on the emulator: HTTP {answer.status}")


if __name__ == "__main__":
  serve(sys.argv[1])
