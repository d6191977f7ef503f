//! The gpt2 example's text: the bundled public-domain corpus (or any text file), GPT-2's BPE
//! (tiktoken-rs' `r50k_base`, compiled in), a train/validation split and an optional compact
//! vocabulary of only the token ids that occur.

use super::Result;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// GPT-2's vocabulary size.
pub const GPT2_VOCAB: usize = 50257;
/// `<|endoftext|>`, put between documents.
pub const EOT: u32 = 50256;

/// The corpus bundled with the repository (`examples/data/text`).
pub fn bundled_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/text")
}

/// The bundled texts, in this order.
pub const BUNDLED: [&str; 3] = ["alice29.txt.gz", "asyoulik.txt.gz", "plrabn12.txt.gz"];

/// Reads a text file (gzip if it ends in `.gz`), as UTF-8 (invalid bytes replaced), with CRLF
/// line ends turned into LF.
pub fn read_text(path: &Path) -> Result<String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        out
    } else {
        raw
    };
    Ok(String::from_utf8_lossy(&bytes).replace("\r\n", "\n"))
}

/// Token ids of a corpus, split for training and validation.
pub struct Corpus {
    /// What it is, for messages.
    pub description: String,
    /// Training tokens (documents separated by `<|endoftext|>`), in GPT-2 ids.
    pub train: Vec<u32>,
    /// Validation tokens: the last `val_fraction` of every document.
    pub val: Vec<u32>,
}

/// Tokenises `docs` with GPT-2's BPE and holds out the last `val_fraction` of each one.
pub fn tokenize(
    docs: &[(String, String)],
    val_fraction: f64,
    description: String,
) -> Result<Corpus> {
    let bpe = tiktoken_rs::r50k_base_singleton();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (name, text) in docs {
        let ids: Vec<u32> = bpe.encode_ordinary(text);
        if ids.len() < 20 {
            return Err(format!("{name}: only {} tokens", ids.len()).into());
        }
        let n_val = ((ids.len() as f64 * val_fraction).round() as usize).max(1);
        let cut = ids.len() - n_val;
        if !train.is_empty() {
            train.push(EOT);
        }
        train.extend_from_slice(&ids[..cut]);
        if !val.is_empty() {
            val.push(EOT);
        }
        val.extend_from_slice(&ids[cut..]);
    }
    Ok(Corpus {
        description,
        train,
        val,
    })
}

/// The bundled corpus, or the file `text`.
pub fn load(text: Option<&Path>, val_fraction: f64) -> Result<Corpus> {
    let docs: Vec<(String, String)> = match text {
        Some(p) => vec![(p.display().to_string(), read_text(p)?)],
        None => BUNDLED
            .iter()
            .map(|f| {
                let p = bundled_dir().join(f);
                Ok((f.to_string(), read_text(&p)?))
            })
            .collect::<Result<_>>()?,
    };
    let chars: usize = docs.iter().map(|d| d.1.len()).sum();
    let description = match text {
        Some(p) => format!("{} ({} kB of text)", p.display(), chars / 1000),
        None => format!(
            "the public-domain corpus bundled with the repo (examples/data/text: Alice in \
             Wonderland, As You Like It, Paradise Lost; {} kB of text)",
            chars / 1000
        ),
    };
    tokenize(&docs, val_fraction, description)
}

/// Maps GPT-2 token ids to the model's ids: either all 50257, or only those that occur in the
/// corpus (a smaller output layer, for the CPU presets).
pub struct Vocab {
    /// Model id → GPT-2 id.
    pub to_gpt2: Vec<u32>,
    from_gpt2: HashMap<u32, u32>,
    pub full: bool,
}

impl Vocab {
    pub fn full() -> Self {
        Vocab {
            to_gpt2: (0..GPT2_VOCAB as u32).collect(),
            from_gpt2: HashMap::new(),
            full: true,
        }
    }

    /// The GPT-2 ids occurring in `corpus`, in increasing order.
    pub fn of_corpus(corpus: &Corpus) -> Self {
        let mut seen = vec![false; GPT2_VOCAB];
        for &t in corpus.train.iter().chain(&corpus.val) {
            seen[t as usize] = true;
        }
        seen[EOT as usize] = true;
        let to_gpt2: Vec<u32> = (0..GPT2_VOCAB as u32)
            .filter(|&t| seen[t as usize])
            .collect();
        let from_gpt2 = to_gpt2
            .iter()
            .enumerate()
            .map(|(i, &t)| (t, i as u32))
            .collect();
        Vocab {
            to_gpt2,
            from_gpt2,
            full: false,
        }
    }

    pub fn len(&self) -> usize {
        self.to_gpt2.len()
    }

    pub fn is_empty(&self) -> bool {
        self.to_gpt2.is_empty()
    }

    /// GPT-2 ids → model ids.
    pub fn encode(&self, ids: &[u32]) -> Vec<u32> {
        if self.full {
            ids.to_vec()
        } else {
            ids.iter().map(|t| self.from_gpt2[t]).collect()
        }
    }

    /// Model ids → text.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bpe = tiktoken_rs::r50k_base_singleton();
        let gpt2: Vec<u32> = ids.iter().map(|&i| self.to_gpt2[i as usize]).collect();
        bpe.decode(&gpt2).unwrap_or_else(|_| {
            String::from_utf8_lossy(
                &bpe._decode_native_and_split(gpt2)
                    .flatten()
                    .collect::<Vec<u8>>(),
            )
            .into_owned()
        })
    }
}
