"""End-to-end client of the gateway: the official `openai` package with an API key.

Every answer (and every streamed chunk) is checked the way a careful user would: its
`response_hash` and node signature verify, and the signer is one of the devnet's nodes (its Sui
address is Blake2b-256 of 0x00 || public key); the serving node is reported by small id.

usage: gateway_client.py URL API_KEY NODES MODEL MODE [ARGS]
  NODES   JSON object {address: small_id}
  MODE    sdk                      one plain answer and one stream parsed into the SDK's objects,
                                   one JSON line each (as `run`)
          run N CONCURRENCY KINDS  N requests, KINDS a string of p (plain) and s (stream) used
                                   in turn; one JSON line per finished request, flushed
          status CODE N            N quick requests; the last must fail with HTTP CODE
"""
import base64
import concurrent.futures
import hashlib
import json
import os
import sys

import openai
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

url, api_key, nodes, model, mode = sys.argv[1:6]
nodes = {a.lower(): n for a, n in json.loads(nodes).items()}
client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=180)
MESSAGES = [{"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 8


def signer(body: dict) -> int:
    """Checks response_hash and signature; returns the small id of the node that signed."""
    body = dict(body)
    sig = base64.b64decode(body.pop("signature"))
    claimed = body.pop("response_hash")
    compact = json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    digest = hashlib.blake2b(compact, digest_size=32).digest()
    assert base64.b64encode(digest).decode() == claimed, "response_hash mismatch"
    assert sig[0] == 0 and len(sig) == 97, "not an ed25519 Sui signature"
    Ed25519PublicKey.from_public_bytes(sig[65:]).verify(sig[1:65], digest)
    address = "0x" + hashlib.blake2b(b"\x00" + sig[65:], digest_size=32).hexdigest()
    assert address in nodes, f"signed by {address}, not a devnet node"
    return nodes[address]


def plain(i: int) -> dict:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.7,
        extra_body={"ignore_eos": True})
    body = raw.http_response.json()
    node = signer(body)
    parsed = raw.parse()
    assert parsed.usage.completion_tokens == MAX_TOKENS, parsed.usage
    return {"i": i, "ok": True, "stream": False, "node": node,
            "total_tokens": parsed.usage.total_tokens, "text": parsed.choices[0].message.content}


def stream(i: int) -> dict:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.7, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, usage, signers, got_bytes = "", None, set(), False
    try:
        for line in raw.http_response.iter_lines():
            got_bytes = True
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            signers.add(signer(chunk))
            for choice in chunk.get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
            usage = chunk.get("usage") or usage
    except Exception as e:  # a stream may break only after its first byte
        return {"i": i, "ok": False, "stream": True, "after_first_byte": got_bytes,
                "error": repr(e), "text": text}
    assert len(signers) == 1, f"chunks signed by {signers}"
    assert usage and usage["completion_tokens"] == MAX_TOKENS, usage
    return {"i": i, "ok": True, "stream": True, "node": signers.pop(),
            "total_tokens": usage["total_tokens"], "text": text}


def one(i: int, kind: str) -> dict:
    try:
        return (stream if kind == "s" else plain)(i)
    except openai.APIStatusError as e:
        return {"i": i, "ok": False, "stream": kind == "s", "after_first_byte": False,
                "status": e.status_code, "error": str(e)}
    except Exception as e:
        return {"i": i, "ok": False, "stream": kind == "s", "after_first_byte": False,
                "error": repr(e)}


if mode == "sdk":
    # The SDK's own objects (the serving node from the gateway's X-Atoma-Node header).
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=MAX_TOKENS)
    completion = raw.parse()
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens >= 1
    results = [{"i": 0, "ok": True, "stream": False, "node": int(raw.headers["x-atoma-node"]),
                "total_tokens": completion.usage.total_tokens,
                "text": completion.choices[0].message.content}]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in raw.parse():
        for choice in chunk.choices:
            text += choice.delta.content or ""
        usage = chunk.usage or usage
    assert text and usage, "the parsed stream carried no text or no usage"
    results.append({"i": 1, "ok": True, "stream": True, "node": int(raw.headers["x-atoma-node"]),
                    "total_tokens": usage.total_tokens, "text": text})
    listed = [m.id for m in client.models.list()]
    assert model in listed, listed
    for r in results:
        print(json.dumps(r), flush=True)
elif mode == "run":
    n, concurrency, kinds = int(sys.argv[6]), int(sys.argv[7]), sys.argv[8]
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, i, kinds[i % len(kinds)]) for i in range(n)]
        for f in concurrent.futures.as_completed(futures):
            print(json.dumps(f.result()), flush=True)
elif mode == "status":
    code, n = int(sys.argv[6]), int(sys.argv[7])
    results = [one(i, "p") for i in range(n)]
    last = results[-1]
    assert last.get("status") == code, f"expected HTTP {code}, got {last}"
    retry_after = None
    if code == 429:
        try:
            client.chat.completions.with_raw_response.create(
                model=model, messages=MESSAGES, max_tokens=MAX_TOKENS)
            raise AssertionError("a key over its limit was served")
        except openai.RateLimitError as e:
            retry_after = e.response.headers.get("retry-after")
            assert retry_after and int(retry_after) >= 1, dict(e.response.headers)
            assert e.body and "message" in e.body, e.body
    print(json.dumps({"results": results, "retry_after": retry_after}), flush=True)
else:
    sys.exit(f"unknown mode {mode}")
