//! Loading weights from GGUF: quantized matrices, norms, biases; on the CPU, matrices are
//! repacked for this crate's batched kernel (`qmm`).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

use super::cpu::cpu_f32;
use super::qmm::PackedMatrix;

/// Reads tensors from a GGUF file, reporting progress.
pub(crate) struct WeightLoader<'a> {
    pub gguf: &'a mut GgufFile,
    pub device: &'a Device,
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

    /// Reads a quantized tensor, checking its type is runnable.
    pub fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        let t = self.gguf.tensor(name, self.device)?;
        self.count();
        check_runnable(name, t.dtype())?;
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
/// - On the CPU, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K weights are repacked at load
///   (exactly: same values) into `qmm`'s column panels and run through its tiled kernel for any
///   number of rows, single decodes included.
/// - Other types and devices run through candle. candle 0.11.1 runs Q6_K through repacked tiles
///   when there are several rows and through the compact kernel for one row; the two round
///   differently, so for such weights a single row is run as two (the row twice) so it always
///   takes the batched path. (On the CPU Q6_K is packed, so this only matters elsewhere.)
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    Packed(Arc<PackedMatrix>),
    Candle {
        inner: QMatMul,
        pad_single_row: bool,
    },
}

impl Linear {
    pub(crate) fn new(t: Arc<QTensor>) -> Result<Self> {
        let cpu = t.device().is_cpu();
        let (n, k) = t.shape().dims2()?;
        if cpu && PackedMatrix::supports(t.dtype(), k) {
            let packed = PackedMatrix::pack(t.dtype(), &t.data()?, n, k);
            return Ok(Self::Packed(Arc::new(packed)));
        }
        let pad_single_row = t.dtype() == GgmlDType::Q6K;
        Ok(Self::Candle {
            inner: QMatMul::from_arc(t)?,
            pad_single_row,
        })
    }
}

impl Linear {
    /// The packed matrices of `ws` if every one is packed (only then can they share a dispatch).
    fn all_packed<'a>(ws: &[&'a Linear]) -> Option<Vec<&'a PackedMatrix>> {
        ws.iter()
            .map(|w| match w {
                Self::Packed(p) => Some(p.as_ref()),
                Self::Candle { .. } => None,
            })
            .collect()
    }

    /// `x @ W^T` for each of `ws` (Q, K, V; gate, up): packed matrices share one quantization
    /// of `x` and one wake-up of the threads (`PackedMatrix::matmul_many`), with the same bits
    /// as one `forward` each.
    pub(crate) fn forward_many(ws: &[&Linear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let Some(packed) = Self::all_packed(ws) else {
            return ws.iter().map(|w| w.forward(x)).collect();
        };
        let (m, kx) = x.dims2()?;
        if let Some(w) = packed.iter().find(|w| w.k() != kx) {
            candle_core::bail!("matmul: input has {kx} columns, the weight {}", w.k());
        }
        let x = x.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let outs = {
            let (storage, layout) = x.storage_and_layout();
            PackedMatrix::matmul_many(
                &packed,
                &cpu_f32(&storage, layout, "packed matmul")?[..m * kx],
            )
        };
        outs.into_iter()
            .zip(&packed)
            .map(|(o, w)| Tensor::from_vec(o, (m, w.n()), x.device()))
            .collect()
    }

    /// `x @ W^T` for the `m` rows of `x` (`[m, k]`, row-major) on the host: packed matrices
    /// straight from and into plain buffers (the batched step's path: no tensor is made per
    /// product), others through candle. The bits of `forward`.
    pub(crate) fn apply(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        match self {
            Self::Packed(w) => {
                if x.len() != m * w.k() {
                    candle_core::bail!("matmul: {} values for {m} rows of {}", x.len(), w.k());
                }
                Ok(w.matmul_vec(x))
            }
            Self::Candle { .. } => {
                let t = Tensor::from_slice(x, (m, x.len() / m.max(1)), &candle_core::Device::Cpu)?;
                self.forward(&t)?.flatten_all()?.to_vec1::<f32>()
            }
        }
    }

    /// `apply` for each of `ws` on one input, packed ones together (`forward_many`'s sharing).
    pub(crate) fn apply_many(
        ws: &[&Linear],
        x: &[f32],
        m: usize,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let Some(packed) = Self::all_packed(ws) else {
            return ws.iter().map(|w| w.apply(x, m)).collect();
        };
        if let Some(w) = packed.iter().find(|w| x.len() != m * w.k()) {
            candle_core::bail!("matmul: {} values for {m} rows of {}", x.len(), w.k());
        }
        Ok(PackedMatrix::matmul_many(&packed, x))
    }

    /// Bytes one product reads from memory, and the same weights' bytes in the file's blocks.
    pub(crate) fn weight_bytes(&self) -> WeightBytes {
        match self {
            Self::Packed(w) => WeightBytes {
                streamed: w.bytes() as u64,
                file: w.file_bytes() as u64,
            },
            Self::Candle { inner, .. } => {
                let b = match inner {
                    QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                        t.elem_count() * t.dtype().size_in_bytes()
                    }
                } as u64;
                WeightBytes {
                    streamed: b,
                    file: b,
                }
            }
        }
    }
}

/// Weight bytes of a model or a matrix: what a decode step streams in our layout, and what the
/// same weights take in the GGUF file (what an engine reading the file's blocks streams).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightBytes {
    pub streamed: u64,
    pub file: u64,
}

impl std::ops::Add for WeightBytes {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            streamed: self.streamed + o.streamed,
            file: self.file + o.file,
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Packed(w) => {
                let (m, kx) = x.dims2()?;
                if kx != w.k() {
                    candle_core::bail!("matmul: input has {kx} columns, the weight {}", w.k());
                }
                let x = x.to_dtype(candle_core::DType::F32)?.contiguous()?;
                let out = {
                    let (storage, layout) = x.storage_and_layout();
                    w.matmul_vec(&cpu_f32(&storage, layout, "packed matmul")?[..m * kx])
                };
                Tensor::from_vec(out, (m, w.n()), x.device())
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

    /// The packed path against the exact product with the dequantized weights, next to candle's
    /// own quantized matmul: both quantize the activations (per 32 values here, per 256 for
    /// candle's K-quants), and ours must be at least about as close.
    #[test]
    fn packed_linear_matches_the_exact_product_at_least_as_well_as_candle() {
        let dev = Device::Cpu;
        let (n, k) = (37, 512);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 2654435761usize % 1000) as f32 / 1000.0 - 0.5) * 0.2)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let deq = q.dequantize(&dev).unwrap();
            let ours = Linear::new(q.clone()).unwrap();
            assert!(matches!(ours, Linear::Packed(_)), "{dtype:?} is not packed");
            let theirs = QMatMul::from_arc(q).unwrap();
            for m in [1, 3, 16] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 40503 % 997) as f32 / 997.0 - 0.5) * 4.0)
                    .collect();
                let x = Tensor::from_vec(x, (m, k), &dev).unwrap();
                let exact = x.matmul(&deq.t().unwrap()).unwrap();
                let err = |y: Tensor| -> f32 {
                    (y - &exact)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                };
                let scale = exact
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let e_ours = err(ours.forward(&x).unwrap());
                let e_theirs = err(theirs.forward(&x).unwrap());
                assert!(
                    e_ours <= 0.02 * scale && e_ours <= 1.5 * e_theirs + 1e-3 * scale,
                    "{dtype:?} m={m}: error {e_ours} (candle {e_theirs}, scale {scale})"
                );
            }
        }
    }
}
