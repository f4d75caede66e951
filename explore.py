"""See what each layer learned: a page with one pad per layer whose image follows the pads as they are dragged, each
update decoded by the model (jitted for one image; no precomputed tables). Standard library and the project only.

    python explore.py                       # http://127.0.0.1:8000/ for out/mnist-vlae (or the pretrained model)
    python explore.py --run out/mnist-hvae  # the HVAE: its pads are the eps of Eq. 15
    python explore.py --bench               # request-to-PNG latency over 200 updates: p50, p95 and the CPU
    python explore.py --screenshot docs/explorer.png      # the page in headless Chromium, a pad dragged

The page is explore.html. A layer's pad moves the first two units of its code (z_l for the VLAE, eps_l for the HVAE),
sliders the others. The server answers GET / (the page), GET /model (the layers, as JSON), POST /decode
({"codes": [[...], ...]}, one list per layer, bottom first -> a PNG), POST /encode ({"index": i}, or {} for a random
test image -> its codes, model.codes: for the VLAE the means of q(z_l|x), Eq. 12-13) and POST /redraw ({"layer": l} ->
a draw from N(0, I) for that layer's code). A bad request gets a 4xx status and one line of text saying why.
"""
from __future__ import annotations
import argparse, base64, http.server, io, json, os, select, shutil, subprocess, sys, tempfile, threading, time
from http import HTTPStatus
from pathlib import Path
import numpy as np
from tinygrad import Device, Tensor, TinyJit, dtypes
from checkpoint import UserError, default_run, load_model
from data import DataError, as_float

LIMIT = 4.0                     # codes are accepted in [-LIMIT, LIMIT], the pads' range (N(0, 1) has 6e-5 beyond)
MAX_BODY = 4096                 # bytes of a request body
PAGE = Path(__file__).parent / "explore.html"


