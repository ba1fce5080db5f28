"""Signing for the end-to-end clients: what a user of an Atoma node does around the `openai` SDK.

A request is signed in an httpx request hook exactly as the protocol asks (X-Signature = Sui
ed25519 signature, base64(0x00 || sig || pubkey), over Blake2b-256 of the body; X-Stack-Small-Id);
an answer is checked against its response_hash and the node's signature.
"""
import base64
import hashlib
import json

try:  # openai >= 3 is built on httpx2, earlier versions on httpx
    import httpx2 as httpx
except ImportError:
    import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class Signer:
    """The user's key from an `atoma` keystore, and the stack its requests are paid from."""

    def __init__(self, keystore: str, stack: str):
        raw = base64.b64decode(json.load(open(keystore))[0])
        assert raw[0] == 0, "ed25519 keystore entry expected"
        self.key = Ed25519PrivateKey.from_private_bytes(raw[1:33])
        self.pub = self.key.public_key().public_bytes(serialization.Encoding.Raw,
                                                       serialization.PublicFormat.Raw)
        self.stack = stack

    def signature(self, body: bytes) -> str:
        digest = hashlib.blake2b(body, digest_size=32).digest()
        return base64.b64encode(b"\x00" + self.key.sign(digest) + self.pub).decode()

    def __call__(self, request: "httpx.Request") -> None:
        request.headers["X-Signature"] = self.signature(request.read())
        request.headers["X-Stack-Small-Id"] = self.stack

    def http_client(self) -> "httpx.Client":
        return httpx.Client(event_hooks={"request": [self]}, timeout=600)


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
