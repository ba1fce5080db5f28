//! Exact repacking of each supported GGUF type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
//! Q6_K) into `PackedMatrix`'s panels: each row's blocks are decoded into unsigned bytes with a
//! zero point fixed per type and an exact f32 scale (and offset, where the type has one) per
//! sub-block, then interleaved by column in groups of 4, two groups per byte for 4-bit codes.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::{BYTES, NIB, NIB5, PANEL, PackedMatrix, Scales, Streamed};

/// One row of a matrix unpacked: bytes, and a scale and offset per sub-block.
struct RowCodes {
    q: Vec<u8>,
    scale: Vec<f32>,
    min: Vec<f32>,
    /// K-quants: the factors of `scale` and `min` as the file keeps them.
    factors: Option<Factors>,
}

/// A K-quant row's `scale[t] = d[t / per] * sc[t]` and `min[t] = -(dmin[t / per] * m[t])`.
#[derive(Default)]
struct Factors {
    d: Vec<f32>,
    sc: Vec<i8>,
    dmin: Vec<f32>,
    m: Vec<i8>,
}

/// Sub-blocks per K-quant super-block of 256 weights.
fn per_super(sb: usize) -> usize {
    256 / sb
}

/// Layout of a GGML type in the packed format: `(sub-block, zero point, has offset)`.
fn format_of(dtype: GgmlDType) -> Option<(usize, i32, bool)> {
    Some(match dtype {
        GgmlDType::Q8_0 => (32, 128, false),
        GgmlDType::Q4_0 => (32, 8, false),
        GgmlDType::Q5_0 => (32, 16, false),
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => (32, 0, true),
        GgmlDType::Q4K | GgmlDType::Q5K => (32, 0, true),
        GgmlDType::Q6K => (16, 32, false),
        _ => return None,
    })
}

fn f16_at(b: &[u8], o: usize) -> f32 {
    f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// Scale and min of sub-block `j` of a Q4_K/Q5_K super-block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// How `dtype`'s codes are stored: 4-bit codes two per byte, 5-bit ones as nibbles plus a
/// plane of fifth bits, the others a byte each.
fn codes_of(dtype: GgmlDType) -> u8 {
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => NIB,
        GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => NIB5,
        _ => BYTES,
    }
}

