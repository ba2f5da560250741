"""`dvc plots show` with no network: DVC's page loads Vega from a CDN (a blank page offline); ours inlines it.

    python tools/offline_plots.py build   # .dvc/plots/offline.html from the npm registry's vega packages
    python tools/offline_plots.py check   # render `dvc plots show` in headless Chromium, offline; screenshot

``build`` fetches vega, vega-lite and vega-embed (pinned below; each BSD-3-Clause, University of Washington
Interactive Data Lab) with ``npm pack`` and inlines their minified builds into an HTML template for DVC
(``.dvc/config``: ``plots.html_template``). The template has DVC's ``{plot_divs}`` placeholder and no
``{scripts}`` one, so DVC's CDN script tags are never written. Run it only to change the pinned versions: the
template is committed, so users need neither npm nor a network.

``check`` runs ``dvc plots show`` (or takes --html), then loads the page in headless Chromium (Debian's
``chromium``) with every network request sent to a dead proxy, and fails unless every plot rendered (Vega draws
each into a ``<canvas>`` or an ``<svg>`` of marks); ``--screenshot`` saves what it drew.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / ".dvc" / "plots" / "offline.html"
PACKAGES = {"vega": ("5.33.1", "build/vega.min.js"), "vega-lite": ("5.23.0", "build/vega-lite.min.js"),
            "vega-embed": ("6.29.0", "build/vega-embed.min.js")}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  # offline for sure: any request that is not a file goes to a port nothing listens on
                  "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>madloop: DVC plots</title>
<!-- Offline: {versions} are inlined below (no CDN), by tools/offline_plots.py.
{license}-->
{scripts}
<style>
  body {{ font-family: sans-serif; margin: 16px; }}
  table {{ border-spacing: 15px; }}
</style>
</head>
<body>
<p>madloop: metrics per generation (generation 0 trains on the real data). Lines are lineages or recipes, one colour
per lineage and revision (dashes tell revisions apart in <code>dvc plots diff</code>); bands are 95% t-intervals over
a recipe's seeds.</p>
{{plot_divs}}
</body>
</html>
"""


def build() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        scripts, license_text = [], ""
        for name, (version, path) in PACKAGES.items():
            done = subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=tmp, check=True,
                                  capture_output=True, text=True)
            with tarfile.open(Path(tmp) / done.stdout.strip().splitlines()[-1]) as archive:
                code = archive.extractfile(f"package/{path}").read().decode()
                if not license_text and "package/LICENSE" in archive.getnames():
                    license_text = archive.extractfile("package/LICENSE").read().decode()
            if "</script" in code or "{plot_divs}" in code or "{scripts}" in code:
                raise SystemExit(f"{name} {version}: its build cannot be inlined as is")
            scripts.append(f"<script>/* {name} {version} (BSD-3-Clause) */\n{code}\n</script>")
    versions = ", ".join(f"{name} {version}" for name, (version, _) in PACKAGES.items())
    license_text = license_text.replace("--", "- -")  # inside an HTML comment
    page = PAGE.format(versions=versions, scripts="\n".join(scripts),
                       license=f"Each is BSD-3-Clause; the licence:\n\n{license_text}")
    TEMPLATE.write_text(page)
    print(f"wrote {TEMPLATE.relative_to(REPO)} ({len(page) // 1024} KiB: {versions})")


def remote_scripts(html: str) -> list[str]:
    """The script tags of a page that load code from the network."""
    return re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^>]*>", html, flags=re.IGNORECASE)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium: apt-get install chromium")


def check(html: Path | None, screenshot: Path | None, width: int, height: int) -> None:
    if html is None:
        subprocess.run(["dvc", "plots", "show", "--out", "dvc_plots"], cwd=REPO, check=True, capture_output=True)
        html = REPO / "dvc_plots" / "index.html"
    page = html.read_text()
    remote = remote_scripts(page)
    if remote:
        raise SystemExit(f"{html} loads scripts from the network: {remote[:3]}")
    plots = page.count("vegaEmbed(")
    with tempfile.TemporaryDirectory() as profile:
        base = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000"]
        dom = subprocess.run([*base, "--dump-dom", html.resolve().as_uri()], capture_output=True, text=True,
                             timeout=120).stdout
        if screenshot is not None:
            subprocess.run([*base, f"--window-size={width},{height}", f"--screenshot={screenshot.resolve()}",
                            html.resolve().as_uri()], capture_output=True, timeout=120, check=True)
    drawn = len(re.findall(r"<canvas\b|<svg[^>]*class=\"marks\"", dom))
    if plots == 0 or drawn < plots:
        raise SystemExit(f"{html}: {drawn} of {plots} plots rendered offline")
    print(f"{html}: all {plots} plots rendered offline in headless Chromium"
          + (f"; screenshot {screenshot}" if screenshot else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="write .dvc/plots/offline.html (needs npm and its registry)")
    checking = commands.add_parser("check", help="render the plots page offline in headless Chromium")
    checking.add_argument("--html", type=Path, default=None, help="a page made by dvc plots (default: run "
                                                                  "`dvc plots show` in the repository)")
    checking.add_argument("--screenshot", type=Path, default=None)
    checking.add_argument("--size", default="1300x1700", help="window WIDTHxHEIGHT for the screenshot")
    args = parser.parse_args()
    if args.command == "build":
        build()
    else:
        width, height = map(int, args.size.split("x"))
        check(args.html, args.screenshot, width, height)


if __name__ == "__main__":
    sys.exit(main())
