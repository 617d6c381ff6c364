"""A corpus of bad and odd inputs, all generated here: each one, alone and inside a list
of good images, gives a valid Classification (equal, where it has one, to the result of
what it means) or an InputError saying what is wrong; in a list the error names the
item's index. Plus: decompression bombs are refused from the header, every EXIF
orientation is applied, and PIL modes convert to the RGB a person would see."""
from __future__ import annotations

import io
import math
import re
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES
from PIL import Image, ImageFile

import guard
from guard.errors import InputError
from guard.inputs import MAX_PIXELS, to_tensor
from guard.preprocess import Preprocess


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- building inputs ----------------------------------------------------------------------

def rand(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) values, the same each time a case is built."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def pixels(height, width, seed=0, channels=3) -> np.ndarray:
    shape = (height, width, channels) if channels else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(tmp: Path, name: str, image: Image.Image, **options) -> Path:
    path = tmp / name
    image.save(path, **options)
    return path


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 grey PNG whose header (IHDR, CRC fixed) claims width x height."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small baseline JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(encoded(Image.fromarray(pixels(16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Binary alpha only (0 or 255), so the expected pixels are exact."""
    assert set(np.unique(alpha)) <= {0, 255}
    return np.where(alpha[..., None] == 255, rgb, 255).astype(np.uint8)


def rgba(tmp):
    rgb, alpha = pixels(30, 40, seed=11), (pixels(30, 40, seed=12, channels=0) > 127).astype(np.uint8) * 255
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), Image.fromarray(composite_on_white(rgb, alpha))


def la(tmp):
    grey = pixels(30, 40, seed=13, channels=0)
    alpha = (pixels(30, 40, seed=14, channels=0) > 127).astype(np.uint8) * 255
    expected = composite_on_white(np.repeat(grey[..., None], 3, axis=2), alpha)
    return Image.fromarray(np.dstack([grey, alpha]), "LA"), Image.fromarray(expected)


def palette_with_transparency(tmp):
    """A PNG whose palette entry 0 is transparent (tRNS chunk); P mode when read back."""
    rgb = pixels(30, 40, seed=15)
    image = Image.fromarray(rgb).quantize(colors=16)
    index = np.asarray(image)
    path = save(tmp, "transparent-palette.png", image, transparency=0)
    with Image.open(path) as opened:
        assert opened.mode == "P" and "transparency" in opened.info
    shown = np.asarray(image.convert("RGB"))
    expected = np.where((index == 0)[..., None], 255, shown).astype(np.uint8)
    return path, Image.fromarray(expected)


def hidden_under_transparency(tmp):
    """Fully transparent pixels over a random 'trigger': a person sees white, so must the model."""
    rgb = pixels(30, 40, seed=16)
    alpha = np.zeros((30, 40), np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), np.full((30, 40, 3), 255, np.uint8)


def sixteen_bit_png(tmp):
    """A 16-bit grey PNG with values v * 257 shows the same as the 8-bit image v."""
    grey = pixels(30, 40, seed=17, channels=0)
    path = save(tmp, "grey16.png", Image.fromarray(grey.astype(np.uint16) * 257))
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
    return path, grey


def sixteen_bit_big_endian(tmp):
    grey = pixels(30, 40, seed=18, channels=0)
    image = Image.frombytes("I;16B", (40, 30), (grey.astype(">u2") * 257).tobytes())
    return image, grey


def mode_i(tmp):
    grey = pixels(30, 40, seed=19, channels=0)
    image = Image.fromarray(grey.astype(np.int32) * 257)
    assert image.mode == "I"
    return image, grey


def mode_f(tmp):
    values = np.random.default_rng(20).random((30, 40), dtype=np.float32)
    image = Image.fromarray(values)
    assert image.mode == "F"
    return image, values


def cmyk_jpeg(tmp):
    path = save(tmp, "cmyk.jpg", Image.fromarray(pixels(30, 40, seed=21)).convert("CMYK"))
    with Image.open(path) as opened:
        assert opened.mode == "CMYK"
        return path, opened.convert("RGB")


def converted(mode: str, seed: int):
    """An image of `mode` and what Pillow's RGB conversion makes of it."""
    def make(tmp):
        image = Image.fromarray(pixels(30, 40, seed=seed)).convert(mode)
        assert image.mode == mode
        return image, image.convert("RGB")
    return make


