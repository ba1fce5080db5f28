//! A backend that exists before its model does: the node binds its port at once and answers
//! `/health` (and inference) with 503 while the model loads on another thread; `set` makes it
//! ready.

use std::sync::{Arc, OnceLock};

use atoma_api::{
    BackendError, EmbedInput, Embeddings, InferenceBackend, InferenceRequest, Prepared,
};

/// A backend that becomes ready when `set`.
#[derive(Clone, Default)]
pub struct LoadingBackend {
    inner: Arc<OnceLock<Arc<dyn InferenceBackend>>>,
    /// Names served once loaded (known from the config before loading).
    names: Vec<String>,
    /// Embedding models served once loaded.
    embedding_names: Vec<String>,
}

impl std::fmt::Debug for LoadingBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadingBackend")
            .field("names", &self.names)
            .field("ready", &self.inner.get().is_some())
            .finish()
    }
}

impl LoadingBackend {
    /// A not-yet-ready backend that will serve `names`.
    pub fn new(names: Vec<String>) -> Self {
        Self {
            inner: Arc::default(),
            names,
            embedding_names: Vec::new(),
        }
    }

    /// Also serves the embedding models `names` once loaded.
    pub fn with_embedding_models(mut self, names: Vec<String>) -> Self {
        self.embedding_names = names;
        self
    }

    /// Makes the backend ready (later calls are ignored).
    pub fn set(&self, backend: Arc<dyn InferenceBackend>) {
        let _ = self.inner.set(backend);
    }

    fn get(&self) -> Result<&Arc<dyn InferenceBackend>, BackendError> {
        self.inner
            .get()
            .ok_or_else(|| BackendError::Internal("the model is still loading".into()))
    }
}

impl InferenceBackend for LoadingBackend {
    fn models(&self) -> Vec<String> {
        self.inner
            .get()
            .map_or_else(|| self.names.clone(), |b| b.models())
    }

    fn max_choices(&self) -> u32 {
        self.inner
            .get()
            .map_or(atoma_api::openai::DEFAULT_MAX_N, |b| b.max_choices())
    }

    fn embedding_models(&self) -> Vec<String> {
        self.inner
            .get()
            .map_or_else(|| self.embedding_names.clone(), |b| b.embedding_models())
    }

    fn embed_tokenize(
        &self,
        model: &str,
        inputs: &[EmbedInput],
    ) -> Result<Vec<Vec<u32>>, BackendError> {
        self.get()?.embed_tokenize(model, inputs)
    }

    fn embed(&self, model: &str, tokens: &[Vec<u32>]) -> Result<Embeddings, BackendError> {
        self.get()?.embed(model, tokens)
    }

    fn ready(&self) -> bool {
        self.inner.get().is_some_and(|b| b.ready())
    }

    fn queue_depth(&self) -> usize {
        self.inner.get().map_or(0, |b| b.queue_depth())
    }

    fn load(&self) -> atoma_api::BackendLoad {
        self.inner.get().map(|b| b.load()).unwrap_or_default()
    }

    fn prepare(&self, req: InferenceRequest) -> Result<Prepared, BackendError> {
        self.get()?.prepare(req)
    }

    fn tokenize(
        &self,
        model: &str,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<(u32, Vec<u8>)>, BackendError> {
        self.get()?.tokenize(model, text, add_special)
    }

    fn detokenize(&self, model: &str, ids: &[u32]) -> Result<String, BackendError> {
        self.get()?.detokenize(model, ids)
    }
}
