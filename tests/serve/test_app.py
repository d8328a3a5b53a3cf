"""The HTTP API with FastAPI's test client: each endpoint, each bad input, the face endpoints against a FaceService."""
from __future__ import annotations

import asyncio
import io
import struct
import zlib

import httpx
import pytest
import torch
import torch.nn.functional as F

from danlu.data.decode import BadImage, decode_image
from danlu.errors import DanluError
from danlu.predict import predict
from danlu.serve import FaceService, create_app
from danlu.serve.app import is_loopback


@pytest.fixture(scope="module")
def client(tiny_run, test_client_cls):
    with test_client_cls(create_app(tiny_run, device="cpu", max_wait_ms=1)) as c:
        yield c


def _file(name: str, data: bytes, ctype: str = "image/png"):
    return ("file", (name, data, ctype))


def test_health_and_model(client, tiny_run):
    assert client.get("/healthz").json() == {"status": "ok"}
    m = client.get("/v1/model").json()
    assert m["model"] == "lenet" and m["classes"] == [f"class_{i}" for i in range(10)]
    assert m["input_shape"] == [1, 28, 28]
    assert m["device"].startswith("cpu") and m["precision"] == "fp32" and m["face"] is False
    assert m["recipe"]["data"] == "synthetic" and m["recipe"]["iterations"] == 5
    assert m["limits"]["max_batch"] == 64 and m["limits"]["max_upload_mb"] == 10


