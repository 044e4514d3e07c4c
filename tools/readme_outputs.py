"""Regenerate, or check, the command outputs the README shows, from real runs.

README.md holds fenced blocks between `<!-- output: NAME [slow] [head=N tail=M] -->` and `<!-- /output -->`;
each lists commands as `$ command` lines. This script runs every block's commands in document order, in a
temporary directory holding a copy of calib_data/ (so the commands are exactly what a user types in a clone,
and nothing is written into the repository), and puts each command's real output under it: stdout and
stderr interleaved as a terminal shows them, then `[exit code N]` when N is not 0. `head=N tail=M` shows
only the first N and last M lines of each output, with `...` between. Values outside a command block (the
demo's float accuracy in calib_data/digits/README.md) sit between `<!-- value: NAME -->` and
`<!-- /value -->`.

    python tools/readme_outputs.py --write          # rewrite the files from a fresh run
    python tools/readme_outputs.py --check [--fast] # exit 1 with a diff when they drift

`--fast` leaves out blocks marked `slow`. `onnxquant` commands run inside this one process (through the
same click entry point, with file descriptors 1 and 2 captured), which saves the second-long import per
command; other commands (`head`) run as subprocesses. Comparison ignores what varies run to run: the
temporary directory's path, dates and durations.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxquant.cli import main as onnxquant_main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DIGITS_README = ROOT / "calib_data" / "digits" / "README.md"
FILES = (README, DIGITS_README)
WRITE_COMMAND = "python tools/readme_outputs.py --write"

BLOCK = re.compile(
    r"(?P<open><!-- output: (?P<name>[\w-]+)(?P<opts>[^>]*?) -->\n```[^\n]*\n)"
    r"(?P<body>.*?)(?P<close>```\n<!-- /output -->)",
    re.DOTALL,
)
VALUE = re.compile(
    r"(?P<open><!-- value: (?P<name>[\w-]+) -->)(?P<body>.*?)(?P<close><!-- /value -->)", re.DOTALL
)
PROMPT = "$ "
# what differs between two runs of the same commands: dates, durations, rates (the temp dir is replaced first)
VOLATILE = [
    (re.compile(r"\b\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(?::\d{2})?(?: UTC)?"), "<date>"),
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s|min|h)\b"), "<time>"),
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:it|samples?|batch(?:es)?)/s\b"), "<rate>"),
]


@dataclass
class Block:
    name: str
    commands: list[str]
    slow: bool = False
    head: int | None = None
    tail: int = 0
    outputs: list[str] = field(default_factory=list)


def parse_blocks(text: str) -> list[Block]:
    """The output blocks of `text`, with their commands and options, in document order."""
    blocks = []
    for m in BLOCK.finditer(text):
        opts = m["opts"].split()
        block = Block(
            m["name"], [ln[len(PROMPT) :] for ln in m["body"].splitlines() if ln.startswith(PROMPT)]
        )
        block.slow = "slow" in opts
        for opt in opts:
            key, _, value = opt.partition("=")
            if key in ("head", "tail"):
                setattr(block, key, int(value))
        blocks.append(block)
    return blocks


def run_onnxquant(args: list[str], log: Path) -> int:
    """Run one `onnxquant` command in this process; its stdout and stderr (file descriptors 1 and 2, so
    logging handlers and C libraries are captured too) go to `log`, interleaved."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "wb") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        onnxquant_main(args, prog_name="onnxquant", standalone_mode=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    return code


def run_command(command: str, workdir: Path) -> str:
    """The output a user sees for `command` typed in `workdir`, with `[exit code N]` when N is not 0."""
    argv = shlex.split(command)
    if argv[0] == "onnxquant":
        log = workdir.parent / "command.log"
        cwd = os.getcwd()
        os.chdir(workdir)
        try:
            code = run_onnxquant(argv[1:], log)
        finally:
            os.chdir(cwd)
        out = log.read_text(encoding="utf-8", errors="replace")
    else:
        done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, check=False)
        code, out = done.returncode, done.stdout + done.stderr
    out = out.replace(str(workdir) + os.sep, "").replace(str(workdir), ".")
    lines = out.rstrip("\n").splitlines() if out.strip() else []
    if code:
        lines.append(f"[exit code {code}]")
    return "\n".join(lines)


