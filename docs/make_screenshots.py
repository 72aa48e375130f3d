"""Screenshots of the Dagster UI's plots and of the cluster explorer, from a fresh run of the default.

    python docs/make_screenshots.py                   # PNGs into /tmp/spd_cluster_screenshots
    python docs/make_screenshots.py --readme          # also the README's two images in docs/images/

Runs `spd-cluster run` into a temporary DAGSTER_HOME, starts `dagster dev` on it, and drives
Debian's Chromium (`/usr/bin/chromium`) with Playwright: each asset page with one metadata plot
opened ("Show Markdown"), and the explorer page from disk with a search and a cluster open.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
# (file name, asset page, metadata entry whose plot is opened)
ASSET_PAGES = [
    ("mdl_curve", "merge_history", "mdl_curve"),
    ("member_overlap", "normalized_ensemble", "member_overlap_heatmap"),
    ("distances", "distance_matrices", "distances_plot"),
    ("co_association", "consensus_clusters", "co_association"),
    ("distances_at_consensus", "consensus_clusters", "distances_at_iteration"),
]
README_IMAGES = {"explorer": "cluster_explorer.png", "mdl_curve": "mdl_curve_in_the_ui.png"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(2)
    sys.exit(f"{url} did not answer within {timeout_s:.0f} s")


def skip_welcome(page) -> None:
    """Close Dagster's first-visit dialogs (the tour, the community invitation) if one is open."""
    skip = page.get_by_role("button", name="Skip")
    if skip.count():
        skip.first.click()
        time.sleep(1)


def shoot(home: Path, base: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 950})
        for name, asset, entry in ASSET_PAGES:
            page.goto(f"{base}/assets/default/{asset}", timeout=120_000)
            page.wait_for_load_state("networkidle", timeout=120_000)
            time.sleep(3)
            skip_welcome(page)
            row = page.locator("tr", has=page.locator("td", has_text=entry)).first
            row.get_by_text("[Show Markdown]").click()
            time.sleep(2)
            skip_welcome(page)  # the UI's welcome dialog can open late, over the plot
            page.screenshot(path=str(out / f"{name}.png"))
            print(f"  {out / f'{name}.png'}")
        page.set_viewport_size({"width": 1280, "height": 800})
        page.goto((home / "spd_cluster" / "default" / "cluster_explorer.html").as_uri())
        page.fill("#search", "layers.1.mlp.up")
        page.locator("#cluster-list li").first.click()
        page.screenshot(path=str(out / "explorer.png"))
        print(f"  {out / 'explorer.png'}")
        browser.close()


def readme_copy(source: Path, target: Path) -> None:
    """Three quarters of the size, 128 colours: small enough to keep in the repository."""
    from PIL import Image

    image = Image.open(source).convert("RGB")
    image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS).quantize(colors=128)
    image.save(target, optimize=True)
    print(f"  {target} ({target.stat().st_size // 1024} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "spd_cluster_screenshots")
    parser.add_argument("--readme", action="store_true", help="also write the README's images into docs/images/")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="screenshots_home_"))
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    environment = {**os.environ, "DAGSTER_HOME": str(home)}
    print(f"spd-cluster run into {home} ...", flush=True)
    subprocess.run([sys.executable, "-m", "spd_assets.cli", "run"], env=environment, check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(["dagster", "dev", "-w", str(ROOT / "workspace.yaml"), "-p", str(port)], env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/server_info", timeout_s=300)
        shoot(home, f"http://127.0.0.1:{port}", args.out)
    finally:
        # dagster dev and the processes it started share its session: stop them together.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
    if args.readme:
        for name, target in README_IMAGES.items():
            readme_copy(args.out / f"{name}.png", ROOT / "docs" / "images" / target)


if __name__ == "__main__":
    main()
