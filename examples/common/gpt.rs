//! The examples' GPT-2-style decoder (learned positions, pre-LayerNorm blocks, GELU, causal
//! self-attention, output head tied to the token embedding), used by `gpt2` and `ddp`.

use super::nn;
use candle_core::{IndexOp, Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Config {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Positions (the preset's context length; training windows may be shorter).
    pub n_ctx: usize,
    pub vocab: usize,
}

/// The model.
pub struct Gpt {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<nn::Block>,
    ln_f: nn::LayerNorm,
    mask: Tensor,
    pub cfg: Config,
}

impl Gpt {
    pub fn new(cfg: Config, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            wte: embedding(cfg.vocab, cfg.n_embd, vb.pp("wte"))?,
            wpe: embedding(cfg.n_ctx, cfg.n_embd, vb.pp("wpe"))?,
            blocks: (0..cfg.n_layer)
                .map(|i| nn::Block::new(cfg.n_embd, cfg.n_head, 4, vb.pp(format!("h.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            ln_f: nn::LayerNorm::new(cfg.n_embd, vb.pp("ln_f"))?,
            mask: nn::causal_mask(cfg.n_ctx, vb.device())?,
            cfg,
        })
    }

    /// The device the model lives on.
    pub fn device(&self) -> &candle_core::Device {
        self.mask.device()
    }

    /// Logits `[b·t, vocab]` for token ids `idx: [b, t]`.
    pub fn forward(&self, idx: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = idx.dims2()?;
        let pos = Tensor::arange(0u32, t as u32, idx.device())?;
        let mut x =
            nn::f32(&self.wte.forward(idx)?)?.broadcast_add(&nn::f32(&self.wpe.forward(&pos)?)?)?;
        let mask = self.mask.i((..t, ..t))?.contiguous()?;
        for blk in &self.blocks {
            x = blk.forward(&x, Some(&mask))?;
        }
        let x = self.ln_f.forward(&x)?.reshape((b * t, self.cfg.n_embd))?;
        // The output head is the token embedding, transposed (weight tying).
        x.matmul(&nn::f32(self.wte.embeddings())?.t()?)
    }
}