/// Decodes one row of raw GGML blocks into bytes and per-sub-block scales and offsets.
fn unpack_row(dtype: GgmlDType, raw: &[u8], k: usize) -> RowCodes {
    let (sb, _, has_min) = format_of(dtype).expect("supported type");
    let mut q = vec![0u8; k];
    let mut scale = vec![0f32; k / sb];
    let mut min = if has_min {
        vec![0f32; k / sb]
    } else {
        Vec::new()
    };
    let bs = dtype.block_size();
    let ts = dtype.type_size();
    let mut f = Factors::default();
    for (bi, b) in raw.chunks_exact(ts).enumerate() {
        let q = &mut q[bi * bs..(bi + 1) * bs];
        let s0 = bi * bs / sb;
        match dtype {
            GgmlDType::Q8_0 => {
                scale[s0] = f16_at(b, 0);
                for (d, &v) in q.iter_mut().zip(&b[2..34]) {
                    *d = (v as i8 as i32 + 128) as u8;
                }
            }
            GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
                scale[s0] = f16_at(b, 0);
                let qs = if dtype == GgmlDType::Q4_1 {
                    min[s0] = f16_at(b, 2);
                    &b[4..20]
                } else {
                    &b[2..18]
                };
                for (j, &v) in qs.iter().enumerate() {
                    q[j] = v & 0xF;
                    q[j + 16] = v >> 4;
                }
            }
            GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                scale[s0] = f16_at(b, 0);
                let o = if dtype == GgmlDType::Q5_1 {
                    min[s0] = f16_at(b, 2);
                    4
                } else {
                    2
                };
                let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
                for (j, &v) in b[o + 4..o + 20].iter().enumerate() {
                    q[j] = (v & 0xF) | ((((qh >> j) & 1) as u8) << 4);
                    q[j + 16] = (v >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                }
            }
            GgmlDType::Q4K | GgmlDType::Q5K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                f.d.push(d);
                f.dmin.push(dmin);
                let scales = &b[4..16];
                let (qh, qs) = if dtype == GgmlDType::Q5K {
                    (Some(&b[16..48]), &b[48..176])
                } else {
                    (None, &b[16..144])
                };
                for c in 0..4 {
                    for h in 0..2 {
                        let (sc, m) = scale_min_k4(2 * c + h, scales);
                        scale[s0 + 2 * c + h] = d * f32::from(sc);
                        min[s0 + 2 * c + h] = -(dmin * f32::from(m));
                        // 6-bit factors: they fit a signed byte.
                        f.sc.push(sc as i8);
                        f.m.push(m as i8);
                        for l in 0..32 {
                            let nib = if h == 0 {
                                qs[32 * c + l] & 0xF
                            } else {
                                qs[32 * c + l] >> 4
                            };
                            let hi = qh.map_or(0, |qh| ((qh[l] >> (2 * c + h)) & 1) << 4);
                            q[64 * c + 32 * h + l] = nib | hi;
                        }
                    }
                }
            }
            GgmlDType::Q6K => {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                f.d.push(d);
                for (i, &s) in sc.iter().enumerate() {
                    scale[s0 + i] = d * f32::from(s as i8);
                    f.sc.push(s as i8);
                }
                for half in 0..2 {
                    let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                    let q = &mut q[128 * half..];
                    for l in 0..32 {
                        q[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                        q[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                        q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
            }
            _ => unreachable!("checked by format_of"),
        }
    }
    let factors = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K).then_some(f);
    RowCodes {
        q,
        scale,
        min,
        factors,
    }
}

impl PackedMatrix {
    /// Whether `dtype` weights of inner size `k` can be packed.
    pub(crate) fn supports(dtype: GgmlDType, k: usize) -> bool {
        format_of(dtype).is_some() && k.is_multiple_of(dtype.block_size()) && k > 0
    }

    /// Repacks `n` rows of raw GGML blocks of type `dtype` (each row `k` values).
    pub(crate) fn pack(dtype: GgmlDType, raw: &[u8], n: usize, k: usize) -> Self {
        assert!(Self::supports(dtype, k), "cannot pack {dtype:?} with k={k}");
        let (sb, zero, has_min) = format_of(dtype).expect("supported");
        let row_bytes = k / dtype.block_size() * dtype.type_size();
        assert_eq!(raw.len(), n * row_bytes, "weight size");
        let panels = n.div_ceil(PANEL);
        let nsb = k / sb;
        // Padding columns: byte `zero` with scale 0 (their outputs are never stored).
        let mut q = vec![zero as u8; panels * k * PANEL];
        let mut scale = vec![0f32; panels * nsb * PANEL];
        let kquant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
        // Padding offsets as their factors give them (`-(0 * 0)`), so a K-quant's offsets stay
        // factored; the padding outputs are never stored, so their sign is invisible.
        let mut min = if has_min {
            vec![if kquant { -0.0 } else { 0f32 }; panels * nsb * PANEL]
        } else {
            Vec::new()
        };
        // K-quants: the factors of the scales and offsets, in the same `[panel][..][column]`
        // order (padding columns: factor 0, like their scales).
        let per = per_super(sb);
        let (sup_len, sub_len) = if kquant {
            (panels * (nsb / per) * PANEL, panels * nsb * PANEL)
        } else {
            (0, 0)
        };
        let (min_sup, min_sub) = if has_min { (sup_len, sub_len) } else { (0, 0) };
        let (mut fd, mut fsc) = (vec![0f32; sup_len], vec![0i8; sub_len]);
        let (mut fdmin, mut fm) = (vec![0f32; min_sup], vec![0i8; min_sub]);
        for col in 0..n {
            let codes = unpack_row(dtype, &raw[col * row_bytes..(col + 1) * row_bytes], k);
            debug_assert!(codes.q.iter().all(|&b| match codes_of(dtype) {
                NIB => b < 16,
                NIB5 => b < 32,
                _ => true,
            }));
            let (p, c) = (col / PANEL, col % PANEL);
            for t in 0..nsb {
                let o = (p * nsb + t) * PANEL + c;
                scale[o] = codes.scale[t];
                if has_min {
                    min[o] = codes.min[t];
                }
                if let Some(f) = &codes.factors {
                    let so = (p * (nsb / per) + t / per) * PANEL + c;
                    fsc[o] = f.sc[t];
                    if t % per == 0 {
                        fd[so] = f.d[t / per];
                    }
                    if has_min {
                        fm[o] = f.m[t];
                        if t % per == 0 {
                            fdmin[so] = f.dmin[t / per];
                        }
                    }
                }
                for g in 0..sb / 4 {
                    let dst = (p * nsb + t) * sb * PANEL + g * 4 * PANEL + c * 4;
                    let src = t * sb + g * 4;
                    q[dst..dst + 4].copy_from_slice(&codes.q[src..src + 4]);
                }
            }
        }
        let codes = codes_of(dtype);
        if codes != BYTES {
            // Each sub-block's 8 groups of 32 bytes become 4 pairs: low nibble = group 2h,
            // high nibble = group 2h + 1; for 5-bit codes then 32 bytes whose bit g is the
            // fifth bit of the same byte of group g.
            let half = 4 * PANEL;
            q = q
                .chunks_exact(sb * PANEL)
                .flat_map(|blk| {
                    let pairs = blk.chunks_exact(2 * half).flat_map(|pair| {
                        (0..half).map(move |j| (pair[j] & 0xF) | ((pair[half + j] & 0xF) << 4))
                    });
                    let plane = (0..half).map(move |j| {
                        (0..sb / 4).fold(0u8, |acc, g| acc | (((blk[g * half + j] >> 4) & 1) << g))
                    });
                    let plane: Vec<u8> = if codes == NIB5 {
                        plane.collect()
                    } else {
                        Vec::new()
                    };
                    pairs.chain(plane).collect::<Vec<u8>>()
                })
                .collect();
        }
        Self {
            n,
            k,
            sb,
            zero,
            q: Streamed::new(&q),
            codes,
            scale: if kquant {
                Scales::factored(&scale, &fd, &fsc, per.trailing_zeros(), false)
            } else {
                Scales::new(&scale)
            },
            min: if kquant && has_min {
                Scales::factored(&min, &fdmin, &fm, per.trailing_zeros(), true)
            } else {
                Scales::new(&min)
            },
            dtype,
        }
    }
}
