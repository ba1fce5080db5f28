//! The binary Blake2b-256 Merkle tree that commits to a stack's request log, with inclusion
//! proofs a user can check offline.
//!
//! The protocol leaf of one request is `Blake2b-256(request_hash ‖ response_hash)` (`leaf`), as
//! the reference node defined it. The tree is RFC 6962's (Certificate Transparency), with
//! Blake2b-256 and its domain separation, so a leaf can never be passed off as an inner node:
//! - a leaf's node is `H(0x00 ‖ leaf)`, an inner node `H(0x01 ‖ left ‖ right)`;
//! - the root of `n > 1` leaves splits them at `k`, the largest power of two below `n`:
//!   `root(D[0..n]) = H(0x01 ‖ root(D[0..k]) ‖ root(D[k..n]))`; of one leaf, its node; of none,
//!   `H()` (the hash of the empty string).
//!
//! An inclusion proof is RFC 6962's audit path, from the leaf's sibling upwards; `verify` is
//! RFC 9162's algorithm (§2.1.3.2), which needs the leaf's index and the tree's size.

use crate::blake2b256;

/// A 32-byte digest.
pub type Digest = [u8; 32];

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

/// The protocol leaf of one request: `Blake2b-256(request_hash ‖ response_hash)`.
pub fn leaf(request_hash: &Digest, response_hash: &Digest) -> Digest {
    let mut b = [0u8; 64];
    b[..32].copy_from_slice(request_hash);
    b[32..].copy_from_slice(response_hash);
    blake2b256(&b)
}

fn leaf_node(leaf: &Digest) -> Digest {
    let mut b = [0u8; 33];
    b[0] = LEAF_PREFIX;
    b[1..].copy_from_slice(leaf);
    blake2b256(&b)
}

fn inner(left: &Digest, right: &Digest) -> Digest {
    let mut b = [0u8; 65];
    b[0] = NODE_PREFIX;
    b[1..33].copy_from_slice(left);
    b[33..].copy_from_slice(right);
    blake2b256(&b)
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The Merkle root of `leaves`.
pub fn root(leaves: &[Digest]) -> Digest {
    match leaves.len() {
        0 => blake2b256(&[]),
        1 => leaf_node(&leaves[0]),
        n => {
            let k = split(n);
            inner(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path proving that `leaves[index]` is in the tree, bottom-up; `None` if `index`
/// is out of range.
pub fn proof(leaves: &[Digest], index: usize) -> Option<Vec<Digest>> {
    if index >= leaves.len() {
        return None;
    }
    let mut path = Vec::new();
    audit_path(leaves, index, &mut path);
    Some(path)
}

fn audit_path(leaves: &[Digest], m: usize, out: &mut Vec<Digest>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        audit_path(&leaves[..k], m, out);
        out.push(root(&leaves[k..]));
    } else {
        audit_path(&leaves[k..], m - k, out);
        out.push(root(&leaves[..k]));
    }
}

/// Whether `path` proves `leaf` at `index` in a tree of `count` leaves with root `root`.
pub fn verify(root: &Digest, leaf: &Digest, index: u64, count: u64, path: &[Digest]) -> bool {
    if index >= count {
        return false;
    }
    let (mut f_n, mut s_n) = (index, count - 1);
    let mut r = leaf_node(leaf);
    for p in path {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = inner(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = inner(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && r == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Digest> {
        (0..n as u32)
            .map(|i| blake2b256(&i.to_le_bytes()))
            .collect()
    }

    #[test]
    fn every_leaf_of_every_size_proves_and_nothing_else_does() {
        for n in 1..=33 {
            let l = leaves(n);
            let r = root(&l);
            for i in 0..n {
                let p = proof(&l, i).unwrap();
                assert!(verify(&r, &l[i], i as u64, n as u64, &p), "n={n} i={i}");
                // Another index, another leaf, a tampered path or size: refused.
                assert!(!verify(&r, &l[(i + 1) % n], i as u64, n as u64, &p) || n == 1);
                if n > 1 {
                    assert!(!verify(&r, &l[i], ((i + 1) % n) as u64, n as u64, &p));
                    let mut bad = p.clone();
                    bad[0][0] ^= 1;
                    assert!(!verify(&r, &l[i], i as u64, n as u64, &bad));
                }
                // (The size is not bound by the path alone; the ledger commits it with the root.)
                let other = root(&leaves(n + 1));
                assert!(!verify(&other, &l[i], i as u64, n as u64 + 1, &p));
            }
            assert!(proof(&l, n).is_none());
        }
    }

    #[test]
    fn a_leaf_is_not_an_inner_node() {
        // Domain separation: the root of two leaves is not the leaf node of their concatenation.
        let l = leaves(2);
        let fake_leaf = {
            let mut b = [0u8; 64];
            b[..32].copy_from_slice(&leaf_node(&l[0]));
            b[32..].copy_from_slice(&leaf_node(&l[1]));
            blake2b256(&b)
        };
        assert_ne!(root(&l), leaf_node(&fake_leaf));
        assert_eq!(split(2), 1);
        assert_eq!(split(5), 4);
        assert_eq!(split(8), 4);
    }
}
