//! Atoma's inference engine: runs GGUF language models on candle, with no knowledge of HTTP,
//! ledgers or networks.
//!
//! Layers, bottom-up: `gguf` (validated file access) → `tokenizer` (SPM and byte-level BPE from
//! metadata) and `chat` (templates) → `model` (the single-sequence reference transformer for
//! llama, qwen2, gemma3, phi3) → `sampling` (seeded, deterministic) → `generate` (one request's
//! loop, stop handling, events) → `engine` (a worker thread behind a bounded queue).

pub mod chat;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod grammar;
pub mod loaded;
pub mod model;
pub mod sampling;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tokenizer;
pub mod tools;
pub mod verify;

pub use chat::{ChatMessage, ChatTemplate, Role};
pub use engine::{
    Engine, EngineConfig, EngineStats, GenerationStream, NUMERICS_VERSION, VerifyHandle,
};
pub use error::{EngineError, Result};
pub use generate::{
    FinishReason, Finished, GenerateRequest, GenerationEvent, Timings, TokenEvent, Usage,
    run_generation,
};
pub use grammar::{GrammarCompiler, GrammarSpec};
pub use loaded::{LoadedModel, ModelInfo};
pub use model::{
    Architecture, BatchSeq, KernelChoice, KvCache, KvDtype, LoadOptions, Model, ModelConfig,
    PagedKv, WeightBytes, cpu_matmul_kernel, select_kernel,
};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{DecodeStream, TokenId, Tokenizer};
pub use tools::{ToolCall, ToolChoice, ToolDef, Tools};
pub use verify::{Verdict, VerifyRequest};
