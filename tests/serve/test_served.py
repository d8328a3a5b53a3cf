"""`danlu serve` as a process on a loopback port: the real HTTP server, and the page in a real browser (Debian's
chromium driven by Playwright; skipped, with the reason, where either is missing)."""
from __future__ import annotations

import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "build" / "test-artifacts"


def test_it_listens_on_loopback_and_refuses_a_long_body_before_it_is_sent(served):
    host, port = urlsplit(served).hostname, urlsplit(served).port
    assert host == "127.0.0.1"
    with socket.create_connection((host, port), timeout=10) as s:  # headers only: 50 MiB announced, none sent
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
                  b"Content-Length: 52428800\r\n\r\n")
        answer = b""
        while b"}" not in answer:  # the JSON body may come in a second packet
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        answer = answer.decode()
    # none of the 50 MiB was sent, so a 413 can only come from the announced length, before any body is read
    assert answer.startswith("HTTP/1.1 413") and "over the limit of 10 MiB" in answer
    assert httpx.get(f"{served}/healthz").json() == {"status": "ok"}


def test_the_page_classifies_an_uploaded_image_in_a_real_browser(served, make_png):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install -y chromium; `make test` tries that)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                   "'danlu[test]')")
    image = make_png(5)
    want = httpx.post(f"{served}/v1/classify", files={"file": ("digit.png", image, "image/png")}).json()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox",
                                                                          "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(served + "/")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('lenet')")
            page.set_input_files("#file-classify", files=[{"name": "digit.png", "mimeType": "image/png",
                                                           "buffer": image}])
            page.wait_for_selector("#bars li")
            label, when = page.text_content("#label"), page.text_content("#time")
            assert label == want["images"][0]["top"][0]["class"]
            assert page.locator("#bars li").count() == 5
            assert re.match(r"recognised in \d+(\.\d+)? ms \(model\)", when), when
            assert page.locator("#preview-classify").is_visible()
            page.screenshot(path=str(ARTIFACTS / "serve_page.png"))

            page.set_input_files("#file-classify", files=[{"name": "notes.bin", "mimeType": "application/octet-stream",
                                                           "buffer": b"not an image"}])
            page.wait_for_function("document.getElementById('error-classify').textContent.length > 0")
            assert "'notes.bin': not a readable image" in page.text_content("#error-classify")
        finally:
            browser.close()
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 1000


def test_ctrl_c_stops_the_server_with_one_line_giving_requests_in_flight_a_short_grace(tiny_run):
    """Ctrl-C used to take over 2 s (uvicorn waited 5 s for a request in flight, e.g. a half-sent upload) and said
    nothing. Now requests in flight get SHUTDOWN_GRACE_S (under a second), the server says it stopped in one line
    (counting them), and the process ends with exit code 0."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    from danlu.serve.app import SHUTDOWN_GRACE_S

    assert SHUTDOWN_GRACE_S < 1
    proc = subprocess.Popen([sys.executable, "-m", "danlu", "serve", str(tiny_run), "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    watchdog = threading.Timer(120, proc.kill)  # a hung server fails the test instead of hanging it
    watchdog.start()
    try:
        url = next((w for line in proc.stdout if " http://" in line for w in line.split()
                    if w.startswith("http://")), None)
        assert url is not None, "danlu serve did not say where it listens"
        host, port = urlsplit(url).hostname, urlsplit(url).port
        with socket.create_connection((host, port), timeout=30) as upload:  # an upload that stops half-way
            upload.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B"
                           b"\r\nContent-Length: 1000\r\n\r\n--B\r\nContent-Disposition: form-data; name=\"file\"; "
                           b"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\x89PNG")
            for _ in range(2):  # two round trips later the server has read the upload's headers: it is in flight
                assert httpx.get(f"{url}/healthz").status_code == 200
            proc.send_signal(signal.SIGINT)
            rest = proc.stdout.read()  # until the process closes its output: it has ended
        assert proc.wait() == 0
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    assert rest.splitlines() == [f"danlu serve: stopped (Ctrl-C); 1 request(s) in flight had {SHUTDOWN_GRACE_S:g} s "
                                 f"to finish"], rest
