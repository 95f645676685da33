//! `corral-bindgen INPUT.wasm OUT_DIR NAME`: what `wasm-bindgen --target web
//! --no-typescript --out-dir OUT_DIR --out-name NAME INPUT.wasm` does, with
//! the same library and the same settings as that command's defaults.
//!
//! Installing wasm-bindgen's CLI compiled its test runner's HTTP server and
//! client (rouille, ureq with brotli), clap and env_logger as well: minutes
//! on a fresh 2-core machine for a step that needs only
//! `wasm-bindgen-cli-support`. Building the library inside this workspace
//! also pins its version through Cargo.lock, with no tool in `~/.cargo/bin`
//! to drift from the crate.

use std::path::PathBuf;
use std::process::ExitCode;

use wasm_bindgen_cli_support::Bindgen;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, out_dir, name] = args.as_slice() else {
        eprintln!("usage: corral-bindgen INPUT.wasm OUT_DIR NAME");
        return ExitCode::from(2);
    };
    match generate(PathBuf::from(input), PathBuf::from(out_dir), name) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corral-bindgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The CLI's `rmain` for `--target web --no-typescript --out-name`, every
/// other flag at its default (`wasm-bindgen-cli` 0.2.130,
/// `src/wasm_bindgen.rs`).
fn generate(input: PathBuf, out_dir: PathBuf, name: &str) -> anyhow::Result<()> {
    let mut bindgen = Bindgen::new();
    // The CLI still passes its (hidden, deprecated) --reference-types flag,
    // false unless given, which overrides the WASM_BINDGEN_EXTERNREF
    // environment variable; so does this.
    #[allow(deprecated)]
    bindgen
        .web(true)?
        .input_path(input)
        .debug(false)
        .demangle(true)
        .keep_lld_exports(false)
        .keep_debug(false)
        .split_debug_info(false)
        .remove_name_section(false)
        .remove_producers_section(false)
        .typescript(false)
        .omit_imports(false)
        .omit_default_module_path(false)
        .split_linked_modules(false)
        .js_string_builtins(false)
        .ts_typed_array_buffers(false)
        .reference_types(false)
        .reset_state_function(false)
        .force_enable_abort_handler(false)
        .out_name(name);
    bindgen.generate(out_dir)?;
    Ok(())
}