def animated_gif(tmp):
    frames = [Image.fromarray(pixels(30, 40, seed=seed)).quantize(colors=32) for seed in (22, 23)]
    path = save(tmp, "animated.gif", frames[0], save_all=True, append_images=frames[1:])
    with Image.open(path) as opened:
        assert opened.n_frames == 2
        return path, opened.convert("RGB")


def corrupt_exif_png(tmp):
    """Pixels intact, EXIF block garbage: classified as stored (with a logged warning)."""
    array = pixels(30, 40, seed=24)
    return save(tmp, "bad-exif.png", Image.fromarray(array), exif=b"Exif\x00\x00garbagegarbage"), array


def truncated(fmt: str, keep: float):
    def make(tmp):
        data = encoded(Image.fromarray(pixels(64, 64, seed=25)), fmt)
        return write(tmp, f"truncated.{fmt.lower()}", data[:int(len(data) * keep)])
    return make


def damaged_jpeg_scan(tmp):
    """Flipped bytes inside the entropy-coded data: libjpeg conceals this, so either result is fine."""
    data = bytearray(encoded(Image.fromarray(pixels(64, 64, seed=26)), "JPEG"))
    for offset in range(len(data) // 2, len(data) // 2 + 40):
        data[offset] ^= 0xFF
    return write(tmp, "damaged.jpg", bytes(data))


def closed_lazy_image(tmp):
    path = save(tmp, "lazy.png", Image.fromarray(pixels(20, 20)))
    with Image.open(path) as image:  # the caller forgot image.load() inside the block
        pass
    return image


def big_endian_floats(tmp):
    values = np.random.default_rng(27).random((30, 40, 3))
    return values.astype(">f8"), values.astype(np.float32)


def flipped_view(tmp):
    array = pixels(30, 40, seed=28)
    return array[::-1, ::2], np.ascontiguousarray(array[::-1, ::2])


def read_only(tmp):
    array = pixels(30, 40, seed=29)
    view = array.view()
    view.flags.writeable = False
    return view, array


def matrix(tmp):
    grey = pixels(30, 40, seed=32, channels=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # numpy discourages np.matrix
        return np.asmatrix(grey), grey


def transposed_tensor(tmp):
    tensor = rand(3, 40, 30, seed=34).transpose(1, 2)
    assert not tensor.is_contiguous()
    return tensor, tensor.contiguous()


def grad_tensor(tmp):
    tensor = rand(3, 30, 40, seed=35).requires_grad_()
    return tensor, tensor.detach().clone()


def bytes_io_png(tmp):
    array = pixels(30, 40, seed=30)
    buffer = io.BytesIO(encoded(Image.fromarray(array), "PNG"))
    buffer.seek(7)  # read from the start whatever the position
    return buffer, array


def binary_file(tmp):
    array = pixels(9, 9, seed=33)
    handle = open(save(tmp, "f.png", Image.fromarray(array)), "rb")  # noqa: SIM115 - the test closes it
    return handle, array


def text_mode_file(tmp):
    return io.TextIOWrapper(io.BytesIO(encoded(Image.fromarray(pixels(8, 8)), "PNG")))


@dataclass(frozen=True)
class Case:
    """make(tmp_path) -> the input, or (input, what it must classify like).
    error: regex of the InputError's message; None: a valid Classification;
    ANY: either (a damaged JPEG may decode with concealed errors)."""
    make: Callable
    error: str | None = None


ANY = "either"
_NONE = object()

CASES = {
    # ---- files that are not (whole) images
    "zero-byte png": Case(lambda t: write(t, "empty.png", b""), r"empty\.png' is an empty file \(0 bytes\)"),
    "zero-byte jpeg": Case(lambda t: write(t, "empty.jpg", b""), r"empty\.jpg' is an empty file"),
    "png cut in half": Case(truncated("PNG", 0.5), r"truncated\.png' could not be decoded: it is truncated"),
    "jpeg cut in half": Case(truncated("JPEG", 0.5), r"truncated\.jpeg' could not be decoded: it is truncated"),
    "jpeg cut to 100 bytes": Case(truncated("JPEG", 0.03),
                                  r"truncated\.jpeg' is not an image Pillow can read: it is damaged"),
    "png cut after its header": Case(truncated("PNG", 0.01), r"truncated\.png' could not be decoded: it is truncated"),
    "png signature only": Case(lambda t: write(t, "sig.png", encoded(Image.new("L", (4, 4)), "PNG")[:8]),
                               r"sig\.png' is not an image Pillow can read: it is damaged"),
    "jpeg with damaged scan data": Case(damaged_jpeg_scan, ANY),
    "text file named .png": Case(lambda t: write(t, "notes.png", b"not an image\n"), r"notes\.png' is not an image"),
    "svg file": Case(lambda t: write(t, "logo.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
                     r"logo\.svg' is not an image Pillow can read: .* not in a format Pillow knows \(such as PNG"),
    "random bytes": Case(lambda t: write(t, "noise.bin", np.random.default_rng(1).bytes(4096)),
                         r"noise\.bin' is not an image"),
    "a directory": Case(lambda t: t, r"is a directory, not an image file"),
    "a missing path": Case(lambda t: t / "missing.jpg", r"missing\.jpg': no such file"),
    "a URL": Case(lambda t: "https://example.com/cat.jpg", r"no such file; URLs are not downloaded"),
    "a path with a NUL byte": Case(lambda t: str(t / "a\x00b.png"), r"is not a readable image .*null"),
    # ---- decompression bombs: refused from the header, before decoding
    "png claiming 9000 x 9000": Case(lambda t: write(t, "bomb.png", png_claiming(9000, 9000)),
                                     r"bomb\.png' is 9000 x 9000 = 81,000,000 pixels, more than"),
    "png claiming 10000 x 10000 (PIL warns)": Case(lambda t: write(t, "bomb.png", png_claiming(10000, 10000)),
                                                   r"bomb\.png' is 10000 x 10000 = 100,000,000 pixels"),
    "png claiming 30000 x 30000 (PIL refuses)": Case(lambda t: write(t, "bomb.png", png_claiming(30000, 30000)),
                                                     r"bomb\.png' is too large to decode safely"),
    "jpeg claiming 60000 x 60000": Case(lambda t: write(t, "bomb.jpg", jpeg_claiming(60000, 60000)),
                                        r"bomb\.jpg' is too large to decode safely"),
    "broadcast array 9000 x 9000": Case(lambda t: np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (9000, 9000, 3)),
                                        r"81,000,000 pixels, more than clip-guard accepts"),
    # ---- PIL modes
    "mode L": Case(converted("L", 1)),
    "mode 1": Case(converted("1", 2)),
    "mode P": Case(converted("P", 3)),
    "mode CMYK": Case(converted("CMYK", 4)),
    "mode YCbCr": Case(converted("YCbCr", 5)),
    "mode HSV": Case(converted("HSV", 6)),
    "mode RGBX": Case(converted("RGBX", 7)),
    "CMYK jpeg file": Case(cmyk_jpeg),
    "mode RGBA, on white": Case(rgba),
    "mode LA, on white": Case(la),
    "P png with a transparent colour, on white": Case(palette_with_transparency),
    "content under alpha 0 is not seen": Case(hidden_under_transparency),
    "16-bit grey png (I;16) scaled, not clipped": Case(sixteen_bit_png),
    "mode I;16B": Case(sixteen_bit_big_endian),
    "mode I as 16-bit grey": Case(mode_i),
    "mode I outside 0..65535": Case(lambda t: Image.fromarray(np.full((8, 8), 70000, np.int32)),
                                    r"mode I with values in \[70000, 70000\]"),
    "mode F in [0, 1]": Case(mode_f),
    "mode F on 0..255": Case(lambda t: Image.fromarray(np.full((8, 8), 200.0, np.float32)),
                             r"mode F\) has values in \[200, 200\]"),
    "mode F with NaN": Case(lambda t: Image.fromarray(np.full((8, 8), np.nan, np.float32)), r"NaN or infinite"),
    "animated gif: first frame": Case(animated_gif),
    "png with corrupt EXIF": Case(corrupt_exif_png),
    "PIL image whose file closed unloaded": Case(closed_lazy_image, r"file was closed before it was loaded"),
    # ---- sizes
    "1 x 1 png": Case(lambda t: save(t, "dot.png", Image.new("RGB", (1, 1), (200, 30, 40)))),
    "1 x 4000 png": Case(lambda t: save(t, "row.png", Image.fromarray(pixels(1, 4000)))),
    "4000 x 1 array": Case(lambda t: pixels(4000, 1)),
    "1 x 100000 strip": Case(lambda t: pixels(1, 100_000), r"aspect ratio \(100,000:1\) is too extreme"),
    "0 x 5 array": Case(lambda t: np.zeros((0, 5, 3), np.uint8), "empty"),
    "3 x 0 x 5 tensor": Case(lambda t: torch.zeros(3, 0, 5), "empty"),
    # ---- values
    "NaN array": Case(lambda t: np.full((8, 8, 3), np.nan), "NaN or infinite"),
    "+inf tensor": Case(lambda t: torch.full((3, 8, 8), math.inf), "NaN or infinite"),
    "-inf array": Case(lambda t: np.full((8, 8), -np.inf, np.float32), "NaN or infinite"),
    "NaN float16 tensor": Case(lambda t: torch.full((3, 8, 8), math.nan, dtype=torch.float16), "NaN or infinite"),
    "float array on 0..255": Case(lambda t: pixels(8, 8).astype(np.float32), r"must lie in \[0, 1\].*divide"),
    "float tensor slightly negative": Case(lambda t: torch.full((3, 8, 8), -0.01), r"\[-0.01, -0.01\]"),
    "float64 array in [0, 1]": Case(lambda t: (np.random.default_rng(2).random((30, 40, 3)),)),
    "float16 tensor": Case(lambda t: rand(3, 30, 40, seed=36, dtype=torch.float16)),
    "bfloat16 tensor": Case(lambda t: rand(3, 30, 40, seed=37, dtype=torch.bfloat16)),
    "big-endian float64 array": Case(big_endian_floats),
    # ---- dtypes
    "int64 tensor": Case(lambda t: torch.randint(0, 255, (3, 8, 8)), r"uint8 .* or float.*got torch\.int64"),
    "bool tensor": Case(lambda t: torch.ones(3, 8, 8, dtype=torch.bool), r"got torch\.bool"),
    "complex tensor": Case(lambda t: torch.rand(3, 8, 8, dtype=torch.complex64), r"got torch\.complex64"),
    "object array": Case(lambda t: np.full((8, 8, 3), None, dtype=object), r"got object"),
    "uint16 array": Case(lambda t: np.zeros((8, 8, 3), np.uint16), r"got uint16.*65535"),
    "int8 array": Case(lambda t: np.zeros((8, 8), np.int8), r"got int8"),
    # ---- shapes and layouts
    "4-D tensor for one image": Case(lambda t: torch.rand(1, 3, 8, 8), r"pass a batch as a list of CHW tensors"),
    "2-channel tensor": Case(lambda t: torch.rand(2, 8, 8), r"CHW with C = 1 or 3, got shape \(2, 8, 8\)"),
    "HWC tensor": Case(lambda t: torch.rand(8, 9, 3), r"channels-last \(HWC\): pass tensor\.permute"),
    "HxWx2 array": Case(lambda t: np.zeros((8, 8, 2), np.uint8), r"'LA'"),
    "HxWx4 array": Case(lambda t: np.zeros((8, 8, 4), np.uint8), r"for RGBA pass Image\.fromarray"),
    "CHW array": Case(lambda t: np.zeros((3, 8, 9), np.uint8), r"channels-first: pass array\.transpose"),
    "1-D array": Case(lambda t: np.zeros(64, np.uint8), r"HxW, HxWx1 or HxWx3, got shape \(64,\)"),
    "0-d array": Case(lambda t: np.array(0.5), r"got shape \(\)"),
    "negative-stride view": Case(flipped_view),
    "read-only array": Case(read_only),
    "Fortran-order array": Case(lambda t: (np.asfortranarray(pixels(30, 40, seed=31)), pixels(30, 40, seed=31))),
    "np.matrix": Case(matrix),
    "transposed tensor view": Case(transposed_tensor),
    "tensor requiring grad": Case(grad_tensor),
    "meta tensor": Case(lambda t: torch.empty(3, 8, 8, device="meta"), r"meta device"),
    "sparse tensor": Case(lambda t: torch.rand(3, 8, 8).to_sparse(), r"dense tensor.*to_dense"),
    # ---- other Python objects
    "encoded bytes": Case(lambda t: encoded(Image.new("RGB", (4, 4)), "PNG"), r"a bytes; .*io\.BytesIO\(data\)"),
    "bytearray": Case(lambda t: bytearray(b"\x89PNG"), r"a bytearray; .*io\.BytesIO"),
    "BytesIO of a png": Case(bytes_io_png),
    "BytesIO of garbage": Case(lambda t: io.BytesIO(b"garbage" * 10), r"the BytesIO holds no image"),
    "binary file handle": Case(binary_file),
    "text-mode file": Case(text_mode_file, r"open in text mode; open image files with mode 'rb'"),
    "None": Case(lambda t: _NONE, r"from a NoneType; expected a PIL image"),
    "dict": Case(lambda t: {"image": "x.png"}, r"from a dict"),
    "int": Case(lambda t: 7, r"from a int"),
    "numpy scalar": Case(lambda t: np.float32(0.5), r"from a float32"),
    "nested list of pixels": Case(lambda t: [[0, 255], [255, 0]], r"a list is a batch of images"),
}


def build(case: Case, tmp_path: Path):
    """(input, reference or None) for a case."""
    made = case.make(tmp_path)
    if made is _NONE:
        return None, None
    if isinstance(made, tuple):
        return made[0], (made[1] if len(made) > 1 else None)
    return made, None


def assert_valid(result) -> None:
    assert isinstance(result, guard.Classification)
    assert len(result.probs) == len(CLASSES) and all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in result.probs)
    assert sum(result.probs) == pytest.approx(1.0, abs=1e-5)
    assert result.index == max(range(len(CLASSES)), key=result.probs.__getitem__)
    assert result.label == CLASSES[result.index]


@pytest.fixture
def quiet_bomb_warnings():
    with warnings.catch_warnings():  # Pillow warns about the 100-megapixel header before clip-guard refuses it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30
    assert sum(case.error is None for case in CASES.values()) >= 10  # odd, yet classifiable
    assert sum(case.error not in (None, ANY) for case in CASES.values()) >= 30


@pytest.mark.parametrize("name", CASES)
def test_alone(model, tmp_path, name, quiet_bomb_warnings):
    case = CASES[name]
    item, reference = build(case, tmp_path)
    try:
        if case.error not in (None, ANY):
            with pytest.raises(InputError, match=case.error) as info:
                model.classify(item)
            assert "\n" not in str(info.value)
            return
        try:
            result = model.classify(item)
        except InputError:
            if case.error is ANY:
                return
            raise
        assert_valid(result)
        if reference is not None:
            # Exactly what it means: the same logits as the image it should be read as.
            torch.testing.assert_close(model.logits(item), model.logits(reference),
                                       atol=1e-6, rtol=0)
    finally:
        if hasattr(item, "close") and not isinstance(item, Image.Image):
            item.close()


@pytest.mark.parametrize("name", CASES)
def test_inside_a_list(model, tmp_path, name, quiet_bomb_warnings):
    case = CASES[name]
    item, _ = build(case, tmp_path)
    good = [pixels(30, 40, seed=100), torch.rand(3, 32, 32)]
    try:
        if case.error not in (None, ANY):
            with pytest.raises(InputError, match=r"^input 1: ") as info:
                model.classify([good[0], item, good[1]])
            assert re.search(case.error, str(info.value)), str(info.value)
            return
        try:
            results = model.classify([good[0], item, good[1]])
        except InputError as error:
            if case.error is ANY:
                assert str(error).startswith("input 1: ")
                return
            raise
        assert len(results) == 3
        for result in results:
            assert_valid(result)
        alone = model.classify(item)  # a file object is read from its start again
        np.testing.assert_allclose(results[1].probs, alone.probs, atol=1e-5)
        np.testing.assert_allclose(results[0].probs, model.classify(good[0]).probs, atol=1e-5)
    finally:
        if hasattr(item, "close") and not isinstance(item, Image.Image):
            item.close()


# --- EXIF orientation ---------------------------------------------------------------------

# EXIF orientation -> how to turn the stored pixels upright, written with numpy, not Pillow.
UPRIGHT = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # "rotate 90 degrees clockwise to display"
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_classifies_like_the_upright_image(model, tmp_path, fmt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path, f"photo.{fmt.lower()}", Image.fromarray(pixels(24, 56, seed=40)), exif=exif.tobytes())
    with Image.open(path) as stored:  # the pixels as stored (JPEG: as decoded), orientation not applied
        stored_pixels = np.asarray(stored.convert("RGB"))
    upright = np.ascontiguousarray(UPRIGHT[orientation](stored_pixels))
    assert model.classify(path).probs == model.classify(upright).probs  # identical, not merely close
    with Image.open(path) as image:  # a PIL image carrying the tag is turned the same way
        assert model.classify(image).probs == model.classify(upright).probs
    if orientation in (5, 6, 7, 8):  # the check can tell a turned image from the stored one
        assert model.classify(path).probs != model.classify(stored_pixels).probs


# --- decompression bombs ------------------------------------------------------------------

@pytest.mark.parametrize("data", [png_claiming(9000, 9000), png_claiming(10000, 10000), png_claiming(30000, 30000),
                                  jpeg_claiming(60000, 60000), png_claiming(2 ** 31 - 1, 2 ** 31 - 1)],
                         ids=["png 81 MP", "png 100 MP", "png 900 MP", "jpeg 3.6 GP", "png 2^62 pixels"])
def test_bombs_are_refused_from_the_header_without_decoding(model, tmp_path, monkeypatch, quiet_bomb_warnings, data):
    path = write(tmp_path, "bomb", data)

    def no_decoding(self):
        pytest.fail("a decompression bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    started = time.perf_counter()
    for item in (path, io.BytesIO(data)):
        with pytest.raises(InputError, match="too large to decode safely|more than clip-guard accepts"):
            model.classify(item)
    assert time.perf_counter() - started < 2.0


def test_pillows_bomb_warning_raised_as_an_error_is_an_input_error(model, tmp_path):
    path = write(tmp_path, "bomb.png", png_claiming(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(InputError, match=r"bomb\.png' is too large to decode safely.*MAX_PIXELS"):
            model.classify(path)


def test_the_pixel_limit_is_adjustable(model, monkeypatch):
    image = pixels(30, 40)
    model.classify(image)
    monkeypatch.setattr("guard.inputs.MAX_PIXELS", 1000)
    for item in (image, torch.from_numpy(image).permute(2, 0, 1), Image.fromarray(image)):
        with pytest.raises(InputError, match=r"40 x 30 = 1,200 pixels, more than clip-guard accepts \(1,000"):
            model.classify(item)
    assert MAX_PIXELS == 64 * 1024 * 1024  # the default


def test_extreme_aspect_ratios_are_fine_when_the_model_squashes(tiny_artifact, tmp_path):
    squash = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize_mode="squash")
    with guard.load(tiny_artifact.save(tmp_path / "squash", preprocess=squash), device="cpu") as squashing:
        assert_valid(squashing.classify(pixels(1, 100_000)))


# --- conversions in detail ----------------------------------------------------------------

def test_partial_transparency_is_blended_on_white(tmp_path):
    rgb = pixels(20, 30, seed=41)
    alpha = pixels(20, 30, seed=42, channels=0)
    got = to_tensor(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")).permute(1, 2, 0).numpy().astype(int)
    share = alpha[..., None] / 255.0
    expected = np.rint(rgb * share + 255 * (1 - share)).astype(int)
    assert np.abs(got - expected).max() <= 1  # Pillow's integer compositing rounds


def test_unreadable_exif_is_logged_and_ignored(model, tmp_path, caplog):
    path, array = corrupt_exif_png(tmp_path)
    with caplog.at_level("WARNING", logger="guard.inputs"):
        result = model.classify(path)
    assert result.probs == model.classify(array).probs
    assert "bad-exif.png" in caplog.text and "EXIF data is unreadable" in caplog.text


def test_the_callers_objects_are_left_as_they_were(model):
    array = pixels(30, 40, seed=43)
    tensor = rand(3, 30, 40, seed=44)
    image = Image.fromarray(np.dstack([array, np.full((30, 40), 128, np.uint8)]), "RGBA")
    copies = (array.copy(), tensor.clone(), image.copy())
    model.classify([array, tensor, image])
    assert np.array_equal(array, copies[0]) and torch.equal(tensor, copies[1])
    assert image.mode == "RGBA" and np.array_equal(np.asarray(image), np.asarray(copies[2]))
