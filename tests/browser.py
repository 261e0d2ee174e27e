"""Headless Chromium for the report tests: Debian's `chromium` package (.ci/run installs it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1"]


def chromium() -> str:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium (apt-get install chromium; .ci/run does)")


def _run(args: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def dump_dom(url: str) -> str:
    """The DOM after the page's load handlers ran."""
    return _run(["--dump-dom", url])


def screenshot(url: str, png, width: int = 1280, height: int = 900) -> None:
    _run([f"--screenshot={png}", f"--window-size={width},{height}", url])


def images_loaded(dom: str) -> tuple[int, int]:
    """(decoded, total) images, as the report's load handler counted them in the browser."""
    import re

    found = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert found, "the report's load handler did not run"
    return int(found.group(1)), int(found.group(2))


def table_column(dom: str, table_id: str, key: str) -> list[str]:
    """The cells of column `key` (a th data-key) of the table with id `table_id`, in DOM order:
    data-value where a cell has one, else its text."""
    import re

    table = dom[dom.index(f'id="{table_id}"'):]
    table = table[:table.index("</table>")]
    column = re.findall(r'<th data-key="([^"]+)"', table).index(key)
    cells = []
    for row in table.split("<tr>")[2:]:
        cell = re.findall(r"<td([^>]*)>(.*?)</td>", row, re.S)[column]
        value = re.search(r'data-value="([^"]*)"', cell[0])
        cells.append(value.group(1) if value else cell[1])
    return cells


def assert_rendered_page(png, width: int, height: int) -> None:
    """A screenshot of a page with text, tables and plots, not a blank or error page."""
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(png).convert("L"), float)
    assert image.shape == (height, width)
    assert image.std() > 20 and (image < 100).mean() > 0.005
    assert (image < 200).any(axis=1).mean() > 0.3  # content down the page, not one line at the top
