//! Loading weights from GGUF: quantized matrices, norms, biases, with load-time requantization.
//!
//! candle 0.11.1 has no x86 SIMD dot product for Q4_1, Q5_0 and Q5_1; those tensors run through
//! scalar loops (measured 3-5x slower). We requantize them to Q8_0 when loading: Q8_0 has an AVX2
//! kernel, the extra memory is small at these model sizes, and the values change by less than one
//! Q8_0 step. `LoadOptions::requantize` turns this off.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

/// Reads tensors from a GGUF file, requantizing slow types and reporting progress.
pub(crate) struct WeightLoader<'a> {
    pub gguf: &'a mut GgufFile,
    pub device: &'a Device,
    pub requantize: bool,
    pub loaded: usize,
    pub on_tensor: &'a mut dyn FnMut(usize, usize),
}

impl WeightLoader<'_> {
    fn count(&mut self) {
        self.loaded += 1;
        let total = self.gguf.tensor_count();
        (self.on_tensor)(self.loaded, total);
    }

    /// Whether the file has tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.gguf.has_tensor(name)
    }

    /// Reads a quantized tensor, checking its type is runnable and requantizing slow ones.
    pub fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        let t = self.gguf.tensor(name, self.device)?;
        self.count();
        let dtype = t.dtype();
        check_runnable(name, dtype)?;
        if self.requantize && matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1) {
            let deq = t.dequantize(self.device)?;
            return Ok(QTensor::quantize(&deq, GgmlDType::Q8_0)?);
        }
        Ok(t)
    }

    /// Reads a matrix used as `x @ W^T`, checking its `[out, in]` shape.
    pub fn matmul(&mut self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear> {
        let t = self.qtensor(name)?;
        check_shape(name, t.shape().dims(), &[out_dim, in_dim])?;
        Linear::new(Arc::new(t))
    }

    /// Reads a vector (norm weight or bias) as f32.
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let t = self.gguf.tensor(name, self.device)?;
        self.count();
        let t = t.dequantize(self.device)?;
        check_shape(name, t.dims(), &[len])?;
        Ok(t)
    }

    /// Reads an optional vector (e.g. a bias that only some checkpoints have).
    pub fn opt_vector(&mut self, name: &str, len: usize) -> Result<Option<Tensor>> {
        if self.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }
}

fn check_runnable(name: &str, dtype: GgmlDType) -> Result<()> {
    // Q8_1 exists only as the activation side of dot products; candle has no matmul for it.
    if dtype == GgmlDType::Q8_1 {
        return Err(EngineError::UnsupportedQuantization {
            tensor: name.to_string(),
            dtype: format!("{dtype:?}"),
        });
    }
    Ok(())
}

pub(crate) fn check_shape(name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(EngineError::TensorShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        })
    }
}

/// A quantized `x @ W^T` whose result for a row never depends on the other rows.
///
/// - Q8_0 weights on the CPU (and Q4_1/Q5_0/Q5_1, requantized to Q8_0 at load) run through this
///   crate's tiled kernel (`q8mm`), which reuses each weight block across a tile of rows, except
///   where candle's own repacked VNNI tiles apply (inner dimension a multiple of 256, output a
///   multiple of 16, a VNNI CPU): those are faster still, and candle picks them for any number of
///   rows.
/// - Other types run through candle. candle 0.11.1 runs Q6_K through repacked tiles when there
///   are several rows and through the compact kernel for one row; the two round differently, so
///   a request would decode differently alone (one row per step) than in a batch. For such
///   weights a single row is run as two (the row twice) so it always takes the batched path.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    Q8 {
        w: Arc<QTensor>,
        n: usize,
        k: usize,
        /// candle's path, for single rows.
        single: QMatMul,
    },
    Candle {
        inner: QMatMul,
        pad_single_row: bool,
    },
}

impl Linear {
    pub(crate) fn new(t: Arc<QTensor>) -> Result<Self> {
        let cpu = t.device().is_cpu();
        let (n, k) = t.shape().dims2()?;
        if cpu
            && t.dtype() == GgmlDType::Q8_0
            && k.is_multiple_of(super::q8mm::QK)
            && !super::q8mm::candle_repacks_q8_0(n, k)
        {
            return Ok(Self::Q8 {
                single: QMatMul::from_arc(t.clone())?,
                w: t,
                n,
                k,
            });
        }
        let pad_single_row = t.dtype() == GgmlDType::Q6K && cpu;
        Ok(Self::Candle {
            inner: QMatMul::from_arc(t)?,
            pad_single_row,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Q8 { w, n, k, single } => {
                let (m, kx) = x.dims2()?;
                if m == 1 {
                    // Bit-identical to the tiled kernel (see `q8mm`), and faster for one row.
                    return single.forward(x);
                }
                if kx != *k {
                    candle_core::bail!("matmul: input has {kx} columns, the weight {k}");
                }
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; m * n];
                super::q8mm::matmul(&w.data()?, *n, *k, &xs, &mut out);
                Tensor::from_vec(out, (m, *n), x.device())
            }
            Self::Candle {
                inner,
                pad_single_row,
            } => {
                if *pad_single_row && x.rank() == 2 && x.dim(0)? == 1 {
                    let two = Tensor::cat(&[x, x], 0)?;
                    return inner.forward(&two)?.narrow(0, 0, 1);
                }
                inner.forward(x)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    /// The tiled kernel against candle's own Q8_0 matmul on the same quantized weights, for the
    /// weight types that are requantized to Q8_0 at load as well: bit-identical, for any number
    /// of rows (which lets single rows go through candle).
    #[test]
    fn tiled_q8_0_matches_candle() {
        let dev = Device::Cpu;
        let (n, k) = (37, 640);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 2654435761usize % 1000) as f32 / 1000.0 - 0.5) * 0.2)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
        for src in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q5_0] {
            let q = QTensor::quantize(&w, src).unwrap();
            let q8 = if src == GgmlDType::Q8_0 {
                q
            } else {
                QTensor::quantize(&q.dequantize(&dev).unwrap(), GgmlDType::Q8_0).unwrap()
            };
            let q8 = Arc::new(q8);
            assert!(matches!(
                Linear::new(q8.clone()).unwrap(),
                Linear::Q8 { .. }
            ));
            let theirs = QMatMul::from_arc(q8.clone()).unwrap();
            for m in [1, 3, 16] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 40503 % 997) as f32 / 997.0 - 0.5) * 4.0)
                    .collect();
                let x = Tensor::from_vec(x, (m, k), &dev).unwrap();
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut a = vec![0f32; m * n];
                super::super::q8mm::matmul(&q8.data().unwrap(), n, k, &xs, &mut a);
                let a: Vec<Vec<f32>> = a.chunks(n).map(<[f32]>::to_vec).collect();
                let b = theirs.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                for (ra, rb) in a.iter().zip(&b) {
                    for (va, vb) in ra.iter().zip(rb) {
                        assert_eq!(va.to_bits(), vb.to_bits(), "{src:?} m={m}: {va} vs {vb}");
                    }
                }
            }
        }
    }
}