def shorten(output: str, block: Block) -> str:
    lines = output.splitlines()
    if block.head is None or len(lines) <= block.head + block.tail + 1:
        return output
    return "\n".join([*lines[: block.head], "...", *(lines[len(lines) - block.tail :] if block.tail else [])])


def run_blocks(blocks: list[Block], fast: bool) -> None:
    """Run every block's commands in order in one scratch copy of the repository's demo data."""
    scratch = Path(tempfile.mkdtemp(prefix="onnxquant-readme-"))
    workdir = scratch / "clone"
    try:
        workdir.mkdir()
        shutil.copytree(ROOT / "calib_data", workdir / "calib_data")
        for block in blocks:
            if fast and block.slow:
                continue
            block.outputs = [shorten(run_command(c, workdir), block) for c in block.commands]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def render_block(block: Block) -> str:
    parts = []
    for command, output in zip(block.commands, block.outputs):
        parts.append(PROMPT + command)
        if output:
            parts.append(output)
    return "\n".join(parts) + "\n"


def float_accuracy() -> str:
    """Top-1 accuracy of the demo model on eval.npz, as ONNX Runtime computes it."""
    digits = ROOT / "calib_data" / "digits"
    session = ort.InferenceSession(str(digits / "model.onnx"), providers=["CPUExecutionProvider"])
    with np.load(digits / "eval.npz", allow_pickle=False) as f:
        x, labels = f["input"], f["labels"]
    (logits,) = session.run(None, {"input": x})
    right = int((logits.argmax(axis=1) == labels).sum())
    return f"{right / len(labels):.4f} ({right}/{len(labels)})"


VALUES = {"float-accuracy": float_accuracy}


def regenerate(text: str, blocks: dict[str, Block], values: dict[str, str]) -> str:
    """`text` with the outputs of the blocks that ran and the computed values put in place."""

    def block(m: re.Match) -> str:
        ran = blocks.get(m["name"])
        if ran is None or (ran.commands and not ran.outputs):
            return m[0]
        return m["open"] + render_block(ran) + m["close"]

    def value(m: re.Match) -> str:
        return m["open"] + values[m["name"]] + m["close"] if m["name"] in values else m[0]

    return VALUE.sub(value, BLOCK.sub(block, text))


def normalized(text: str) -> str:
    for pattern, repl in VOLATILE:
        text = pattern.sub(repl, text)
    return text


def fresh_texts(fast: bool) -> dict[Path, tuple[str, str]]:
    """{file: (current text, text from a fresh run)} for every file that shows outputs."""
    texts = {path: path.read_text(encoding="utf-8") for path in FILES}
    blocks = [b for text in texts.values() for b in parse_blocks(text)]
    run_blocks(blocks, fast)
    by_name = {b.name: b for b in blocks}
    values = {name: compute() for name, compute in VALUES.items()}
    return {path: (text, regenerate(text, by_name, values)) for path, text in texts.items()}


def check(fast: bool) -> int:
    """0 when every shown output equals a fresh run's (up to durations), else 1 with a diff."""
    drift = []
    for path, (old, new) in fresh_texts(fast).items():
        if normalized(old) != normalized(new):
            rel = str(path.relative_to(ROOT))
            drift += difflib.unified_diff(
                old.splitlines(), new.splitlines(), f"{rel} (shown)", f"{rel} (a fresh run)", lineterm=""
            )
    if drift:
        print("\n".join(drift))
        print(f"\nThe shown outputs drifted from what the commands print now; run `{WRITE_COMMAND}`.")
        return 1
    return 0


def write(fast: bool) -> int:
    for path, (old, new) in fresh_texts(fast).items():
        if new != old:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {path.relative_to(ROOT)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--write", action="store_true", help="rewrite README.md and calib_data/digits/README.md"
    )
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff when the shown outputs drift")
    parser.add_argument("--fast", action="store_true", help="leave out the blocks marked slow")
    args = parser.parse_args()
    return write(args.fast) if args.write else check(args.fast)


if __name__ == "__main__":
    sys.exit(main())
