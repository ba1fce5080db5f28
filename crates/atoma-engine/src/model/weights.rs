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
/// candle 0.11.1 runs Q6_K through repacked tiles when there are several rows and through the
/// compact kernel for one row; the two round differently, so a request would decode differently
/// alone (one row per step) than in a batch. For such weights a single row is run as two (the
/// row twice) so it always takes the batched path. Every other type uses one code path for any
/// number of rows.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    inner: QMatMul,
    pad_single_row: bool,
}

impl Linear {
    pub(crate) fn new(t: Arc<QTensor>) -> Result<Self> {
        let pad_single_row = t.dtype() == GgmlDType::Q6K && t.device().is_cpu();
        Ok(Self {
            inner: QMatMul::from_arc(t)?,
            pad_single_row,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.pad_single_row && x.rank() == 2 && x.dim(0)? == 1 {
            let two = Tensor::cat(&[x, x], 0)?;
            return self.inner.forward(&two)?.narrow(0, 0, 1);
        }
        self.inner.forward(x)
    }
}
