"""Regenerate tools/report.png, the README's picture of the HTML report, from a real run.

Runs the README's report command on the bundled demo in a temporary directory, then renders report.html in
headless Chromium (`chromium --headless --screenshot`) at 1280 px wide. Without a Chromium binary it says so
and exits 0 without touching tools/report.png.

    python tools/report_screenshot.py [--height 2000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PNG = ROOT / "tools" / "report.png"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars"]
REPORT_ARGS = [
    "report",
    "calib_data/digits/model.onnx",
    "digits.int4.onnx",
    "--data",
    "calib_data/digits/eval.npz",
    "--labels",
    "labels",
    "--stats",
    "calib.stats",
    "-o",
    "report.html",
]
CONVERT_ARGS = [
    "convert",
    "calib_data/digits/model.onnx",
    "--bits",
    "4",
    "--calib",
    "laplace",
    "--calib-data",
    "calib_data/digits/calib.npz",
    "--save-stats",
    "calib.stats",
    "-o",
    "digits.int4.onnx",
]


def browser() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def onnxquant(args: list[str], cwd: Path) -> None:
    """Run a command of the installed CLI; its own one-line error ends this script."""
    done = subprocess.run([sys.executable, "-m", "onnxquant.cli", *args], cwd=cwd, check=False)
    if done.returncode not in (0, 1):  # 1: a threshold the report was not asked for; kept for safety
        sys.exit(done.returncode)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=2000, help="screenshot height in pixels")
    args = parser.parse_args()
    chromium = browser()
    if chromium is None:
        print(f"no Chromium found ({', '.join(BROWSERS)}): {PNG.relative_to(ROOT)} left as it is")
        return 0
    with tempfile.TemporaryDirectory(prefix="onnxquant-shot-") as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "calib_data", work / "calib_data")
        onnxquant(CONVERT_ARGS, work)
        onnxquant(REPORT_ARGS, work)
        shot = work / "report.png"
        subprocess.run(
            [
                chromium,
                *FLAGS,
                f"--user-data-dir={work / 'profile'}",
                f"--window-size=1280,{args.height}",
                f"--screenshot={shot}",
                (work / "report.html").as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
        shutil.copyfile(shot, PNG)
    print(f"wrote {PNG.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
