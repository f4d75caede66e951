"""Tests of explore.py: its server (decoding, encoding, redrawing; a thousand bad requests, each answered with a 4xx and
one line, then a good one) and its page in headless Chromium (a pad dragged with real pointer events changes the image
to what the model decodes). The models are tiny and untrained, their weights scaled up so that every code shows.

    VLAE_DATA=/path/to/data python -m pytest -q test_explore.py

The browser test needs Chromium (apt-get install -y chromium); it is skipped without it, except in CI
(VLAE_REQUIRE_BROWSER=1, set by .ci/run, which installs it), where it fails.
"""
import os
os.environ.setdefault("NOOPT", "1")   # as test_vlae.py: before tinygrad is imported
os.environ.setdefault("DEV", "CPU")
import base64, http.client, io, json, re, socket
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from tinygrad import Tensor
import checkpoint
import data
import explore
import vlae
from vlae import ModelConfig
import files


def mnist_folder() -> None:
    """Skip where no MNIST copy is found, as test_vlae.py does (fail where $VLAE_DATA names one without it)."""
    if files.missing(files.find_folder(data.data_roots(), "mnist", data.MNIST_FILES), data.MNIST_FILES):
        if os.environ.get("VLAE_DATA"): pytest.fail(f"VLAE_DATA={os.environ['VLAE_DATA']} holds no MNIST files")
        pytest.skip("no MNIST copy found (set VLAE_DATA)")


def need_browser() -> None:
    if explore.find_chromium() is None:
        message = "no Chromium to drive (apt-get install -y chromium)"
        if os.environ.get("VLAE_REQUIRE_BROWSER"): pytest.fail(message)
        pytest.skip(message)


