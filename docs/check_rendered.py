"""Check that the built documentation's pages render, with their figures, in a real browser.

For every page checked (by default the tutorials, the capability pages with executed code, and the
home page) this script

1. reads the built HTML and checks that every ``<img>`` points at a file that exists and is a
   non-empty image (``data:`` URIs are checked for a payload);
2. opens the page in headless Chromium inside a small wrapper page and records, for every ``<img>``
   of the rendered page, whether the browser loaded it (``complete`` and a natural width above 0),
   read back with ``--dump-dom``;
3. takes a screenshot of the page, 1200 pixels wide and as tall as the page (at least 3000, at most
   16,000 pixels; ``--window-height`` fixes it), into the output folder, to look at.

It exits with status 1 if any image is missing or did not load, or if a page that must show
figures (the executed tutorials) has none; 2 if Chromium or the built pages are not found.

Usage, after building the docs (see ``docs/development.md``)::

    python docs/check_rendered.py                      # docs/_build/html -> docs/_build/screenshots
    python docs/check_rendered.py --html path/to/html --out shots/ tutorials/pbmc.html

Chromium comes from Debian's packages (``apt-get install -y chromium``); ``--chromium`` or
``$CHROMIUM`` name another binary. Only the standard library is needed.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

HERE = Path(__file__).resolve().parent
#: Pages checked by default (relative to the HTML root); the tutorials are globbed.
DEFAULT_PAGES = ("index.html", "finetuning.html", "tutorials/*.html")
#: Pages that must show at least one figure (executed tutorials with plots).
MUST_HAVE_FIGURES = (
    "tutorials/quickstart.html",
    "tutorials/pbmc.html",
    "tutorials/likelihood.html",
    "tutorials/gene_embeddings.html",
    "tutorials/cross_species.html",
    "tutorials/generation.html",
    "tutorials/finetuning.html",
    "finetuning.html",
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
#: Tallest screenshot taken (pixels); longer pages are cut there.
MAX_HEIGHT = 16000
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"<svg", b"<?xml", b"RIFF")

# Loaded in the wrapper page: waits for the page in the iframe, then writes what its images did into
# the wrapper's DOM, which --dump-dom prints.
WRAPPER = """<!DOCTYPE html>
<html><body>
<iframe id="page" src="{src}" width="1200" height="3000"></iframe>
<pre id="result">pending</pre>
<script>
const frame = document.getElementById("page");
frame.addEventListener("load", () => {{
  setTimeout(() => {{
    let out;
    try {{
      const doc = frame.contentDocument;
      out = {{
        height: Math.max(doc.documentElement.scrollHeight, doc.body.scrollHeight),
        images: Array.from(doc.images).map(img => ({{
          src: img.getAttribute("src") || "",
          complete: img.complete,
          width: img.naturalWidth,
        }})),
      }};
    }} catch (e) {{
      out = {{error: String(e)}};
    }}
    document.getElementById("result").textContent = JSON.stringify(out);
  }}, 1500);
}});
</script>
</body></html>
"""


class _Images(HTMLParser):
    """The ``src`` of every ``<img>`` of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")


