//! The request's log record, built when its units are charged: the exact signed request, the
//! node's signed answer as sent, and how it ran (`Execution` from the backend, the generated
//! token ids, finish reason and usage). `atoma_state::meter` stores it in the transaction that
//! charges the stack.

use axum::body::Bytes;

use atoma_state::log::{ChoiceRecord, LogRecord, ResponseRecord};
use atoma_state::meter::Settled;

use crate::backend::{Execution, FinishReason};

/// What the API keeps about a request from its arrival to its settlement.
#[derive(Debug, Clone)]
pub(crate) struct RequestLog {
    pub body: Bytes,
    pub signature: String,
    pub execution: Execution,
}

impl RequestLog {
    /// The stack charge and its evidence for a finished (or cut-off) request: `choices` holds
    /// each choice's generated token ids and finish reason, in choice order.
    pub(crate) fn settled(
        &self,
        response: ResponseRecord,
        response_hash: [u8; 32],
        choices: Vec<(Vec<u32>, FinishReason)>,
        usage: (u64, u64),
    ) -> Settled {
        let e = &self.execution;
        let mut choices = choices.into_iter();
        let (output_tokens, finish_reason) = choices
            .next()
            .unwrap_or((Vec::new(), FinishReason::Cancelled));
        let extra_choices = choices
            .map(|(output_tokens, f)| ChoiceRecord {
                output_tokens,
                finish_reason: f.as_str().to_string(),
            })
            .collect();
        let record = LogRecord {
            request_body: self.body.to_vec(),
            request_signature: self.signature.clone(),
            response,
            prompt_tokens: e.prompt_token_ids.clone(),
            output_tokens,
            seed: e.seed,
            sampling: e.sampling.clone(),
            finish_reason: finish_reason.as_str().to_string(),
            usage_prompt_tokens: usage.0,
            usage_completion_tokens: usage.1,
            model_sha256: e.model_sha256,
            determinism_class: e.determinism_class.clone(),
            extra_choices,
        };
        Settled {
            prompt_tokens: usage.0,
            completion_tokens: usage.1,
            response_hash,
            record: record.encode(),
        }
    }
}