def test_page_and_its_assets_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/static/app.js"' in page.text and 'href="/static/style.css"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        r = client.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"] and "http" not in r.text
    assert client.get("/openapi.json").json()["paths"]["/v1/classify"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["required"] == ["file"]


def test_classify_answers_what_predict_answers(client, tiny_run, make_png, tmp_path):
    images = [make_png(i) for i in range(3)]
    r = client.post("/v1/classify?top=3", files=[_file(f"{i}.png", b) for i, b in enumerate(images)])
    assert r.status_code == 200, r.text
    got = r.json()
    for i, b in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(b)
    want = predict(tiny_run, [tmp_path / f"{i}.png" for i in range(3)], top=3, device="cpu").predictions
    assert [g["file"] for g in got["images"]] == ["0.png", "1.png", "2.png"]  # in the order uploaded
    for g, p in zip(got["images"], want):
        assert [t["class"] for t in g["top"]] == [c for c, _ in p.top]
        assert [t["prob"] for t in g["top"]] == pytest.approx([q for _, q in p.top], abs=1e-5)
    t = got["timings_ms"]
    assert set(t) == {"decode", "queue", "model", "total"} and t["model"] > 0 and t["total"] >= t["model"]
    assert got["batch_images"] == 3


def test_top_k_is_capped_by_the_classes_and_validated(client, make_png):
    assert len(client.post("/v1/classify?top=50", files=[_file("a.png", make_png())]).json()["images"][0]["top"]) == 10
    r = client.post("/v1/classify?top=0", files=[_file("a.png", make_png())])
    assert r.status_code == 422 and "top" in r.json()["error"]


def _png_claiming(width: int, height: int, make_png) -> bytes:
    """A small PNG whose header says width x height (its IHDR rewritten, CRC fixed): a decompression bomb's look."""
    data = bytearray(make_png(0, (8, 8)))
    struct.pack_into(">II", data, 16, width, height)  # signature (8) + length (4) + b"IHDR" (4), then w, h
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # CRC over type + 13 data bytes
    return bytes(data)


BAD = [  # (what, files or other request arguments, status, words in the error)
    ("not an image", {"files": [_file("notes.bin", b"hello, I am text", "application/octet-stream")]}, 400,
     ["'notes.bin'", "not a readable image"]),
    ("zero bytes", {"files": [_file("empty.png", b"")]}, 400, ["'empty.png'", "0 bytes"]),
    ("wrong part type", {"files": [_file("notes.txt", b"hello", "text/plain")]}, 415, ["'notes.txt'", "text/plain"]),
    ("json body", {"json": {"file": "cat.png"}}, 415, ["application/json", "multipart/form-data"]),
    ("no body", {}, 415, ["multipart/form-data"]),
    ("missing field", {"files": [("image", ("a.png", b"x", "image/png"))]}, 422, ["missing field 'file'", "'image'"]),
    ("text, not a file", {"data": {"file": "cat.png"}, "files": [("other", ("a.png", b"x", "image/png"))]}, 422,
     ["field 'file' is text"]),
    ("malformed multipart", {"content": b"--X\r\ngarbage", "headers": {"content-type": "multipart/form-data"}}, 400,
     ["malformed multipart"]),
]


@pytest.mark.parametrize("what,kw,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_json_error_and_the_server_goes_on(client, make_png, what, kw, status, words):
    r = client.post("/v1/classify", **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert all(w in error for w in words), error
    assert client.post("/v1/classify", files=[_file("ok.png", make_png())]).status_code == 200


def test_truncated_and_bomb_images_are_refused_before_decoding(client, make_png):
    whole = make_png(1, (64, 64))
    for name, data, words in [("cut.png", whole[:len(whole) // 2], ["'cut.png'", "not a readable image"]),
                              ("bomb.png", _png_claiming(7000, 7000, make_png), ["7000x7000", "40000000 pixels"]),
                              ("huge.png", _png_claiming(100_000, 100_000, make_png), ["DecompressionBomb"])]:
        r = client.post("/v1/classify", files=[_file(name, data)])
        assert r.status_code == 400 and all(w in r.json()["error"] for w in words), r.text
    assert client.post("/v1/classify", files=[_file("ok.png", make_png())]).status_code == 200


def test_uploads_over_the_limit_are_refused_by_length_and_while_streaming(tiny_run, test_client_cls, make_png):
    app = create_app(tiny_run, device="cpu", max_upload_mb=0.01)  # 10 KiB
    big = make_png(2, (96, 96), channels=3)  # ~27 KiB of noise
    assert len(big) > 0.01 * 2**20
    body = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
            + big + b"\r\n--B--\r\n")
    with test_client_cls(app) as c:
        r = c.post("/v1/classify", files=[_file("big.png", big)])  # with Content-Length
        assert r.status_code == 413 and "MiB is over the limit of 0.01 MiB" in r.json()["error"]
        chunks = (body[i:i + 4096] for i in range(0, len(body), 4096))  # chunked: no Content-Length
        r = c.post("/v1/classify", content=chunks, headers={"content-type": "multipart/form-data; boundary=B"})
        assert r.status_code == 413 and "over the limit" in r.json()["error"]
        assert c.post("/v1/classify", files=[_file("ok.png", make_png())]).status_code == 200


def test_a_too_long_content_length_is_refused_before_the_body_is_read(tiny_run):
    app = create_app(tiny_run, device="cpu")
    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/classify", "raw_path": b"/v1/classify", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"t"), (b"content-type", b"multipart/form-data; boundary=B"),
                         (b"content-length", str(50 * 2**20).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and b"upload of 50 MiB is over the limit of 10 MiB" in sent[1]["body"]
    assert reads == []  # not one byte of the body was read


def test_concurrent_requests_share_a_forward_pass(tiny_run, make_png):
    app = create_app(tiny_run, device="cpu", max_batch=64, max_wait_ms=300)
    image = make_png(3)

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
                return await asyncio.gather(*[c.post("/v1/classify", files=[_file(f"{i}.png", image)])
                                              for i in range(8)])

    answers = [r.json() for r in asyncio.run(go())]
    assert max(a["batch_images"] for a in answers) >= 4  # one request waits up to 300 ms for the others
    assert len({str(a["images"][0]["top"]) for a in answers}) == 1  # same image, same answer, whatever the batch


def test_face_endpoints_refuse_a_classifier_run(client, make_png):
    for path in ("/v1/faces/embed", "/v1/faces/verify", "/v1/faces/identify"):
        r = client.post(path, files=[_file("a.png", make_png())])
        assert r.status_code == 404 and "not a face model" in r.json()["error"] and "lenet" in r.json()["error"]


def test_a_gallery_for_a_classifier_run_is_refused(tiny_run):
    with pytest.raises(DanluError, match="--gallery team.sqlite: .* is not a face model"):
        create_app(tiny_run, device="cpu", gallery="team.sqlite")


class PixelFaces:
    """A FaceService for the endpoint tests: the crop is the whole image at 16 x 16 gray, the embedding its centred
    pixels at unit length, the gallery a dict of name -> embedding."""
    shape = (1, 16, 16)
    threshold = 0.5

    def __init__(self, gallery=None):
        self.gallery = gallery

    @property
    def has_gallery(self) -> bool:
        return self.gallery is not None

    def crops(self, images):
        out = []
        for k, data in enumerate(images):
            try:
                out.append(torch.tensor(decode_image(io.BytesIO(data), (16, 16), 1)))
            except BadImage as e:
                raise DanluError(f"image {k + 1}: {e}") from None
        return torch.stack(out)  # (N, 1, 16, 16) uint8

    def embed(self, images):
        x = images.flatten(1).float()  # (N, 256)
        return F.normalize(x - x.mean(1, keepdim=True), dim=1)

    def identify(self, embeddings, top):
        names = list(self.gallery)
        sims = embeddings @ torch.stack([self.gallery[n] for n in names]).T  # (N, G)
        values, index = sims.topk(min(top, len(names)), dim=1)
        return [[(names[j], v) for v, j in zip(vs, js)] for vs, js in zip(values.tolist(), index.tolist())]


def test_face_endpoints_and_a_gallery_round_trip(tiny_run, test_client_cls, make_png):
    faces = PixelFaces(gallery={})
    assert isinstance(faces, FaceService)
    alice, bob, stranger = (make_png(s, (16, 16)) for s in (10, 11, 12))
    with test_client_cls(create_app(tiny_run, device="cpu", faces=faces, max_wait_ms=1)) as c:
        m = c.get("/v1/model").json()
        assert m["face"] is True and m["faces"] == {"threshold": 0.5, "gallery": True, "input_shape": [1, 16, 16]}
        r = c.post("/v1/faces/embed", files=[_file("alice.png", alice), _file("bob.png", bob)]).json()
        assert r["dim"] == 256 and [i["file"] for i in r["images"]] == ["alice.png", "bob.png"]
        for item in r["images"]:  # enrol what the API gave back: the round trip
            faces.gallery[item["file"][:-4]] = torch.tensor(item["embedding"])
            assert torch.tensor(item["embedding"]).norm() == pytest.approx(1, abs=1e-4)

        same = c.post("/v1/faces/verify", files=[("a", ("1.png", alice, "image/png")),
                                                 ("b", ("2.png", alice, "image/png"))]).json()
        assert same["same"] is True and same["similarity"] == pytest.approx(1, abs=1e-4) and same["threshold"] == 0.5
        other = c.post("/v1/faces/verify", files=[("a", ("1.png", alice, "image/png")),
                                                  ("b", ("2.png", bob, "image/png"))]).json()
        assert other["same"] is False and other["similarity"] < 0.5

        found = c.post("/v1/faces/identify?top=2", files=[_file("q1.png", bob), _file("q2.png", stranger)]).json()
        assert found["images"][0]["name"] == "bob" and found["images"][0]["matches"][0]["similarity"] > 0.999
        assert [m["name"] for m in found["images"][0]["matches"]] == ["bob", "alice"]
        assert found["images"][1]["name"] == "unknown" and len(found["images"][1]["matches"]) == 2

        r = c.post("/v1/faces/embed", files=[_file("ok.png", alice), _file("cut.png", alice[:60])])
        assert r.status_code == 400 and r.json()["error"].startswith("file 'cut.png': not a readable image"), r.text
        r = c.post("/v1/faces/embed", files=[_file("bomb.png", _png_claiming(7000, 7000, make_png))])
        assert r.status_code == 400 and "7000x7000 pixels is over the limit" in r.json()["error"]
        r = c.post("/v1/faces/verify", files=[("a", ("1.png", alice, "image/png"))])
        assert r.status_code == 422 and "missing field 'b'" in r.json()["error"]
        faces.gallery = None
        r = c.post("/v1/faces/identify", files=[_file("q.png", bob)])
        assert r.status_code == 409 and "--gallery" in r.json()["error"]
        assert c.post("/v1/classify", files=[_file("ok.png", make_png())]).status_code == 200  # classify still works


def test_cli_serve_refuses_bad_arguments_in_one_line(tiny_run, capsys):
    import socket

    from danlu.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [(["--port", "70000"], "--port 70000: expected 0..65535"),
                 (["--gallery", "g.sqlite"], "is not a face model"),
                 (["--port", str(port), "--device", "cpu"], f"--port {port}: cannot listen there"),
                 (["--max-batch", "0"], "--max-batch 0: expected at least 1"),
                 (["--host", "no-such-host.invalid", "--port", "0"], "--host no-such-host.invalid: not an address")]
        for args, words in cases:
            assert main(["serve", str(tiny_run), *args]) == 2
            err = capsys.readouterr().err
            assert words in err and err.count("\n") == 1, err


def test_loopback_is_told_apart():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("no-such-host.invalid")
