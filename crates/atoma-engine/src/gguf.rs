//! Opening GGUF files and reading their metadata and tensors, with errors that name the problem.
//!
//! candle's `gguf_file::Content` does the parsing; this module adds what an operator needs: a
//! magic-byte check, a truncation check over every tensor before any weight is read, and typed
//! metadata accessors that report the missing or mistyped key.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use crate::error::{EngineError, Result};

/// An open GGUF file: its parsed header and a reader for tensor data.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    /// Opens and validates a GGUF file: magic bytes, header, and that every tensor lies inside it.
    pub fn open(path: &Path) -> Result<Self> {
        let io_err = |source: std::io::Error| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                EngineError::NotFound {
                    path: path.to_path_buf(),
                }
            } else {
                io_err(source)
            }
        })?;
        let meta = file.metadata().map_err(io_err)?;
        if meta.is_dir() {
            return Err(EngineError::Malformed {
                path: path.to_path_buf(),
                reason: "it is a directory".into(),
            });
        }
        let file_len = meta.len();
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut reader, &mut magic).map_err(io_err)?;
        if n < 4 || &magic != b"GGUF" {
            return Err(EngineError::NotGguf {
                path: path.to_path_buf(),
                magic: magic[..n].to_vec(),
            });
        }
        reader.seek(SeekFrom::Start(0)).map_err(io_err)?;
        let content = Content::read(&mut reader).map_err(|e| EngineError::Malformed {
            path: path.to_path_buf(),
            reason: one_line(&e.to_string()),
        })?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let needed = content.tensor_data_offset + info.offset + bytes;
            if needed > file_len {
                return Err(EngineError::Truncated {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    needed,
                    actual: file_len,
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// The path this file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw metadata value under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| EngineError::MissingMetadata {
            key: key.to_string(),
        })
    }

    /// A string metadata value.
    pub fn string(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            other => Err(invalid(key, format!("expected a string, found {other:?}"))),
        }
    }

    /// An unsigned integer metadata value, whatever its stored width.
    pub fn usize(&self, key: &str) -> Result<usize> {
        value_to_u64(self.require(key)?)
            .map(|v| v as usize)
            .ok_or_else(|| invalid(key, "expected an unsigned integer".into()))
    }

    /// An optional unsigned integer metadata value.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_to_u64(v)
                .map(|v| Some(v as usize))
                .ok_or_else(|| invalid(key, "expected an unsigned integer".into())),
        }
    }

    /// A float metadata value.
    pub fn f32(&self, key: &str) -> Result<f32> {
        value_to_f64(self.require(key)?)
            .map(|v| v as f32)
            .ok_or_else(|| invalid(key, "expected a number".into()))
    }

    /// An optional float metadata value.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_to_f64(v)
                .map(|v| Some(v as f32))
                .ok_or_else(|| invalid(key, "expected a number".into())),
        }
    }

    /// An optional boolean metadata value.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => value_to_u64(v)
                .map(|v| Some(v != 0))
                .ok_or_else(|| invalid(key, "expected a boolean".into())),
        }
    }

    /// An array metadata value.
    pub fn array(&self, key: &str) -> Result<&[Value]> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            _ => Err(invalid(key, "expected an array".into())),
        }
    }

    /// Whether the file holds a tensor named `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The quantization type of tensor `name`.
    pub fn tensor_dtype(&self, name: &str) -> Option<GgmlDType> {
        self.content.tensor_infos.get(name).map(|t| t.ggml_dtype)
    }

    /// Number of tensors in the file.
    pub fn tensor_count(&self) -> usize {
        self.content.tensor_infos.len()
    }

    /// Reads tensor `name` onto `device`.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(EngineError::MissingTensor {
                name: name.to_string(),
            });
        }
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| EngineError::Malformed {
                path: self.path.clone(),
                reason: format!("tensor `{name}`: {}", one_line(&e.to_string())),
            })
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn invalid(key: &str, reason: String) -> EngineError {
    EngineError::InvalidMetadata {
        key: key.to_string(),
        reason,
    }
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// Converts any integer-typed GGUF value to u64 (negative values are rejected).
pub(crate) fn value_to_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(u64::from(*x)),
        Value::U16(x) => Some(u64::from(*x)),
        Value::U32(x) => Some(u64::from(*x)),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

/// Converts any numeric GGUF value to f64.
pub(crate) fn value_to_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(f64::from(*x)),
        Value::F64(x) => Some(*x),
        Value::I8(x) => Some(f64::from(*x)),
        Value::I16(x) => Some(f64::from(*x)),
        Value::I32(x) => Some(f64::from(*x)),
        Value::I64(x) => Some(*x as f64),
        other => value_to_u64(other).map(|x| x as f64),
    }
}

/// Converts any integer-typed GGUF value to i64.
pub(crate) fn value_to_i64(v: &Value) -> Option<i64> {
    match v {
        Value::I8(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::I64(x) => Some(*x),
        other => value_to_u64(other).and_then(|x| i64::try_from(x).ok()),
    }
}