class BadRequest(Exception):
    """A request the server refuses: an HTTP status and one line saying why."""
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def png(image: np.ndarray) -> bytes:
    """(C, H, W) uint8 -> PNG bytes, compressed lightly (a 28 x 28 digit: ~0.1 ms)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class Explorer:
    """The model behind the page, one request at a time (a lock): codes -> PNG through a TinyJit of generate() for one
    image (the VLAE's decoder; the HVAE's Eq. 15), a test image -> its codes through a TinyJit of model.codes."""
    def __init__(self, model, tag: str, test_x: np.ndarray, seed: int = 0):
        self.model, self.tag, self.test_x, self.dims = model, tag, test_x, model.cfg.latent_dims
        self.rng, self.lock = np.random.default_rng(seed), threading.Lock()
        self._decode = TinyJit(lambda *eps: (model.generate(list(eps)) * 255).round().cast(dtypes.uint8).realize())
        self._codes = TinyJit(lambda x: tuple(c.realize() for c in model.codes(x)))
        for _ in range(3):                  # TinyJit: a plain run, the capture, then replays: warm before serving
            self.decode([[0.0] * d for d in self.dims])
            self.encode({"index": 0})

    def info(self) -> dict:
        cfg, L = self.model.cfg, len(self.dims)
        names = [f"{'eps' if cfg.model == 'hvae' else 'z'}_{l}" for l in range(1, L + 1)]
        return {"model": cfg.model, "tag": self.tag, "dims": list(self.dims), "names": names, "limit": LIMIT,
                "image_shape": list(cfg.image_shape), "test_images": len(self.test_x)}

    def decode(self, codes: list) -> bytes:
        with self.lock:                     # (tinygrad is not thread-safe: all of its work happens under the lock)
            image = self._decode(*[Tensor(np.asarray(c, np.float32).reshape(1, -1)) for c in codes]).numpy()[0]
        return png(image)

    def encode(self, request: dict) -> dict:
        """{"index": i} (or {} for a random one) -> the test image's codes, clipped to the pads' range, and it."""
        n, i = len(self.test_x), request.get("index")
        if i is None:
            i = int(self.rng.integers(n))
        if not (is_number(i) and 0 <= i < n and i == int(i)):            # (NaN and infinities fail the range)
            raise BadRequest(400, f"index must be an integer from 0 to {n - 1} (got {json.dumps(i)[:40]})")
        x = as_float(self.test_x[int(i):int(i) + 1])
        with self.lock:
            codes = [c.numpy()[0] for c in self._codes(Tensor(x))]
        image = png((np.clip(x[0], 0, 1) * 255).round().astype(np.uint8))
        return {"index": int(i), "codes": [np.clip(c, -LIMIT, LIMIT).tolist() for c in codes],
                "image": "data:image/png;base64," + base64.b64encode(image).decode()}

    def redraw(self, request: dict) -> dict:
        """{"layer": l} -> {"code": a draw from N(0, I) for layer l, clipped to the pads' range}."""
        layer, L = request.get("layer"), len(self.dims)
        if not (is_number(layer) and 1 <= layer <= L and layer == int(layer)):
            raise BadRequest(400, f"unknown layer {json.dumps(layer)[:40]}: this model has layers 1 (bottom) to {L} "
                                  f"(top)")
        with self.lock:
            draw = self.rng.standard_normal(self.dims[int(layer) - 1])
        return {"layer": int(layer), "code": np.clip(draw, -LIMIT, LIMIT).tolist()}

    def codes(self, request: dict) -> list:
        """The codes of a /decode request, checked: one list per layer of d_l numbers in [-LIMIT, LIMIT]."""
        codes, L = request.get("codes"), len(self.dims)
        if not isinstance(codes, list) or len(codes) != L:
            raise BadRequest(400, f'send {{"codes": [...]}} with one list per layer: this model has {L} layers')
        for layer, (code, d) in enumerate(zip(codes, self.dims), 1):
            if not isinstance(code, list) or len(code) != d:
                raise BadRequest(400, f"layer {layer}: give a list of {d} numbers (its code has {d} units)")
            for v in code:                  # (NaN fails the comparison, and JSON's Infinity, 1e999 too)
                if not (is_number(v) and -LIMIT <= v <= LIMIT):
                    raise BadRequest(400, f"layer {layer}: {json.dumps(v)[:40]} is not a number in "
                                          f"[-{LIMIT:g}, {LIMIT:g}]")
        return codes


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Handler(http.server.BaseHTTPRequestHandler):
    """The routes of the module docstring. Errors, http.server's own included, are one line of text with a 4xx status,
    and close the connection; a body must come with its Content-Length, at most MAX_BODY bytes."""
    protocol_version = "HTTP/1.1"         # keep-alive: a dragged pad sends its updates down one connection
    timeout = 10                          # seconds a request may take to arrive (a body shorter than its length)
    disable_nagle_algorithm = True        # headers and body go out at once: not 40 ms later, after the client's ACK

    def do_GET(self):
        if self.path == "/":
            return self.reply(PAGE.read_bytes(), "text/html; charset=utf-8")
        if self.path == "/model":
            return self.reply(json.dumps(self.server.explorer.info()).encode(), "application/json")
        self.send_error(404, f"no page {self.path[:80]}: GET / or /model; POST /decode, /encode or /redraw")

    def do_POST(self):
        explorer = self.server.explorer
        routes = {"/decode": lambda r: explorer.decode(explorer.codes(r)), "/encode": explorer.encode,
                  "/redraw": explorer.redraw}
        try:
            if self.path not in routes:
                raise BadRequest(404, f"no action {self.path[:80]}: POST /decode, /encode or /redraw")
            result = routes[self.path](self.request_json())
        except BadRequest as e:
            return self.send_error(e.status, str(e))
        if isinstance(result, bytes):
            return self.reply(result, "image/png")
        self.reply(json.dumps(result).encode(), "application/json")

    def request_json(self) -> dict:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise BadRequest(411, "send the body's length as Content-Length, a whole number of bytes")
        if int(length) > MAX_BODY:
            raise BadRequest(413, f"a body of {length} bytes is too large: at most {MAX_BODY}")
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            body = b""
        if len(body) != int(length):
            raise BadRequest(400, f"the body ended after {len(body)} of the {length} bytes of its Content-Length")
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):          # (UnicodeDecodeError is a ValueError)
            raise BadRequest(400, "the body is not JSON") from None
        if not isinstance(request, dict):
            raise BadRequest(400, "send a JSON object, e.g. {\"index\": 0}")
        return request

    def reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """One line of plain text. http.server's own server errors for a client's mistakes become client errors: 501
        for an unknown method is 405, 505 for an HTTP version other than 1.x is 400."""
        code = {HTTPStatus.NOT_IMPLEMENTED: 405, HTTPStatus.HTTP_VERSION_NOT_SUPPORTED: 400}.get(code, code)
        if self.request_version == "HTTP/0.9":      # (a request line it could not parse: still send the status line)
            self.request_version = "HTTP/1.0"
        message = " ".join((message or HTTPStatus(code).phrase).splitlines())
        body = f"{int(code)} {message}\n".encode(errors="replace")
        self.close_connection = True
        self.send_response(code, HTTPStatus(code).phrase)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):           # quiet: a dragged pad sends dozens of requests a second
        pass


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 0) -> http.server.ThreadingHTTPServer:
    """Start serving in a background thread; the server's address is server.server_address."""
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.explorer = explorer
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------------------------------------------------
# Headless Chromium over the DevTools protocol (standard library only): the browser test and --screenshot
# ---------------------------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