def tiny_run(folder: Path, scale: float = 25, **cfg) -> Path:
    """An untrained tiny checkpoint whose weight matrices are scaled up (25x): at their initial N(0, 0.02) the decoded
    image hardly depends on the codes, and rounded to 8 bits not at all."""
    Tensor.manual_seed(0)
    model = checkpoint.build_model(ModelConfig(size="tiny", **cfg))
    for name, t in vlae.weights(model).items():
        if name.endswith(".weight") and t.ndim >= 2: t.replace(t * scale)
    folder.mkdir(parents=True)
    meta = {"config": model.cfg.to_dict(), "train": {"dataset": "mnist"}, "step": 0, "epoch": 0}
    checkpoint.save_checkpoint(folder / checkpoint.CHECKPOINT, model, None, meta)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A VLAE with a 2-D, a 1-D and a 3-D code (a pad, a slider, a pad and a slider), served on a free port."""
    mnist_folder()
    run = tiny_run(tmp_path_factory.mktemp("explore") / "run", latent_dims=(2, 1, 3), combiner="concat")
    explorer = explore.load_explorer(explore.parse_args(["--run", str(run)]))
    server = explore.serve(explorer)
    yield explorer, server.server_address[1]
    server.shutdown()


def request(port: int, method: str, path: str, body=None) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, None if body is None else json.dumps(body))
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def png_pixels(raw: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im)


def test_server_decodes_encodes_and_redraws(served):
    explorer, port = served
    status, kind, page = request(port, "GET", "/")
    assert status == 200 and kind.startswith("text/html") and b'id="layers"' in page
    info = json.loads(request(port, "GET", "/model")[2])
    assert info["dims"] == [2, 1, 3] and info["names"] == ["z_1", "z_2", "z_3"] and info["limit"] == explore.LIMIT

    # /decode: the PNG is the model's image for these codes, rounded to 8 bits
    codes = [[0.5, -1.0], [2.0], [-3.0, 0.0, 4.0]]
    status, kind, raw = request(port, "POST", "/decode", {"codes": codes})
    want = explorer.model.generate([Tensor(np.array([c], np.float32)) for c in codes]).numpy()[0, 0]
    assert status == 200 and kind == "image/png"
    np.testing.assert_array_equal(png_pixels(raw), (want * 255).round().astype(np.uint8))

    # /encode: test image 3's posterior means (model.codes), and the image itself
    reply = json.loads(request(port, "POST", "/encode", {"index": 3})[2])
    x = data.as_float(explorer.test_x[3:4])
    means = [mu.numpy()[0] for mu, _ in explorer.model.encode(Tensor(x))]
    assert reply["index"] == 3
    assert all(np.allclose(c, np.clip(m, -4, 4), atol=1e-5) for c, m in zip(reply["codes"], means))
    assert png_pixels(base64.b64decode(reply["image"].split(",", 1)[1])).shape == (28, 28)
    assert 0 <= json.loads(request(port, "POST", "/encode", {})[2])["index"] < len(explorer.test_x)    # a random one
    assert len(json.loads(request(port, "POST", "/redraw", {"layer": 3})[2])["code"]) == 3


def test_hvae_pads_are_its_eps(tmp_path):
    """For the HVAE the pads hold the eps of Eq. 15: those of an encoded test image decode to its reconstruction.
    (Its weights as initialised, so that no code lies beyond the pads' range and is clipped.)"""
    mnist_folder()
    run = tiny_run(tmp_path / "h", scale=1, model="hvae")
    explorer = explore.load_explorer(explore.parse_args(["--run", str(run)]))
    server = explore.serve(explorer)
    try:
        port = server.server_address[1]
        assert json.loads(request(port, "GET", "/model")[2])["names"] == ["eps_1", "eps_2", "eps_3"]
        codes = json.loads(request(port, "POST", "/encode", {"index": 0})[2])["codes"]
        x = Tensor(data.as_float(explorer.test_x[:1]))
        means = [mu for mu, _ in explorer.model.encode(x)]
        assert max(abs(v) for c in codes for v in c) < explore.LIMIT                            # (nothing clipped)
        want = (explorer.model.decode(means).numpy()[0, 0] * 255).round()
        got = png_pixels(request(port, "POST", "/decode", {"codes": codes})[2]).astype(float)
        assert np.abs(got - want).max() <= 1                         # float rounding of eps -> z, then 8 bits
    finally:
        server.shutdown()


def bad_requests(n_layers: int, n_test: int) -> list[tuple[bytes, bool]]:
    """(raw HTTP request, whether to close our side after sending it): malformed HTTP, unknown paths and methods,
    missing, wrong and huge lengths, bodies that are not JSON or not an object, and every way a field can be wrong."""
    def post(path: str, body, length=None, extra=b"") -> bytes:
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        length = len(body) if length is None else length
        return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n".encode() + extra + b"\r\n" + body)
    good = [[0.0, 0.0], [0.0], [0.0, 0.0, 0.0]]
    def codes_with(layer: int, value: str) -> bytes:             # JSON text, so that NaN and Infinity go through
        parts = [json.dumps(g) for g in good]
        parts[layer] = "[" + ", ".join([value] + ["0.0"] * (len(good[layer]) - 1)) + "]"
        return ('{"codes": [' + ", ".join(parts) + "]}").encode()
    cases = [
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /model/x HTTP/1.1\r\n\r\n",
        b"GET /../etc/passwd HTTP/1.1\r\n\r\n", b"GET /?a=1 HTTP/1.1\r\n\r\n",
        b"PUT /decode HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"DELETE / HTTP/1.1\r\n\r\n",
        b"FOO / HTTP/1.1\r\n\r\n", b"GET / HTTP/3.0\r\n\r\n", b"\x00\x01\x02 garbage\r\n\r\n", b"GET\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 120 + b"\r\n",
        b"POST /decode HTTP/1.1\r\nHost: x\r\n\r\n", post("/decode", b"{}", "abc"), post("/decode", b"{}", "-1"),
        post("/decode", b"{}", "1e3"), post("/decode", b"", 10 ** 9), post("/decode", b"", explore.MAX_BODY + 1),
        post("/nowhere", {"codes": good}), post("/decode", b"{"), post("/decode", b"nan"), post("/decode", b"\xff\xfe"),
        post("/decode", b"[" * 3000), post("/decode", b""), post("/decode", [1, 2]), post("/decode", "codes"),
        post("/decode", 3), post("/decode", {}), post("/decode", {"codes": None}), post("/decode", {"codes": good[:2]}),
        post("/decode", {"codes": good + [[0.0]]}), post("/decode", {"codes": [[0.0], [0.0], [0.0, 0.0, 0.0]]}),
        post("/decode", {"codes": [[0.0, 0.0], 0.0, [0.0, 0.0, 0.0]]}), post("/decode", {"codes": {"1": [0, 0]}}),
        post("/encode", {"index": -1}), post("/encode", {"index": n_test}), post("/encode", {"index": 1.5}),
        post("/encode", {"index": "3"}), post("/encode", {"index": True}), post("/encode", b'{"index": NaN}'),
        post("/encode", b'{"index": Infinity}'), post("/encode", {"index": 10 ** 400}), post("/encode", [0]),
        post("/redraw", {"layer": 0}), post("/redraw", {"layer": n_layers + 1}), post("/redraw", {"layer": "top"}),
        post("/redraw", {"layer": 1.5}), post("/redraw", {}), post("/redraw", b'{"layer": NaN}'),
        post("/redraw", {"layer": [1]}), post("/redraw", {"layer": None}),
    ]
    for layer in range(n_layers):
        for value in ("NaN", "Infinity", "-Infinity", "1e999", "4.0001", "-5", "1" + "0" * 400, '"1"', "true", "null",
                      "[0.5]", "{}"):
            cases.append(post("/decode", codes_with(layer, value)))
    cases = [(c, False) for c in cases]
    cases += [(post("/decode", b'{"codes": [[0, 0]', length=40), True), (post("/encode", b"{}", length=100), True)]
    rng = np.random.default_rng(0)                                   # then out-of-range values until there are 1000+
    while len(cases) < 1000:
        layer = int(rng.integers(n_layers))
        value = float(rng.choice([-1, 1]) * rng.uniform(explore.LIMIT * 1.0001, 1e6))
        cases.append((post("/decode", codes_with(layer, repr(value))), False))
    return cases


def send_raw(port: int, raw: bytes, half_close: bool) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(raw)
            if half_close: s.shutdown(socket.SHUT_WR)               # our body ends short of its Content-Length
        except (BrokenPipeError, ConnectionResetError):               # (the server answered before reading it all)
            pass
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        return reply


def test_bad_requests_get_one_line_and_the_server_keeps_serving(served, monkeypatch):
    explorer, port = served
    cases = bad_requests(len(explorer.dims), len(explorer.test_x))
    assert len(cases) >= 1000
    for raw, half_close in cases:
        reply = send_raw(port, raw, half_close)
        head, _, body = reply.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        assert 400 <= status < 500, (raw[:120], reply[:300])
        assert b"Content-Type: text/plain" in head and body.endswith(b"\n") and body.count(b"\n") == 1, reply[:300]
        assert re.match(rb"\d{3} \S", body), body
    # a body that stops short while the connection stays open: answered when Handler.timeout runs out
    monkeypatch.setattr(explore.Handler, "timeout", 0.5)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /decode HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"codes\"")
        assert s.recv(65536).startswith(b"HTTP/1.1 400 ")
    # ... and then a good request, on a keep-alive connection: the same image as before
    status, kind, raw = request(port, "POST", "/decode", {"codes": [[0.5, -1.0], [2.0], [-3.0, 0.0, 4.0]]})
    assert status == 200 and kind == "image/png" and png_pixels(raw).shape == (28, 28)