def find_chromium(explicit: str | None) -> str | None:
    for name in (explicit, os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (shutil.which(name) or Path(name).is_file()):
            return shutil.which(name) or name
    return None


def static_problems(page: Path) -> tuple[int, list[str]]:
    """Number of ``<img>`` in the built HTML, and what is wrong with their files."""
    parser = _Images()
    parser.feed(page.read_text(encoding="utf-8"))
    problems = []
    for src in parser.sources:
        if not src:
            problems.append("an <img> without src")
        elif src.startswith("data:"):
            payload = src.split(",", 1)[1] if "," in src else ""
            try:
                ok = len(base64.b64decode(payload, validate=False)) > 0 if ";base64" in src[:64] else bool(payload)
            except ValueError:
                ok = False
            if not ok:
                problems.append("an empty data: image")
        elif urlparse(src).scheme in ("http", "https"):
            problems.append(f"{src}: a remote image (the docs should not need the network)")
        else:
            path = (page.parent / unquote(urlparse(src).path)).resolve()
            if not path.is_file():
                problems.append(f"{src}: file not found ({path})")
            elif path.stat().st_size == 0:
                problems.append(f"{src}: empty file")
            elif not path.read_bytes()[:8].startswith(IMAGE_MAGIC):
                problems.append(f"{src}: not an image file")
    return len(parser.sources), problems


def run_chromium(chromium: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def browser_problems(chromium: str, page: Path, timeout: float) -> tuple[int, int, list[str], int]:
    """Images of the page as Chromium rendered it, how many loaded, those that did not, and the page's height."""
    with tempfile.TemporaryDirectory(prefix="check-rendered-") as tmp:
        wrapper = Path(tmp) / "wrapper.html"
        wrapper.write_text(WRAPPER.format(src=html.escape(page.as_uri(), quote=True)), encoding="utf-8")
        result = run_chromium(
            chromium,
            ["--allow-file-access-from-files", "--virtual-time-budget=20000", "--dump-dom", wrapper.as_uri()],
            timeout,
        )
    start = result.stdout.find('<pre id="result">')
    if start < 0:
        return 0, 0, [f"Chromium printed no DOM (exit {result.returncode}): {result.stderr.strip()[-500:]}"], 0
    text = result.stdout[start + len('<pre id="result">') :].split("</pre>", 1)[0]
    try:
        found = json.loads(html.unescape(text))
    except json.JSONDecodeError:
        return 0, 0, [f"the page did not finish loading in Chromium (result: {text[:100]!r})"], 0
    if "error" in found:
        return 0, 0, [f"could not read the page's images: {found['error']}"], 0
    images = found["images"]
    bad = [f"{i['src'][:80]}: not loaded in the browser" for i in images if not (i["complete"] and i["width"] > 0)]
    return len(images), len(images) - len(bad), bad, int(found["height"])


def screenshot(chromium: str, page: Path, target: Path, timeout: float, height: int = 3000) -> str | None:
    target.parent.mkdir(parents=True, exist_ok=True)
    result = run_chromium(
        chromium,
        [f"--window-size=1200,{height}", "--virtual-time-budget=10000", f"--screenshot={target}", page.as_uri()],
        timeout,
    )
    if not target.is_file() or target.stat().st_size == 0:
        return f"no screenshot (exit {result.returncode}): {result.stderr.strip()[-300:]}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", help=f"pages relative to --html (default: {', '.join(DEFAULT_PAGES)})")
    parser.add_argument("--html", default=str(HERE / "_build" / "html"), help="the built HTML (default: %(default)s)")
    parser.add_argument(
        "--out", default=str(HERE / "_build" / "screenshots"), help="screenshots (default: %(default)s)"
    )
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: $CHROMIUM or chromium on PATH)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per Chromium run")
    parser.add_argument(
        "--window-height",
        type=int,
        default=None,
        help=f"screenshot height in pixels (default: the whole page, at least 3000, at most {MAX_HEIGHT})",
    )
    args = parser.parse_args(argv)

    root = Path(args.html).resolve()
    if not (root / "index.html").is_file():
        print(f"no built documentation in {root}: build it first (see docs/development.md).", file=sys.stderr)
        return 2
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("Chromium not found: apt-get install -y chromium (or pass --chromium).", file=sys.stderr)
        return 2
    patterns = args.pages or list(DEFAULT_PAGES)
    pages = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    if not pages:
        print(f"no pages match {patterns} in {root}.", file=sys.stderr)
        return 2

    out = Path(args.out).resolve()
    failed = 0
    for page in pages:
        rel = page.relative_to(root).as_posix()
        n_static, problems = static_problems(page)
        n_browser, n_loaded, loading, page_height = browser_problems(chromium, page, args.timeout)
        problems += loading
        if n_browser != n_static and not loading:
            problems.append(f"{n_static} <img> in the HTML but {n_browser} in the rendered page")
        if rel in MUST_HAVE_FIGURES and n_static == 0:
            problems.append("no figure, but this page must show some")
        shot = out / (rel.removesuffix(".html").replace("/", "__") + ".png")
        height = 3000 if args.window_height else min(max(3000, page_height + 100), MAX_HEIGHT)
        problem = screenshot(chromium, page, shot, args.timeout, args.window_height or height)
        if problem:
            problems.append(problem)
        status = "FAIL" if problems else "ok"
        print(f"{status:4}  {rel}: {n_loaded} of {n_static} images loaded in the browser; screenshot {shot}")
        for p in problems:
            print(f"        {p}")
        failed += bool(problems)
    print(f"{len(pages) - failed} of {len(pages)} pages render with all their images.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
