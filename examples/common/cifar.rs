//! A reader for the CIFAR-10 binary format: files of records of 1 label byte followed by
//! 3072 bytes (the 32×32 red, green and blue planes). Accepts plain `.bin` files and gzip
//! `.bin.gz` files (the Fashion-MNIST subset that ships with the examples).

use candle_core::{Device, Tensor};
use std::io::Read;
use std::path::Path;

/// Bytes per record: 1 label + 3 × 32 × 32.
pub const RECORD: usize = 1 + 3 * 32 * 32;

/// Decoded images (`[n, 3, 32, 32]` bytes, planes as stored) and labels.
#[derive(Clone, Debug, Default)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Appends the records of one file's bytes. Rejects a length that is not a whole number of
    /// records and labels ≥ 10; on error `self` is unchanged.
    pub fn push_bytes(&mut self, bytes: &[u8], what: &str) -> Result<(), String> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
            return Err(format!(
                "{what}: {} bytes is not a whole number of {RECORD}-byte CIFAR records (truncated?)",
                bytes.len()
            ));
        }
        for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
            if rec[0] >= 10 {
                return Err(format!(
                    "{what}: record {i} has label {} (must be < 10)",
                    rec[0]
                ));
            }
        }
        for rec in bytes.chunks_exact(RECORD) {
            self.labels.push(rec[0]);
            self.images.extend_from_slice(&rec[1..]);
        }
        Ok(())
    }

    /// Images as `[idx.len(), 3, 32, 32]` f32, scaled to [0, 1] and normalised per channel,
    /// and labels as u32.
    pub fn batch(
        &self,
        idx: &[usize],
        mean: [f32; 3],
        std: [f32; 3],
        dev: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let mut x = Vec::with_capacity(idx.len() * 3072);
        let mut y = Vec::with_capacity(idx.len());
        for &i in idx {
            let img = &self.images[i * 3072..(i + 1) * 3072];
            for c in 0..3 {
                for &v in &img[c * 1024..(c + 1) * 1024] {
                    x.push((v as f32 / 255.0 - mean[c]) / std[c]);
                }
            }
            y.push(self.labels[i] as u32);
        }
        Ok((
            Tensor::from_vec(x, (idx.len(), 3, 32, 32), dev)?,
            Tensor::from_vec(y, idx.len(), dev)?,
        ))
    }

    /// Like [`batch`](Self::batch), with the standard CIFAR augmentation: a random 32×32 crop
    /// of the image padded by 4 pixels of zeros (after normalisation), and a horizontal flip
    /// with probability ½; `below(n)` draws a uniform integer in `0..n`.
    pub fn batch_augmented(
        &self,
        idx: &[usize],
        mean: [f32; 3],
        std: [f32; 3],
        dev: &Device,
        below: &mut dyn FnMut(usize) -> usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let mut x = vec![0f32; idx.len() * 3072];
        let mut y = Vec::with_capacity(idx.len());
        for (n, &i) in idx.iter().enumerate() {
            let img = &self.images[i * 3072..(i + 1) * 3072];
            let dy = below(9) as isize - 4;
            let dx = below(9) as isize - 4;
            let flip = below(2) == 1;
            let out = &mut x[n * 3072..(n + 1) * 3072];
            for c in 0..3 {
                for r in 0..32isize {
                    for col in 0..32isize {
                        let (sr, sc) = (r + dy, if flip { 31 - col } else { col } + dx);
                        let v = if (0..32).contains(&sr) && (0..32).contains(&sc) {
                            (img[c * 1024 + (sr * 32 + sc) as usize] as f32 / 255.0 - mean[c])
                                / std[c]
                        } else {
                            0.0
                        };
                        out[c * 1024 + (r * 32 + col) as usize] = v;
                    }
                }
            }
            y.push(self.labels[i] as u32);
        }
        Ok((
            Tensor::from_vec(x, (idx.len(), 3, 32, 32), dev)?,
            Tensor::from_vec(y, idx.len(), dev)?,
        ))
    }

    /// The first `n` records (all if fewer).
    pub fn head(&self, n: usize) -> Split {
        let n = n.min(self.len());
        Split {
            images: self.images[..n * 3072].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }

    /// Images per class.
    pub fn class_counts(&self) -> [usize; 10] {
        let mut c = [0; 10];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }
}

/// Reads one file (`.bin` or `.bin.gz`).
pub fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Finds `stem.bin` or `stem.bin.gz` in `dir`.
fn find(dir: &Path, stem: &str) -> Option<std::path::PathBuf> {
    [format!("{stem}.bin"), format!("{stem}.bin.gz")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
}

/// Loads `data_batch_{1..5}` (those present; at least one) and `test_batch` from `dir`.
pub fn load_dir(dir: &Path) -> Result<(Split, Split), String> {
    let mut train = Split::default();
    for i in 1..=5 {
        if let Some(p) = find(dir, &format!("data_batch_{i}")) {
            train.push_bytes(&read_file(&p)?, &p.display().to_string())?;
        }
    }
    if train.is_empty() {
        return Err(format!("{}: no data_batch_*.bin files", dir.display()));
    }
    let p =
        find(dir, "test_batch").ok_or_else(|| format!("{}: no test_batch.bin", dir.display()))?;
    let mut test = Split::default();
    test.push_bytes(&read_file(&p)?, &p.display().to_string())?;
    Ok((train, test))
}

/// The Fashion-MNIST subset shipped with the examples (CIFAR format, gzip).
pub fn bundled_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/fashion-mnist")
}
