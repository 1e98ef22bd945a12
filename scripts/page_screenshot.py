"""Screenshot `argen serve`'s web page as a new user sees it: no model flags, one prompt, a few images.

Usage: python scripts/page_screenshot.py [--prompt "an emoji of fire"] [--n 8] [--out docs/images/page.png]
       [-- extra argen serve flags, e.g. --kind c2i]

Starts `argen serve` on a free loopback port (the bundled generator when given no --gpt), drives
Debian's headless chromium through selenium (`apt-get install chromium chromium-driver`), types the
prompt (or class name), asks for --n images, waits for all of them and saves the screenshot.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="an emoji of fire")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/images/page.png")
    parser.add_argument("serve_args", nargs="*")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "argen.cli.main", "serve", "--port", str(port), "--device", "cpu",
                               *args.serve_args])
    profile = tempfile.mkdtemp(prefix="argen-chromium-")
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(1)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--window-size=1200,900", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 600)
            wait.until(lambda d: d.find_element("id", "generate").is_enabled())
            for element_id, value in (("condition", args.prompt), ("n", args.n), ("seed", args.seed)):
                field = driver.find_element("id", element_id)
                field.clear()
                field.send_keys(str(value))
            driver.find_element("id", "generate").click()
            wait.until(lambda d: len(d.find_elements("css selector", "figure.done img.result")) == args.n)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.out)
            print(f"wrote {args.out}")
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
