//! Progress bars on stderr for long work (pulling, loading). Hidden when stderr is not a
//! terminal, so logs and CI output stay clean.

use indicatif::{ProgressBar, ProgressStyle};

use atoma_engine::{LoadOptions, LoadedModel};

/// Loads a model with a per-tensor progress bar.
pub fn load_model(path: &std::path::Path, opts: &LoadOptions) -> anyhow::Result<LoadedModel> {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let mut on_tensor = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let res = LoadedModel::load(path, opts, &mut on_tensor);
    bar.finish_and_clear();
    Ok(res?)
}

/// A byte-count bar.
pub fn bytes_bar(total: u64, msg: &str) -> ProgressBar {
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(msg.to_string());
    bar
}

/// A spinner for work of unknown length.
pub fn spinner(msg: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}
