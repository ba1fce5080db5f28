"""End-to-end client: the official `openai` package against an Atoma node.

Signs every request in an httpx request hook exactly as the protocol asks (X-Signature = Sui
ed25519 signature, base64(0x00 || sig || pubkey), over Blake2b-256 of the body; X-Stack-Small-Id),
then checks a plain and a streamed chat completion, the node's signature on the response (and on
every chunk), and that a stack the key does not own is refused with 401.

usage: openai_client.py URL KEYSTORE STACK MODEL
"""
import base64
import hashlib
import json
import os
import sys

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
    assert base64.b64encode(digest).decode() == claimed, "response_hash mismatch"
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

stack_header["value"] = "999"
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                   extra_body={"nonce": os.urandom(8).hex()})
    raise SystemExit("a stack this key does not hold must be refused")
except openai.AuthenticationError as e:
    print("refused as expected:", e.status_code)
print("openai e2e ok")
