"""A screenshot of a page served on this machine (the MLflow or Prefect UI), in headless Chromium, offline.

    python tools/screenshot.py http://127.0.0.1:5000/#/experiments/1 docs/mlflow.png --size 1500x1000

Every request that is not to this machine goes to a dead proxy, so a UI that needs the internet shows it. The
docs/*.png screenshots were taken this way (docs/screenshots.md says how each page was reached).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from offline_plots import CHROMIUM_FLAGS, chromium  # tools/ is run as scripts: python tools/screenshot.py

LOCAL_ONLY = [flag for flag in CHROMIUM_FLAGS if not flag.startswith("--proxy-bypass-list")]  # loopback allowed


def screenshot(url: str, out: Path, width: int, height: int, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium(), *LOCAL_ONLY, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={out.resolve()}", url],
                       check=True, capture_output=True, timeout=180)
    print(f"{out}: {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="1500x1000", help="window WIDTHxHEIGHT")
    parser.add_argument("--wait-ms", type=int, default=15000, help="virtual time for the page's scripts")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    screenshot(args.url, args.out, width, height, args.wait_ms)


if __name__ == "__main__":
    main()
