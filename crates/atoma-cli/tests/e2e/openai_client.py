"""End-to-end client: the official `openai` package against an Atoma node.

Signs every request in an httpx request hook exactly as the protocol asks (X-Signature = Sui
ed25519 signature, base64(0x00 || sig || pubkey), over Blake2b-256 of the body; X-Stack-Small-Id),
then checks a plain and a streamed chat completion, the node's signature on the response (and on
every chunk), the wider OpenAI surface (sampling extensions, logit_bias, log-probabilities plain
and streamed, token-id prompts, echo, cached tokens, system_fingerprint, /tokenize and
/detokenize, unsupported parameters refused by name), and that a stack the key does not own is
refused with 401, even with a 3.5 MB body.

usage: openai_client.py URL KEYSTORE STACK MODEL
"""
import base64
import hashlib
import json
import os
import sys
import time

import openai

try:  # openai >= 3 is built on httpx2, earlier versions on httpx
    import httpx2 as httpx
except ImportError:
    import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

url, keystore, stack, model = sys.argv[1:5]
raw = base64.b64decode(json.load(open(keystore))[0])
assert raw[0] == 0, "ed25519 keystore entry expected"
key = Ed25519PrivateKey.from_private_bytes(raw[1:33])
pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
stack_header = {"value": stack}


def sign(request: httpx.Request) -> None:
    body = request.read()
    digest = hashlib.blake2b(body, digest_size=32).digest()
    request.headers["X-Signature"] = base64.b64encode(b"\x00" + key.sign(digest) + pub).decode()
    request.headers["X-Stack-Small-Id"] = stack_header["value"]


def verify(body: dict) -> bytes:
    """Checks response_hash and signature the way a user would; returns the signer's public key."""
    body = dict(body)
    sig = base64.b64decode(body.pop("signature"))
    claimed = body.pop("response_hash")
    compact = json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    digest = hashlib.blake2b(compact, digest_size=32).digest()
    assert base64.b64encode(digest).decode() == claimed, ("response_hash mismatch", compact)
    assert sig[0] == 0 and len(sig) == 97
    Ed25519PublicKey.from_public_bytes(sig[65:]).verify(sig[1:65], digest)
    return sig[65:]


client = openai.OpenAI(base_url=url + "/v1", api_key="not-used",
                       http_client=httpx.Client(event_hooks={"request": [sign]}))
messages = [{"role": "user", "content": "Say something."}]

raw_resp = client.chat.completions.with_raw_response.create(
    model=model, messages=messages, max_tokens=8, extra_body={"nonce": os.urandom(8).hex()})
completion = raw_resp.parse()
assert completion.choices[0].message.role == "assistant"
assert completion.usage.completion_tokens >= 1
node_key = verify(raw_resp.http_response.json())
print("plain:", repr(completion.choices[0].message.content), completion.usage)

stream = client.chat.completions.with_raw_response.create(
    model=model, messages=messages, max_tokens=8, stream=True,
    stream_options={"include_usage": True}, extra_body={"nonce": os.urandom(8).hex()})
text, usage, signed_chunks = "", None, 0
for line in stream.http_response.iter_lines():
    if not line.startswith("data: ") or line == "data: [DONE]":
        continue
    chunk = json.loads(line[len("data: "):])
    assert verify(chunk) == node_key, "chunk signed by another key"
    signed_chunks += 1
    for choice in chunk.get("choices", []):
        text += choice.get("delta", {}).get("content") or ""
    usage = chunk.get("usage") or usage
assert usage and usage["completion_tokens"] >= 1, usage
print("stream:", repr(text), usage, f"{signed_chunks} signed chunks")

# Parsed streaming through the SDK's own iterator works too.
for event in client.chat.completions.create(model=model, messages=messages, max_tokens=4, stream=True,
                                            extra_body={"nonce": os.urandom(8).hex()}):
    pass

# --- The wider OpenAI surface ---------------------------------------------------------
def nonce():
    return {"nonce": os.urandom(8).hex()}


# Sampling extensions (vLLM's names) and a seed: the same request twice gives the same text.
ext = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2}
a = client.chat.completions.create(model=model, messages=messages, max_tokens=12, seed=7,
                                   temperature=0.9, extra_body={**ext, **nonce()})
b = client.chat.completions.create(model=model, messages=messages, max_tokens=12, seed=7,
                                   temperature=0.9, extra_body={**ext, **nonce()})
assert a.choices[0].message.content == b.choices[0].message.content
assert a.system_fingerprint and "model-sha256:" in a.system_fingerprint, a.system_fingerprint
print("seeded with top_k/min_p/repetition_penalty:", repr(a.choices[0].message.content))

# Tokenizer routes (llama-server's shapes).
http = httpx.Client()
toks = http.post(url + "/tokenize", json={"content": "Hello world", "with_pieces": True}).json()["tokens"]
assert toks and all("id" in t and "piece" in t for t in toks), toks
ids = [t["id"] for t in toks]
back = http.post(url + "/detokenize", json={"tokens": ids}).json()
# (SentencePiece tokenizers, like the tiny test model's, add a leading space.)
assert back.get("content", "").lstrip() == "Hello world", (toks, back)

# logit_bias: +100 on one token makes greedy decoding repeat it.
forced = ids[0]
c = client.completions.create(model=model, prompt="x", max_tokens=5, temperature=0,
                              logit_bias={str(forced): 100}, extra_body=nonce())
expect = http.post(url + "/detokenize", json={"tokens": [forced] * 5}).json()["content"]
assert c.choices[0].text == expect, (c.choices[0].text, expect)

# Chat log-probabilities, plain and streamed, agree with each other and with the text.
lp_args = dict(model=model, messages=messages, max_tokens=8, seed=3, temperature=0.8,
               logprobs=True, top_logprobs=3)
