//! The user's side: `atoma sign` prints a signed request (headers and body, or a curl command),
//! `atoma chat` sends one and streams the answer, checking the node's signature on every chunk.
//!
//! Both add a fresh `"nonce"` to the body, so the same prompt can be sent twice: the node refuses
//! a body hash it has already served on the stack (replay protection).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use atoma_crypto::{Keypair, blake2b256};

use crate::home::Home;

/// What `atoma up` leaves for the client commands: where the node is and which stack to use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub url: String,
    pub key: String,
    pub stack: u64,
    pub model: String,
}

impl Session {
    pub fn path(home: &Home) -> PathBuf {
        home.root.join("session.json")
    }

    pub fn load(home: &Home) -> Option<Self> {
        serde_json::from_str(&std::fs::read_to_string(Self::path(home)).ok()?).ok()
    }

    pub fn save(&self, home: &Home) -> anyhow::Result<()> {
        std::fs::write(Self::path(home), serde_json::to_string_pretty(self)?)
            .context("writing the session file")
    }
}

/// The key name and stack to use: the flags, else the session `atoma up` left, else `user`.
fn owner(
    home: &Home,
    key: Option<&String>,
    stack: Option<u64>,
) -> anyhow::Result<(String, u64, Option<Session>)> {
    let session = Session::load(home);
    let key_name = key
        .cloned()
        .or(session.as_ref().map(|s| s.key.clone()))
        .unwrap_or("user".into());
    let stack = stack
        .or(session.as_ref().map(|s| s.stack))
        .context("no --stack given and no session (run `atoma up`)")?;
    Ok((key_name, stack, session))
}

/// Adds a nonce, serializes compactly, signs. Returns (body, signature).
pub fn sign_body(key: &Keypair, mut body: Value) -> anyhow::Result<(String, String)> {
    let obj = body
        .as_object_mut()
        .context("the request body must be a JSON object")?;
    if !obj.contains_key("nonce") {
        let mut n = [0u8; 8];
        n.copy_from_slice(&Keypair::generate()?.public_key()[..8]);
        obj.insert("nonce".into(), json!(u64::from_le_bytes(n)));
    }
    let text = serde_json::to_string(&body)?;
    let sig = key.sign(&blake2b256(text.as_bytes()));
    Ok((text, sig))
}

#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// Key that owns the stack (default: the session's, else `user`).
    #[arg(long)]
    pub key: Option<String>,
    /// Stack to charge (default: the session's).
    #[arg(long)]
    pub stack: Option<u64>,
    /// Request body (JSON object); `-` reads stdin.
    #[arg(long)]
    pub body: String,
    /// Print a curl command for this URL (e.g. http://127.0.0.1:3000/v1/chat/completions).
    #[arg(long)]
    pub curl: Option<String>,
}

pub fn sign(home: &Home, a: &SignArgs) -> anyhow::Result<()> {
    let (key_name, stack, _) = owner(home, a.key.as_ref(), a.stack)?;
    let raw = if a.body == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        a.body.clone()
    };
    let body: Value = serde_json::from_str(&raw).context("--body is not valid JSON")?;
    let (text, sig) = sign_body(&home.key(&key_name)?, body)?;
    match &a.curl {
        Some(url) => println!(
            "curl -sS {url} -H 'Content-Type: application/json' -H 'X-Signature: {sig}' \
             -H 'X-Stack-Small-Id: {stack}' -d '{}'",
            text.replace('\'', r"'\''")
        ),
        None => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "headers": {"X-Signature": sig, "X-Stack-Small-Id": stack.to_string()},
                "body": text,
            }))?
        ),
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// The message to send.
    pub prompt: String,
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub stack: Option<u64>,
    /// Node URL (default: the session's, else http://127.0.0.1:3000).
    #[arg(long)]
    pub url: Option<String>,
    /// Model name (default: the session's, else the node's first).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, short = 'n', default_value_t = 256)]
    pub max_tokens: u32,
    #[arg(long, short, default_value_t = 0.0)]
    pub temperature: f32,
}

pub fn chat(home: &Home, a: &ChatArgs) -> anyhow::Result<()> {
    let (key_name, stack, session) = owner(home, a.key.as_ref(), a.stack)?;
    let url = a
        .url
        .clone()
        .or(session.as_ref().map(|s| s.url.clone()))
        .unwrap_or("http://127.0.0.1:3000".into());
    let model = match a
        .model
        .clone()
        .or(session.as_ref().map(|s| s.model.clone()))
    {
        Some(m) => m,
        None => {
            let v: Value = ureq::get(&format!("{url}/v1/models")).call()?.into_json()?;
            v["data"][0]["id"]
                .as_str()
                .context("the node serves no model")?
                .to_string()
        }
    };
    let mut messages = Vec::new();
    messages.push(json!({"role": "system", "content": a.system.as_deref().unwrap_or("You are a helpful assistant.")}));
    messages.push(json!({"role": "user", "content": a.prompt}));
    let body = json!({"model": model, "messages": messages, "max_tokens": a.max_tokens,
                      "temperature": a.temperature, "stream": true,
                      "stream_options": {"include_usage": true}});
    let key = home.key(&key_name)?;
    let (text, sig) = sign_body(&key, body)?;
    let resp = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("Content-Type", "application/json")
        .set("X-Signature", &sig)
        .set("X-Stack-Small-Id", &stack.to_string())
        .send_string(&text);
    let resp = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            let body: Value = r.into_json().unwrap_or(Value::Null);
            let msg = body["error"]["message"]
                .as_str()
                .unwrap_or("no error message");
            bail!("the node answered {code}: {msg}");
        }
        Err(e) => bail!("cannot reach the node at {url}: {e}"),
    };
    let mut out = std::io::stdout().lock();
    let mut node = None;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.context("reading the stream")?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).context("a streamed chunk is not JSON")?;
        if chunk.get("error").is_some() {
            bail!("the node failed mid-stream: {}", chunk["error"]["message"]);
        }
        let signer = atoma_api::sign::verify_json(&chunk)
            .map_err(|e| anyhow::anyhow!("a chunk's signature does not verify: {e}"))?;
        if *node.get_or_insert(signer) != signer {
            bail!("chunks are signed by different keys");
        }
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            out.write_all(t.as_bytes())?;
            out.flush()?;
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            writeln!(out)?;
            eprintln!(
                "usage: {} prompt + {} completion tokens; every chunk signed by node key {}",
                u["prompt_tokens"],
                u["completion_tokens"],
                node.map(|n| atoma_crypto::address_hex(&n))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
