#!/usr/bin/env python
"""The README's picture of `danlu serve`: start it on a run, upload an image through the page in Debian's chromium
(Playwright), save a screenshot.

    python scripts/serve_screenshot.py RUN -o docs/serve.png               # a digit from mnist5k's test split
    python scripts/serve_screenshot.py RUN --image cat.jpg -o docs/serve.png
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def _digit(index: int) -> bytes:
    from PIL import Image

    from danlu.data.datasets import load_dataset

    _, test = load_dataset("mnist5k")
    buf = io.BytesIO()
    Image.fromarray(test.images[index, 0].numpy()).save(buf, "PNG")
    return buf.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder")
    p.add_argument("--image", help="image file to upload (default: a digit of mnist5k's test split)")
    p.add_argument("--digit", type=int, default=7, help="which test digit (default 7)")
    p.add_argument("-o", "--out", default="docs/serve.png")
    a = p.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    image = Path(a.image).read_bytes() if a.image else _digit(a.digit)
    name = Path(a.image).name if a.image else f"digit{a.digit}.png"
    proc = subprocess.Popen([sys.executable, "-m", "danlu", "serve", a.run, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        url = next((w for line in proc.stdout if " http://" in line for w in line.split() if w.startswith("http://")),
                   None)
        watchdog.cancel()
        if url is None:
            raise SystemExit("danlu serve did not start")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox",
                                                                         "--disable-gpu"])
            page = browser.new_page(viewport={"width": 900, "height": 470})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
            page.set_input_files("#file-classify", files=[{"name": name, "mimeType": "image/png", "buffer": image}])
            page.wait_for_selector("#bars li")
            page.screenshot(path=a.out)
            print(f"{a.out}: {page.text_content('#label')}; {page.text_content('#time')}")
            browser.close()
    finally:
        watchdog.cancel()
        proc.terminate()
        proc.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