def test_page_drag_in_headless_chromium(served, tmp_path):
    """The page in Chromium: test image 0 encoded, layer 1's pad dragged with real pointer events; the image the page
    shows changes, and is the server's decode of the codes the page then holds. The --screenshot path does the same."""
    need_browser()
    explorer, port = served
    browser = explore.Browser()
    try:
        before, after = explore.drag_a_pad(browser, f"http://127.0.0.1:{port}/", 1)
        assert len(before) == len(after) == 28 * 28 * 4 and before != after
        codes, encoded = browser.evaluate("window.explorer.codes"), encoded_codes(port, 0)
        assert np.allclose(codes[0], [1.2, -0.8], atol=0.1) and codes[1:] == encoded[1:]   # where the pad was let go
        served_image = png_pixels(request(port, "POST", "/decode", {"codes": codes})[2])
        np.testing.assert_array_equal(np.array(after).reshape(28, 28, 4)[..., 0], served_image)
        # a pad for each code of 2 or more units, a slider for each unit beyond the second
        count = "[1, 2, 3].map(l => document.querySelectorAll(`#layer${l} %s`).length)"
        assert browser.evaluate(count % "canvas") == [1, 0, 1] and browser.evaluate(count % "input") == [0, 1, 1]
        # a click on layer 3's redraw button draws its code afresh
        updates = browser.evaluate("window.explorer.updates")
        browser.drag("#layer3 button", (0.5, 0.5), (0.5, 0.5), steps=1)
        browser.wait_for(f"window.explorer.updates > {updates} && window.explorer.idle()")
        assert browser.evaluate("window.explorer.codes")[2] != codes[2]
    finally:
        browser.close()
    shot = explore.screenshot(explorer, tmp_path / "explorer.png", 3)        # what --screenshot runs
    with Image.open(shot) as im: assert im.format == "PNG" and im.size == (900, 680)


def encoded_codes(port: int, index: int) -> list:
    return json.loads(request(port, "POST", "/encode", {"index": index})[2])["codes"]


def test_bench_times_the_requests(served):
    r = explore.bench(served[0], updates=5, warmup=1)
    assert r["updates"] == 5 and 0 < r["p50_ms"] <= r["p95_ms"] <= r["max_ms"] and r["cpu"]


def test_explore_errors_are_one_line(tmp_path, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cases = [(["--run", str(tmp_path / "none")], r"^error: no checkpoint in .*none: train one first"),
                 (["--port", "70000"], r"^error: cannot serve on 127.0.0.1:70000 .*choose another --host or --port"),
                 (["--port", str(busy.getsockname()[1])], r"^error: cannot serve on .*Address already in use")]
        for argv, pattern in cases:
            assert explore.main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and re.search(pattern, err[0]), err
    finally:
        busy.close()
