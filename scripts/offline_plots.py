"""`dvc plots show` that draws without a CDN, and a headless-browser check that it did.

    python scripts/offline_plots.py                 # dvc_plots/index.html, charts inline
    python scripts/offline_plots.py --check         # ... then Chromium renders it: every chart drawn?
    python scripts/offline_plots.py -- dvc plots diff HEAD~1    # any `dvc plots` command

DVC's page loads vega, vega-lite and vega-embed from cdn.jsdelivr.net: offline the charts are
simply missing. This fetches the same versions DVC asks for from the npm registry once
(`npm pack`, which checks each package's sha512 integrity), keeps the three minified builds in
~/.cache/vdm-pokemon/vega/, writes an HTML template with them inline, and runs
`dvc plots show --html-template` with it (any other `dvc plots` command after `--`). The page
then works from a file, with no network at all.

--check loads the page in headless Chromium (Debian's `chromium`) and counts, for every
chart, the drawn canvas that vega-embed leaves in its div; exit 1 if one is missing. It also
writes a screenshot next to the page.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The versions dvc-render's page asks the CDN for.
PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
CACHE = Path.home() / ".cache" / "vdm-pokemon" / "vega"

TEMPLATE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>vdm-pokemon: DVC plots</title>
{inline}
<style>
  body {{ font-family: system-ui, sans-serif; margin: 1.5rem; }}
  table {{ border-spacing: 15px; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def fail(message: str) -> None:
    print(f"offline_plots: error: {message}", file=sys.stderr)
    sys.exit(2)


def bundles() -> dict[str, Path]:
    """name -> the cached minified build, fetched with `npm pack` when missing."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = {name: CACHE / f"{name}-{version}.min.js" for name, version in PACKAGES.items()}
    missing = [name for name, path in out.items() if not path.is_file()]
    if missing:
        if shutil.which("npm") is None:
            fail("npm not found: install Node.js (Debian: apt-get install npm) to fetch vega once")
        with tempfile.TemporaryDirectory() as tmp:
            specs = [f"{name}@{PACKAGES[name]}" for name in missing]
            p = subprocess.run(["npm", "pack", *specs, "--json"], cwd=tmp, capture_output=True, text=True)
            if p.returncode != 0:
                fail(f"npm pack {' '.join(specs)} failed: {p.stderr.strip().splitlines()[-1:]}")
            for info in json.loads(p.stdout):
                name = info["name"]
                with tarfile.open(Path(tmp) / info["filename"]) as tf:
                    member = tf.extractfile(f"package/build/{name}.min.js")
                    if member is None:
                        fail(f"{info['filename']} has no build/{name}.min.js")
                    tmp_out = out[name].with_suffix(".part")
                    tmp_out.write_bytes(member.read())
                    tmp_out.replace(out[name])
                print(f"offline_plots: cached {name}@{info['version']} ({info['integrity'][:24]}...)")
    return out


def template() -> Path:
    inline = "\n".join(
        f"<script>/* {name}@{PACKAGES[name]} */\n{path.read_text(encoding='utf-8')}\n</script>"
        for name, path in bundles().items()
    )
    if "{plot_divs}" in inline or "{scripts}" in inline:  # DVC fills these by plain replacement
        fail("a vega bundle contains a DVC placeholder; cannot inline it")
    path = CACHE / "template.html"
    path.write_text(TEMPLATE.format(inline=inline), encoding="utf-8")
    return path


def check(page: Path) -> int:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        fail("no chromium found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        common = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            "--window-size=1400,1600",
        ]
        url = page.resolve().as_uri()
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        shot = page.with_name("screenshot.png")
        subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    source = page.read_text(encoding="utf-8")
    charts = re.findall(r"vegaEmbed\('#([^']+)'", source)
    if not charts:
        fail(f"{page} holds no vega chart")
    starts = [dom.find(f'id="{chart}"') for chart in charts]
    drawn = 0
    for k, chart in enumerate(charts):
        later = [s for s in starts[k + 1 :] if s > starts[k]]
        body = dom[starts[k] : later[0] if later else len(dom)] if starts[k] >= 0 else ""
        ok = "<canvas" in body or "<svg" in body
        drawn += ok
        print(f"  {'drawn  ' if ok else 'MISSING'} {html.unescape(chart)}")
    print(f"offline_plots: {drawn} of {len(charts)} charts drawn in headless Chromium; screenshot {shot}")
    return 0 if drawn == len(charts) else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="dvc_plots", help="folder of the page (dvc plots -o)")
    ap.add_argument("--check", action="store_true", help="render it in headless Chromium and check every chart")
    ap.add_argument("command", nargs="*", help="a `dvc plots ...` command to run instead of `dvc plots show`")
    args = ap.parse_args()
    command = args.command or ["dvc", "plots", "show"]
    if command[:2] != ["dvc", "plots"]:
        fail("the command after -- must be a `dvc plots` command")
    p = subprocess.run([*command, "--html-template", str(template()), "-o", args.out])
    if p.returncode != 0:
        sys.exit(p.returncode)
    page = Path(args.out) / "index.html"
    print(f"offline_plots: {page} (vega inline: opens without a network)")
    if args.check:
        sys.exit(check(page))


if __name__ == "__main__":
    main()
