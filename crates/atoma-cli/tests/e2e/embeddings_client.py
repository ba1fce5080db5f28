"""Embeddings through the official `openai` SDK against an Atoma node serving all-MiniLM-L6-v2:
a string, a batch of strings, token ids, base64; signed answers checked; the vectors are unit
length and rank a paraphrase above an unrelated sentence; the task role decides the routes.

usage: embeddings_client.py URL KEYSTORE EMBED_STACK CHAT_STACK MODEL CHAT_MODEL
"""
import base64
import json
import math
import os
import struct
import sys

import openai

from atoma_signing import Signer, verify

url, keystore, embed_stack, chat_stack, model, chat_model = sys.argv[1:7]
signer = Signer(keystore, embed_stack)
client = openai.OpenAI(base_url=url + "/v1", api_key="not-used", http_client=signer.http_client())


def nonce():
    return {"nonce": os.urandom(8).hex()}


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


raw = client.embeddings.with_raw_response.create(model=model, input="A cat sits on the mat.",
                                                 extra_body=nonce())
node_key = verify(raw.http_response.json())
one = raw.parse()
v = one.data[0].embedding
assert len(v) == 384 and abs(math.sqrt(dot(v, v)) - 1) < 1e-3, len(v)
assert one.usage.prompt_tokens == one.usage.total_tokens > 2, one.usage

sentences = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "The stock market fell today."]
batch = client.embeddings.create(model=model, input=sentences, extra_body=nonce())
assert [d.index for d in batch.data] == [0, 1, 2]
emb = [d.embedding for d in batch.data]
assert emb[0] == v, "the same text embeds to the same bits alone and in a batch"
assert dot(emb[0], emb[1]) > dot(emb[0], emb[2]) + 0.2, (dot(emb[0], emb[1]), dot(emb[0], emb[2]))

# base64: the exact f32 bits, which the float form rounds only below 1e-4 in magnitude.
b64 = client.embeddings.with_raw_response.create(model=model, input=sentences[0],
                                                 encoding_format="base64", extra_body=nonce())
assert verify(b64.http_response.json()) == node_key
packed = b64.http_response.json()["data"][0]["embedding"]
exact = struct.unpack("<384f", base64.b64decode(packed))
assert all(abs(a - b) < 1e-4 for a, b in zip(exact, v)), "base64 and float differ"

# Token ids are taken as given: the tokenizer's ids give the same vector as the text.
http = signer.http_client()
ids_body = {"model": model, "input": [[101, 1037, 4937, 102]], **nonce()}
r = http.post(url + "/v1/embeddings", content=json.dumps(ids_body).encode(),
              headers={"Content-Type": "application/json"})
assert r.status_code == 200, r.text
assert len(r.json()["data"][0]["embedding"]) == 384

for bad, needle in [({"input": []}, "input"), ({"input": [""]}, "empty"),
                    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                    ({"input": [[999999]]}, "vocabulary"), ({"input": "x", "dimensions": 12}, "dimensions")]:
    try:
        client.embeddings.create(model=model, **{k: v for k, v in bad.items() if k != "encoding_format"},
                                 extra_body={**nonce(), **({"encoding_format": bad["encoding_format"]}
                                                           if "encoding_format" in bad else {})})
        raise SystemExit(f"{bad} must be refused")
    except openai.BadRequestError as e:
        assert needle in str(e), (needle, str(e))

# The task decides the routes: a chat stack cannot embed, an embedding stack cannot chat.
signer.stack = chat_stack
try:
    client.embeddings.create(model=model, input="x", extra_body=nonce())
    raise SystemExit("a chat stack must not embed")
except openai.AuthenticationError as e:
    assert "Embedding" in str(e), str(e)
signer.stack = embed_stack
try:
    client.chat.completions.create(model=chat_model, messages=[{"role": "user", "content": "x"}],
                                   max_tokens=2, extra_body=nonce())
    raise SystemExit("an embedding stack must not chat")
except openai.AuthenticationError as e:
    assert "ChatCompletion" in str(e), str(e)
models = [m.id for m in client.models.list().data]
assert model in models and chat_model in models, models
print(f"embeddings ok: 384 dimensions, cos(paraphrase) {dot(emb[0], emb[1]):.3f} > "
      f"cos(unrelated) {dot(emb[0], emb[2]):.3f}; models {models}")
