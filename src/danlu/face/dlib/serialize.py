"""Reading dlib's serialization format (dlib/serialize.h, dlib/cuda/tensor.h, dlib/matrix/matrix.h) with numpy only.

dlib writes an object as the concatenation of its members' encodings, with no framing: a reader must know the type
it expects next, as dlib's own `deserialize(item, in)` does. The encodings (all little endian):

- integer (every C++ integral type but the char types: int, long, unsigned long, size_t, int64 ...): a control byte,
  then the absolute value in as few bytes as it needs (1 to 8; zero takes one byte, 0x00). The control byte's low 4
  bits are the byte count; its high bit (0x80) is the sign. 300 -> 02 2c 01; -3 -> 81 03.
- bool: one ASCII byte, '1' or '0'.
- char, signed char, unsigned char: the raw byte.
- float and double (float_details): two integers, the mantissa (int64, signed) and then the exponent (int16): the value
  is mantissa * 2**exponent, except exponent 32000 = +inf, 32001 = -inf, 32002 = NaN. (serialize.h's comment says
  "first the exponent and then the mantissa"; the code writes the mantissa first.) 0.6f -> 03 9a 99 99 81 18:
  10066330 * 2**-24. Files from before 2013 hold floats as ASCII text followed by a space; a control byte never has
  a bit of 0x70 set, ASCII digits always do, and that is how dlib (and `Reader.float`) tells the two apart.
- std::string and C strings: an integer length, then the bytes (no terminator).
- std::vector<T>, std::deque<T>, C arrays: an integer length, then each element; std::vector<char> and
  std::vector<unsigned char> are raw bytes after the length.
- dlib::matrix<T>: rows and columns as integers (newer dlib writes them negated: -rows, -cols), then the elements
  row by row, each in T's encoding (float_details for float).
- dlib::vector<T,2> (a point): x then y in T's encoding.
- resizable_tensor (the DNN's parameters): version 2 (an integer), num_samples, k, nr, nc (integers), then
  num_samples*k*nr*nc float32 values, 4-byte little-endian IEEE (not float_details), in (n, k, r, c) row-major order:
  a numpy array of shape (n, k, nr, nc) as is.
- alias_tensor (a view into a parameter tensor, shape only): version 1, then num_samples, k, nr, nc.

    r = Reader(Path("shape_predictor_5_face_landmarks.dat").read_bytes(), "shape_predictor_5_face_landmarks.dat")
    r.expect_int(1, "shape_predictor version")
    initial_shape = r.matrix()                      # (10, 1) float32: the mean shape, x0, y0, x1, y1 ...
    forests = r.vector(lambda: r.vector(tree))      # tree: a function of your own that reads one regression_tree
    r.end()                                         # DanluError unless every byte was read

Errors are DanluError, one line naming the file, the byte offset, what was found and what was expected.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Optional, TypeVar, Union

import numpy as np

from danlu.errors import DanluError

T = TypeVar("T")

_INF, _NINF, _NAN = 32000, 32001, 32002  # float_details' special exponents


class Reader:
    """A cursor over the bytes of a dlib-serialized object; each method reads one item and moves past it.

    `name` (a file name) and the byte offset are in every error message. `pos` is the offset of the next byte."""

    def __init__(self, data: Union[bytes, bytearray, memoryview], name: str = "<bytes>", pos: int = 0):
        self.data, self.name, self.pos = bytes(data), name, pos

    @classmethod
    def open(cls, path: Union[str, Path], what: str) -> "Reader":
        """A Reader over a file's bytes, named by its file name; one DanluError line (naming `what`, e.g. "shape
        predictor file") where it cannot be read."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DanluError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
        return cls(data, Path(path).name)

    # -- errors and raw bytes -------------------------------------------------------------------------------------

    def error(self, found: str, expected: str, at: Optional[int] = None) -> DanluError:
        """A DanluError naming the file, the offset, what was found and what was expected."""
        return DanluError(f"{self.name}: byte {self.pos if at is None else at}: {found}; expected {expected}")

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self.data) - self.pos

    def raw(self, n: int) -> bytes:
        """The next `n` bytes as they are."""
        if n < 0 or self.pos + n > len(self.data):
            raise self.error(f"{self.remaining} bytes left", f"{n} more bytes (the file is cut short)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def end(self) -> None:
        """Check that every byte was read (a format mismatch usually leaves some, or runs out)."""
        if self.remaining:
            raise self.error(f"{self.remaining} bytes left over", "the end of the serialized object")

    # -- scalars --------------------------------------------------------------------------------------------------

    def int(self) -> int:
        """An integer of any C++ integral type (signed or unsigned): control byte, then up to 8 value bytes."""
        # the hot path of every format (a shape predictor is a million of these): indexing, not raw()
        at, data = self.pos, self.data
        if at >= len(data):
            raise self.error("the end of the data", "an integer (the file is cut short)")
        control = data[at]
        size = control & 0x0F
        if size == 0 or size > 8:
            raise self.error(f"integer control byte 0x{control:02x} ({size} value bytes)", "1 to 8 value bytes", at)
        end = at + 1 + size
        if end > len(data):
            raise self.error(f"{len(data) - at - 1} bytes left", f"{size} integer bytes (the file is cut short)", at)
        value = int.from_bytes(data[at + 1:end], "little")
        self.pos = end
        return -value if control & 0x80 else value

    def expect_int(self, expected: Union[int, Collection[int]], what: str) -> int:
        """An integer that must be `expected` (one value or several), e.g. a version number; `what` names it."""
        at = self.pos
        value = self.int()
        allowed = (expected,) if isinstance(expected, int) else tuple(expected)
        if value not in allowed:
            raise self.error(f"{what} {value}", " or ".join(map(str, allowed)), at)
        return value

    def bool(self) -> bool:
        """A bool: the ASCII byte '1' or '0'."""
        at = self.pos
        ch = self.raw(1)
        if ch not in (b"0", b"1"):
            raise self.error(f"bool byte {ch!r}", "b'0' or b'1'", at)
        return ch == b"1"

    def byte(self) -> int:
        """A char / unsigned char: the raw byte (0..255)."""
        return self.raw(1)[0]

    def float(self) -> float:
        """A float or double (float_details: mantissa, then exponent); exact, as a Python float (a double)."""
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            return self._ascii_float()
        mantissa = self.int()
        at = self.pos
        exponent = self.int()
        if exponent < _INF:
            # ldexp is exact: a float's mantissa has 24 bits and a double's 53, both below float64's 53
            return math.ldexp(float(mantissa), exponent)
        if exponent in (_INF, _NINF, _NAN):
            return {_INF: math.inf, _NINF: -math.inf, _NAN: math.nan}[exponent]
        raise self.error(f"float exponent {exponent}", f"below {_INF} or one of {_INF}, {_NINF}, {_NAN}", at)

    def _ascii_float(self) -> float:
        # dlib before 2013: `in >> item` with precision 35, then one space; inf / ninf / NaN spelled out
        at = self.pos
        stop = self.data.find(b" ", self.pos, self.pos + 64)
        if stop < 0:
            raise self.error("an old-style (ASCII) float with no space after it", "text such as b'0.25 '", at)
        text = self.raw(stop - self.pos).decode("ascii", "replace")
        self.pos += 1  # the space
        special = {"inf": math.inf, "ninf": -math.inf, "NaN": math.nan}
        if text in special:
            return special[text]
        try:
            return float(text)
        except ValueError:
            raise self.error(f"old-style float text {text!r}", "a decimal number, inf, ninf or NaN", at) from None

    def string(self) -> str:
        """A std::string (length, then bytes), decoded as UTF-8 (undecodable bytes kept as surrogates)."""
        n = self.int()
        return self.raw(n).decode("utf-8", "surrogateescape")

    def expect_string(self, expected: Union[str, Collection[str]], what: str) -> str:
        """A string that must be one of `expected` (dlib's layer version tags: 'con_4', 'affine_2' ...)."""
        at = self.pos
        value = self.string()
        allowed = (expected,) if isinstance(expected, str) else tuple(expected)
        if value not in allowed:
            raise self.error(f"{what} {value!r}", " or ".join(repr(a) for a in allowed), at)
        return value

    # -- containers -----------------------------------------------------------------------------------------------

    def vector(self, item: Callable[[], T]) -> list[T]:
        """A std::vector (or deque, or C array): a length, then `item()` that many times.

            r.vector(r.int)                        # std::vector<unsigned long>
            r.vector(lambda: (r.float(), r.float()))   # std::vector<dlib::vector<float,2>>
        """
        return [item() for _ in range(self.int())]

    def byte_vector(self) -> bytes:
        """A std::vector<char> / std::vector<unsigned char>: a length, then raw bytes."""
        return self.raw(self.int())

    def matrix(self, item: Optional[Callable[[], object]] = None, dtype=np.float32) -> np.ndarray:
        """A dlib::matrix: (rows, cols) as integers (negated in the newer format), then the elements row by row, each
        read by `item` (default: float). Returns a (rows, cols) array of `dtype`."""
        at = self.pos
        nr, nc = self.int(), self.int()
        if (nr < 0) != (nc < 0) and nr != 0 and nc != 0:
            raise self.error(f"matrix size {nr} x {nc}", "both dimensions negated or neither", at)
        nr, nc = abs(nr), abs(nc)
        if nr * nc > self.remaining:  # every element takes at least one byte
            raise self.error(f"matrix size {nr} x {nc}", f"at most {self.remaining} elements (the bytes left)", at)
        read = item or self.float
        return np.array([read() for _ in range(nr * nc)], dtype=dtype).reshape(nr, nc)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        """A dlib::alias_tensor: version 1, then its shape (num_samples, k, nr, nc); it holds no data."""
        self.expect_int(1, "alias_tensor version")
        return self.int(), self.int(), self.int(), self.int()

    def tensor(self) -> np.ndarray:
        """A dlib::resizable_tensor: version 2, (num_samples, k, nr, nc), then float32 little-endian values.
        Returns a float32 array of shape (num_samples, k, nr, nc), row-major as dlib holds it."""
        at = self.pos
        self.expect_int(2, "tensor version")
        shape = (self.int(), self.int(), self.int(), self.int())
        if min(shape) < 0:
            raise self.error(f"tensor shape {shape}", "non-negative dimensions", at)
        count = math.prod(shape)
        if 4 * count > self.remaining:
            raise self.error(f"tensor shape {shape} ({4 * count} bytes)", f"at most {self.remaining} bytes", at)
        return np.frombuffer(self.raw(4 * count), dtype="<f4").astype(np.float32).reshape(shape)


def pack_int(value: int) -> bytes:
    """`value` in dlib's integer encoding (ser_helper::pack_int): for writing test data and checking a reader."""
    magnitude = abs(value)
    body = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    if len(body) > 8:
        raise DanluError(f"pack_int: {value} does not fit in 8 bytes; expected a 64-bit integer")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def pack_float(value: float, digits: int = 24) -> bytes:
    """`value` as dlib writes a float (digits=24: rounded to float32 first, as a C++ float holds it) or a double
    (digits=53): float_details' mantissa and exponent. pack_float(0.6) == bytes.fromhex('039a99998118')."""
    if digits == 24:
        value = float(np.float32(value))
    if math.isnan(value) or math.isinf(value):
        exponent = _NAN if math.isnan(value) else _INF if value > 0 else _NINF
        return pack_int(0) + pack_int(exponent)
    fraction, exp = math.frexp(value)
    mantissa, exponent = int(fraction * (1 << digits)), exp - digits  # int() truncates, as static_cast<int64>
    for _ in range(8):  # float_details drops whole zero bytes off the mantissa's low end
        if mantissa & 0xFF:
            break
        mantissa >>= 8  # exact: the low byte is zero (in two's complement too, as C++'s arithmetic shift)
        exponent += 8
    return pack_int(mantissa) + pack_int(exponent)
