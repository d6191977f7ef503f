#!/usr/bin/env python3
"""Writes tests/data/cifar10_samples/test_batch.bin: the 20 CIFAR-10 test images that the PyPI
package foolbox 3.3.4 (MIT licence) ships as PNGs (foolbox/data/cifar10_{index}_{label}.png,
the first 20 images of CIFAR-10's test set), in CIFAR-10's binary format: per image 1 label byte
and the 32x32 red, green and blue planes (3072 bytes), in index order.

It also prints, per image, the label, the sum of each plane and the RGB of pixels (0,0) and
(31,31), decoded here from the PNGs, which tests/cifar_reader.rs checks the reader against.

Usage: pip download --no-deps foolbox==3.3.4 -d /tmp/fb && cd /tmp/fb && unzip -q foolbox-3.3.4-py3-none-any.whl
       python3 scripts/make_cifar_samples.py /tmp/fb/foolbox/data [OUT_DIR]
Needs only the Python standard library (a minimal PNG decoder: 8-bit RGB/RGBA, no interlace).
"""
import os
import re
import struct
import sys
import zlib

src = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else "tests/data/cifar10_samples"


def decode_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (path, hdr)
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev, i = [], bytearray(stride), 0
    for _ in range(h):
        f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pr = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pr) & 255
            else:
                assert f == 0, f
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


files = sorted(f for f in os.listdir(src) if re.fullmatch(r"cifar10_\d+_\d\.png", f))
recs = []
for f in files:
    idx, label = map(int, re.fullmatch(r"cifar10_(\d+)_(\d)\.png", f).groups())
    w, h, bpp, rows = decode_png(os.path.join(src, f))
    assert (w, h) == (32, 32)
    planes = [bytes(rows[y][x * bpp + c] for y in range(32) for x in range(32)) for c in range(3)]
    recs.append((idx, label, planes))
recs.sort()
assert [r[0] for r in recs] == list(range(len(recs))), "expected consecutive indices"
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "test_batch.bin"), "wb") as fh:
    for _, label, planes in recs:
        fh.write(bytes([label]) + b"".join(planes))
print("// (label, [sum R, sum G, sum B], RGB at (0,0), RGB at (31,31))")
for _, label, p in recs:
    sums = [sum(pl) for pl in p]
    print(f"    ({label}, {sums}, [{p[0][0]}, {p[1][0]}, {p[2][0]}], [{p[0][1023]}, {p[1][1023]}, {p[2][1023]}]),")