raw_lp = client.chat.completions.with_raw_response.create(**lp_args, extra_body=nonce())
# The signed body re-serializes to the hashed bytes in Python too (floats included).
assert verify(raw_lp.http_response.json()) == node_key
plain = raw_lp.parse()
content = plain.choices[0].logprobs.content
assert len(content) == plain.usage.completion_tokens
for e in content:
    assert e.logprob <= 0 and len(e.top_logprobs) == 3
    try:
        assert bytes(e.bytes).decode() == e.token
    except UnicodeDecodeError:  # a piece of a character: OpenAI's "bytes:\xNN" form
        assert e.token == "bytes:" + "".join(f"\\x{b:02x}" for b in e.bytes), (e.token, e.bytes)
    assert e.top_logprobs[0].logprob >= e.logprob - 1e-6
streamed = []
raw_stream = client.chat.completions.with_raw_response.create(**lp_args, stream=True, extra_body=nonce())
for line in raw_stream.http_response.iter_lines():
    if not line.startswith("data: ") or line == "data: [DONE]":
        continue
    chunk = json.loads(line[len("data: "):])
    assert verify(chunk) == node_key
    for ch in chunk["choices"]:
        streamed.extend((ch.get("logprobs") or {}).get("content") or [])
assert [(e["token"], e["logprob"]) for e in streamed] == [(e.token, e.logprob) for e in content]
print("logprobs:", [(e.token, round(e.logprob, 3)) for e in content[:3]], "...")

# Completions: token-id prompt with echo; logprobs in the legacy shape.
c = client.completions.create(model=model, prompt=ids, max_tokens=4, echo=True, seed=1, extra_body=nonce())
assert c.choices[0].text.startswith(back["content"]), c.choices[0].text
c = client.completions.create(model=model, prompt="Once upon", max_tokens=4, logprobs=2, seed=1,
                              extra_body=nonce())
assert len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens
assert all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)

# The prefix cache shows in usage: a long prompt twice.
long = [{"role": "user", "content": "Tell me a story about " + "a red fox and a brown dog " * 3}]
first = client.chat.completions.create(model=model, messages=long, max_tokens=2, extra_body=nonce())
second = client.chat.completions.create(model=model, messages=long, max_tokens=2, extra_body=nonce())
cached = second.usage.prompt_tokens_details.cached_tokens
assert cached and cached > 0 and cached < second.usage.prompt_tokens, second.usage
print("cached tokens on a repeated prompt:", cached, "of", second.usage.prompt_tokens)

# Structured outputs: JSON mode and a JSON schema, plain and streamed, parse and validate.
schema = {"type": "object", "additionalProperties": False, "required": ["color", "n"],
          "properties": {"color": {"enum": ["red", "blue"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
rf = {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema, "strict": True}}
c = client.chat.completions.create(model=model, messages=messages, max_tokens=60, seed=2,
                                   response_format=rf, extra_body=nonce())
assert c.choices[0].finish_reason == "stop", c
v = json.loads(c.choices[0].message.content)
assert v["color"] in ("red", "blue") and 0 <= v["n"] <= 9 and len(v) == 2, v
text = ""
for ev in client.chat.completions.create(model=model, messages=messages, max_tokens=60, seed=2,
                                         response_format=rf, stream=True, extra_body=nonce()):
    for ch in ev.choices:
        text += ch.delta.content or ""
assert text == c.choices[0].message.content, (text, c.choices[0].message.content)
c = client.chat.completions.create(model=model, messages=messages, max_tokens=120, seed=4,
                                   response_format={"type": "json_object"}, extra_body=nonce())
if c.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(c.choices[0].message.content), dict)
print("structured output:", c.choices[0].message.content[:60], "| schema:", v)
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=4, extra_body=nonce(),
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "bad", "schema": {"type": "no-such-type"}}})
    raise SystemExit("a bad schema must be refused")
except openai.BadRequestError as e:
    assert "grammar" in str(e), str(e)

# Parameters we do not implement are refused by name, never ignored.
for extra, name in [({"response_format": {"type": "regex"}}, "response_format"),
                    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
                    ({"n": 2}, "`n`"),
                    ({"modalities": ["text", "audio"]}, "modalities")]:
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2, **extra, extra_body=nonce())
        raise SystemExit(f"{name} must be refused")
    except openai.BadRequestError as e:
        assert name in str(e), str(e)
print("unsupported parameters refused by name")

stack_header["value"] = "999"
# A 3.5 MB body signed by a key that owns no such stack: 401 before any work.
big = {"model": model, "messages": [{"role": "user", "content": "word " * 700_000}], "max_tokens": 4}
body_bytes = json.dumps(big).encode()
digest = hashlib.blake2b(body_bytes, digest_size=32).digest()
headers = {"X-Signature": base64.b64encode(b"\x00" + key.sign(digest) + pub).decode(),
           "X-Stack-Small-Id": "999", "Content-Type": "application/json"}
plain_http = httpx.Client()
times = []
for _ in range(5):
    t0 = time.perf_counter()
    r = plain_http.post(url + "/v1/chat/completions", content=body_bytes, headers=headers)
    times.append((time.perf_counter() - t0) * 1000)
    assert r.status_code == 401, r.text
print(f"3.5 MB body on a stack the key does not own: 401 in {min(times):.1f} ms best, "
      f"{sorted(times)[2]:.1f} ms median of 5 (round trip on loopback, body pre-signed)")
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                   extra_body={"nonce": os.urandom(8).hex()})
    raise SystemExit("a stack this key does not hold must be refused")
except openai.AuthenticationError as e:
    print("refused as expected:", e.status_code)
print("openai e2e ok")