class Browser:
    """Headless Chromium with a fresh profile, driven through --remote-debugging-pipe: DevTools protocol messages are
    JSON ending in a NUL byte, read on file descriptor 3 and written on 4 (no WebSocket needed)."""
    def __init__(self, size: tuple = (900, 680), timeout: float = 30):
        binary = find_chromium()
        if binary is None:
            raise UserError("no Chromium found: install it (apt-get install chromium) to take screenshots")
        self.profile, self.timeout, self.id, self.buf = tempfile.TemporaryDirectory(), timeout, 0, b""
        (to_r, self.to_w), (self.from_r, from_w) = os.pipe(), os.pipe()
        cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile.name}", "--remote-debugging-pipe",
               f"--window-size={size[0]},{size[1]}", "about:blank"]
        # Chromium's ends of the pipes come in as stdin and stdout; the shell moves them to descriptors 3 and 4
        self.proc = subprocess.Popen(["/bin/sh", "-c", 'exec "$@" 3<&0 4>&1 </dev/null >/dev/null', "sh", *cmd],
                                     stdin=to_r, stdout=from_w, stderr=subprocess.DEVNULL)
        os.close(to_r), os.close(from_w)
        target = self.send("Target.createTarget", url="about:blank", session=None)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True, session=None)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                  mobile=False)

    def send(self, method: str, session: str | None = "page", **params) -> dict:
        self.id += 1
        message = {"id": self.id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.to_w, json.dumps(message).encode() + b"\0")
        while True:                                  # events arrive in between; only the reply matters here
            reply = self.read()
            if reply.get("id") == self.id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def read(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self.buf:
            if not select.select([self.from_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError(f"Chromium did not answer within {self.timeout} s")
            chunk = os.read(self.from_r, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self.buf += chunk
        message, self.buf = self.buf.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"{expression[:60]}: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never had {expression}")
            time.sleep(0.05)

    def drag(self, selector: str, start: tuple, end: tuple, steps: int = 12) -> None:
        """Press the mouse at `start` in the element (fractions of its width and height), move to `end`, release:
        Chromium turns these into trusted pointerdown / pointermove / pointerup events."""
        box = self.evaluate(f"(r => [r.x, r.y, r.width, r.height])(document.querySelector('{selector}')"
                            f".getBoundingClientRect())")
        at = lambda f: (box[0] + f[0] * box[2], box[1] + f[1] * box[3])
        x, y = at(start)
        self.send("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", buttons=1, clickCount=1)
        for t in np.linspace(0, 1, steps)[1:]:
            x, y = at(np.array(start) + t * (np.array(end) - np.array(start)))
            self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
        self.send("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=y, button="left", buttons=0, clickCount=1)

    def close(self) -> None:
        try:
            self.send("Browser.close", session=None)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_w), os.close(self.from_r)
        self.profile.cleanup()


def image_pixels(browser: Browser) -> list:
    """The decoded image as the page shows it: its RGBA pixels read back through a canvas."""
    return browser.evaluate("""(() => {
        const img = document.getElementById('decoded'), c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d');
        g.drawImage(img, 0, 0);
        return Array.from(g.getImageData(0, 0, c.width, c.height).data); })()""")


def drag_a_pad(browser: Browser, url: str, layer: int) -> tuple[list, list]:
    """Load the page, encode test image 0, drag layer `layer`'s pad across; returns the image's pixels before and after
    the drag (the browser test and --screenshot both run this)."""
    browser.send("Page.navigate", url=url)
    browser.wait_for("document.body && document.body.dataset.ready === '1'")
    browser.evaluate("window.explorer.encode(0)")
    browser.wait_for("window.explorer.idle()")
    before, updates = image_pixels(browser), browser.evaluate("window.explorer.updates")
    browser.drag(f"#pad{layer}", (0.3, 0.7), (0.65, 0.4))                # from (-1.6, 1.6) to (1.2, -0.8)
    browser.wait_for(f"window.explorer.updates > {updates} && window.explorer.idle()")
    return before, image_pixels(browser)


def screenshot(explorer: Explorer, path: Path, layer: int) -> Path:
    server = serve(explorer)
    browser = Browser()
    try:
        drag_a_pad(browser, f"http://127.0.0.1:{server.server_address[1]}/", layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"]))
    finally:
        browser.close()
        server.shutdown()
    return path


# ---------------------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def bench(explorer: Explorer, updates: int = 200, warmup: int = 20) -> dict:
    """Time `updates` POST /decode requests, from sending the request to holding the PNG, over one keep-alive
    connection as a dragged pad sends them: the codes move a small step at a time along a random walk."""
    import http.client
    server = serve(explorer)
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
    rng, codes, times = np.random.default_rng(0), [np.zeros(d) for d in explorer.dims], []
    try:
        for i in range(warmup + updates):
            codes = [np.clip(c + rng.normal(0, 0.1, c.shape), -2, 2) for c in codes]
            body = json.dumps({"codes": [c.tolist() for c in codes]})
            t0 = time.perf_counter()
            connection.request("POST", "/decode", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            image = response.read()
            t = time.perf_counter() - t0
            if response.status != 200 or image[:8] != b"\x89PNG\r\n\x1a\n":
                raise RuntimeError(f"/decode answered {response.status}: {image[:200]!r}")
            if i >= warmup:
                times.append(t * 1000)
    finally:
        connection.close()
        server.shutdown()
    return {"updates": updates, "p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
            "max_ms": float(np.max(times)), "device": Device.DEFAULT, "cpu": cpu_model(), "cores": os.cpu_count()}


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A page to explore each layer's code of a VLAE or HVAE checkpoint.")
    p.add_argument("--run", default=None, help="run folder (or checkpoint file) written by train.py (default "
                   "out/mnist-vlae if it has a checkpoint, else pretrained/mnist-vlae)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to serve on (default %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder holding <dataset>/ (default $VLAE_DATA, then ./data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random test images and redraws (default 0)")
    p.add_argument("--bench", action="store_true", help="time 200 updates (request to PNG) and print p50 / p95")
    p.add_argument("--screenshot", default=None, metavar="PNG",
                   help="load the page in headless Chromium, drag a pad and save a screenshot of it")
    p.add_argument("--screenshot-layer", type=int, default=None, metavar="L",
                   help="with --screenshot: the layer whose pad is dragged (default: the top one)")
    return p.parse_args(argv)


def load_explorer(args) -> Explorer:
    import sample
    model, meta = load_model(default_run(args.run))
    cfg = model.cfg
    tag = f"{cfg.model.upper()} {cfg.size} {'/'.join(map(str, cfg.latent_dims))}, epoch {meta.get('epoch', '?')}"
    return Explorer(model, tag, sample.test_digits(model, meta, args), args.seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    server = None
    try:
        if not args.bench and not args.screenshot:          # first the address, so that a busy port fails at once
            try:
                server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
            except (OSError, OverflowError) as e:
                raise UserError(f"cannot serve on {args.host}:{args.port} ({getattr(e, 'strerror', None) or e}): "
                                f"choose another --host or --port") from None
        explorer = load_explorer(args)
        if args.screenshot_layer is not None and not 1 <= args.screenshot_layer <= len(explorer.dims):
            raise UserError(f"--screenshot-layer {args.screenshot_layer}: this model has layers 1 to "
                            f"{len(explorer.dims)}")
        if args.bench:
            r = bench(explorer)
            print(f"{r['updates']} updates, request to PNG: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, max "
                  f"{r['max_ms']:.1f} ms ({explorer.tag}, device {r['device']}; CPU: {r['cpu']}, {r['cores']} cores)")
            return 0 if r["p95_ms"] <= 100 else 1
        if args.screenshot:
            print(screenshot(explorer, Path(args.screenshot), args.screenshot_layer or len(explorer.dims)))
            return 0
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        if server:
            server.server_close()
        return 2
    server.explorer = explorer
    print(f"{explorer.tag}: open http://{args.host}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
