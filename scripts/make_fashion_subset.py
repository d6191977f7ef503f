#!/usr/bin/env python3
"""Writes the Fashion-MNIST subset that ships with the examples, in the CIFAR-10 binary format.

Source: Debian's `dataset-fashion-mnist` (Zalando Research, MIT licence), in
/usr/share/datasets/fashion-mnist. Each 28x28 grey image is padded with 2 zero pixels on every
side to 32x32 and repeated as the R, G and B planes, so a record is 1 label byte + 3072 bytes,
exactly like CIFAR-10's `data_batch_*.bin`. The files are gzip-compressed (the example's reader
accepts `.bin` and `.bin.gz`). The first N_TRAIN training and N_TEST test images are taken, in
the original order.

Usage: python3 scripts/make_fashion_subset.py [SRC_DIR] [OUT_DIR]
"""
import gzip
import os
import struct
import sys

N_TRAIN, N_TEST = 8000, 2000
src = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
out = sys.argv[2] if len(sys.argv) > 2 else "examples/data/fashion-mnist"


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:  # images
        rows, cols = struct.unpack(">II", data[8:16])
        return [data[16 + i * rows * cols: 16 + (i + 1) * rows * cols] for i in range(n)]
    return list(data[8:8 + n])  # labels


def record(label, img):
    rows = [bytes(32) * 2]
    for r in range(28):
        rows.append(bytes(2) + img[r * 28:(r + 1) * 28] + bytes(2))
    rows.append(bytes(32) * 2)
    plane = b"".join(rows)
    return bytes([label]) + plane * 3


def write(name, images, labels, n):
    path = os.path.join(out, name)
    # mtime=0: the same bytes on every run.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        for img, lab in zip(images[:n], labels[:n]):
            f.write(record(lab, img))
    print(path, os.path.getsize(path), "bytes")


os.makedirs(out, exist_ok=True)
write("data_batch_1.bin.gz", idx(f"{src}/train-images-idx3-ubyte.gz"), idx(f"{src}/train-labels-idx1-ubyte.gz"), N_TRAIN)
write("test_batch.bin.gz", idx(f"{src}/t10k-images-idx3-ubyte.gz"), idx(f"{src}/t10k-labels-idx1-ubyte.gz"), N_TEST)
