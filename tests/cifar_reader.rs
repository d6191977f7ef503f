//! The examples' CIFAR-10 binary-format reader (`examples/common/cifar.rs`), on files this test
//! writes itself, on 20 real CIFAR-10 test images (`tests/data/cifar10_samples`, from foolbox's
//! PNGs) and on the Fashion-MNIST subset bundled with the examples.

#[allow(dead_code)]
#[path = "../examples/common/cifar.rs"]
mod cifar;

use candle_core::Device;
use cifar::{load_dir, read_file, Split, RECORD};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("candle_optim_cifar_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A record whose pixel (c, y, x) is `(seed + 3c + 5y + 7x) mod 256`.
fn record(label: u8, seed: u8) -> Vec<u8> {
    let mut r = vec![label];
    for c in 0..3u32 {
        for y in 0..32u32 {
            for x in 0..32u32 {
                r.push(((seed as u32 + 3 * c + 5 * y + 7 * x) % 256) as u8);
            }
        }
    }
    assert_eq!(r.len(), RECORD);
    r
}

fn write(path: &Path, records: &[(u8, u8)]) {
    let bytes: Vec<u8> = records.iter().flat_map(|&(l, s)| record(l, s)).collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn reads_files_it_wrote() {
    let d = scratch("ok");
    write(&d.join("data_batch_1.bin"), &[(0, 1), (9, 2), (3, 3)]);
    write(&d.join("data_batch_2.bin"), &[(5, 4)]);
    write(&d.join("test_batch.bin"), &[(7, 5), (1, 6)]);
    let (train, test) = load_dir(&d).unwrap();
    assert_eq!(train.labels, vec![0, 9, 3, 5]);
    assert_eq!(test.labels, vec![7, 1]);
    assert_eq!(train.images.len(), 4 * 3072);
    // Record 3 (seed 4): channel 2, row 10, column 20.
    assert_eq!(
        train.images[3 * 3072 + 2 * 1024 + 10 * 32 + 20],
        4 + 6 + 50 + 140
    );
    // Batches come out as [n, 3, 32, 32], normalised per channel, in the order asked.
    let (x, y) = train
        .batch(&[3, 0], [0.5, 0.0, 0.25], [0.5, 1.0, 2.0], &Device::Cpu)
        .unwrap();
    assert_eq!(x.dims(), &[2, 3, 32, 32]);
    assert_eq!(y.to_vec1::<u32>().unwrap(), vec![5, 0]);
    let flat = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let v = |n: usize, c: usize, yy: usize, xx: usize| flat[n * 3072 + c * 1024 + yy * 32 + xx];
    let px = |seed: u32, c: u32, yy: u32, xx: u32| {
        ((seed + 3 * c + 5 * yy + 7 * xx) % 256) as f32 / 255.0
    };
    assert!((v(0, 0, 1, 2) - (px(4, 0, 1, 2) - 0.5) / 0.5).abs() < 1e-6);
    assert!((v(0, 2, 31, 31) - (px(4, 2, 31, 31) - 0.25) / 2.0).abs() < 1e-6);
    assert!((v(1, 1, 0, 0) - px(1, 1, 0, 0)).abs() < 1e-6);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn reads_gzip_files() {
    let d = scratch("gz");
    let raw: Vec<u8> = [(2u8, 9u8), (4, 8)]
        .iter()
        .flat_map(|&(l, s)| record(l, s))
        .collect();
    for name in ["data_batch_1.bin.gz", "test_batch.bin.gz"] {
        let f = std::fs::File::create(d.join(name)).unwrap();
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        gz.finish().unwrap();
    }
    let (train, test) = load_dir(&d).unwrap();
    assert_eq!(train.labels, vec![2, 4]);
    assert_eq!(
        test.images,
        raw.chunks(RECORD)
            .flat_map(|r| r[1..].to_vec())
            .collect::<Vec<_>>()
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn rejects_truncated_files() {
    let d = scratch("trunc");
    write(&d.join("data_batch_1.bin"), &[(1, 1), (2, 2)]);
    write(&d.join("test_batch.bin"), &[(1, 1)]);
    let p = d.join("data_batch_1.bin");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.truncate(bytes.len() - 100);
    std::fs::write(&p, &bytes).unwrap();
    let err = load_dir(&d).unwrap_err();
    assert!(err.contains("truncated"), "{err}");
    assert!(err.contains("data_batch_1.bin"), "{err}");
    // An empty file, and one byte too many, fail too.
    let mut s = Split::default();
    assert!(s.push_bytes(&[], "empty").is_err());
    let mut one_more = record(1, 1);
    one_more.push(0);
    assert!(s.push_bytes(&one_more, "long").is_err());
    assert!(s.is_empty());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn rejects_labels_of_ten_and_more() {
    let d = scratch("label");
    write(&d.join("data_batch_1.bin"), &[(1, 1)]);
    write(&d.join("test_batch.bin"), &[(3, 1), (10, 2)]);
    let err = load_dir(&d).unwrap_err();
    assert!(err.contains("record 1 has label 10"), "{err}");
    let mut s = Split::default();
    s.push_bytes(&record(4, 4), "good").unwrap();
    assert!(s.push_bytes(&record(255, 4), "bad").is_err());
    // A failed file leaves what was read before untouched.
    assert_eq!(s.labels, vec![4]);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn reports_missing_files() {
    let d = scratch("missing");
    assert!(load_dir(&d).unwrap_err().contains("no data_batch"));
    write(&d.join("data_batch_3.bin"), &[(1, 1)]);
    assert!(load_dir(&d).unwrap_err().contains("no test_batch"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn augmentation_without_shift_or_flip_is_the_plain_batch() {
    let mut s = Split::default();
    s.push_bytes(&[record(1, 10), record(2, 20)].concat(), "mem")
        .unwrap();
    let (m, sd) = ([0.3, 0.4, 0.5], [0.2, 0.3, 0.4]);
    let (plain, _) = s.batch(&[1, 0], m, sd, &Device::Cpu).unwrap();
    // below(9) = 4 is a zero shift, below(2) = 0 no flip.
    let mut centre = |n: usize| if n == 9 { 4 } else { 0 };
    let (aug, y) = s
        .batch_augmented(&[1, 0], m, sd, &Device::Cpu, &mut centre)
        .unwrap();
    assert_eq!(y.to_vec1::<u32>().unwrap(), vec![2, 1]);
    let a = aug.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let p = plain.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, p);
    // A flip mirrors every row.
    let mut flip = |n: usize| if n == 9 { 4 } else { 1 };
    let (f, _) = s
        .batch_augmented(&[0], m, sd, &Device::Cpu, &mut flip)
        .unwrap();
    let f = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for c in 0..3 {
        for r in 0..32 {
            for x in 0..32 {
                assert_eq!(
                    f[c * 1024 + r * 32 + x],
                    p[3072 + c * 1024 + r * 32 + 31 - x]
                );
            }
        }
    }
}

/// (label, per-plane sums, RGB at (0,0), RGB at (31,31)) of CIFAR-10's first 20 test images,
/// decoded from foolbox's PNGs by scripts/make_cifar_samples.py.
type Sample = (u8, [u32; 3], [u8; 3], [u8; 3]);
const SAMPLES: [Sample; 20] = [
    (3, [112665, 113426, 106871], [158, 112, 49], [21, 67, 110]),
    (
        8,
        [154250, 157831, 164418],
        [235, 235, 235],
        [186, 200, 199],
    ),
    (8, [123929, 136371, 146952], [158, 190, 222], [7, 8, 7]),
    (0, [155730, 154167, 165676], [155, 156, 149], [73, 68, 50]),
    (6, [110456, 124990, 94392], [65, 68, 50], [128, 156, 117]),
    (6, [138461, 90278, 71736], [179, 118, 83], [152, 87, 73]),
    (1, [108780, 63652, 59879], [160, 37, 13], [29, 30, 28]),
    (6, [100761, 100327, 65424], [83, 94, 85], [72, 38, 22]),
    (3, [177611, 165320, 147846], [23, 19, 23], [150, 132, 118]),
    (
        1,
        [141306, 139243, 162340],
        [217, 215, 209],
        [186, 185, 223],
    ),
    (0, [124621, 146627, 159880], [90, 124, 149], [89, 120, 146]),
    (
        9,
        [141898, 132933, 130917],
        [255, 255, 251],
        [203, 176, 157],
    ),
    (5, [108799, 97021, 79250], [91, 64, 30], [28, 31, 50]),
    (7, [78393, 75276, 71851], [35, 36, 31], [7, 4, 4]),
    (9, [109703, 114452, 112380], [200, 169, 75], [132, 121, 94]),
    (8, [115640, 150631, 124717], [203, 223, 217], [2, 35, 24]),
    (5, [142707, 125853, 123990], [95, 76, 78], [22, 11, 28]),
    (7, [139347, 134135, 129294], [60, 128, 147], [212, 210, 196]),
    (8, [137138, 140480, 149693], [223, 225, 248], [56, 95, 118]),
    (6, [135403, 114293, 85048], [55, 38, 46], [215, 189, 148]),
];

#[test]
fn reads_real_cifar10_test_images() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/cifar10_samples");
    let bytes = read_file(&dir.join("test_batch.bin")).unwrap();
    let mut s = Split::default();
    s.push_bytes(&bytes, "test_batch.bin").unwrap();
    assert_eq!(s.len(), 20);
    for (i, (label, sums, first, last)) in SAMPLES.iter().enumerate() {
        assert_eq!(s.labels[i], *label, "label of image {i}");
        let img = &s.images[i * 3072..(i + 1) * 3072];
        for c in 0..3 {
            let plane = &img[c * 1024..(c + 1) * 1024];
            assert_eq!(
                plane.iter().map(|&v| v as u32).sum::<u32>(),
                sums[c],
                "image {i} plane {c}"
            );
            assert_eq!(plane[0], first[c], "image {i} plane {c} pixel (0,0)");
            assert_eq!(plane[1023], last[c], "image {i} plane {c} pixel (31,31)");
        }
    }
    // Through a whole-directory load too (test_batch only is not enough for load_dir).
    let d = scratch("real");
    std::fs::write(d.join("data_batch_1.bin"), &bytes).unwrap();
    std::fs::write(d.join("test_batch.bin"), &bytes).unwrap();
    let (train, test) = load_dir(&d).unwrap();
    assert_eq!(train.labels, test.labels);
    assert_eq!(train.class_counts().iter().sum::<usize>(), 20);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn reads_the_bundled_fashion_mnist_subset() {
    let (train, test) = load_dir(&cifar::bundled_dir()).unwrap();
    assert_eq!((train.len(), test.len()), (8000, 2000));
    assert!(train.class_counts().iter().all(|&n| n > 600));
    // Grey images: the three planes are equal, and the 2-pixel border is black.
    let img = &train.images[..3072];
    assert_eq!(img[..1024], img[1024..2048]);
    assert_eq!(img[..1024], img[2048..]);
    assert!(img[..64].iter().all(|&v| v == 0));
}
