//! The UniFFI bindings generator, built from this crate so that its version always matches.

fn main() {
    uniffi::uniffi_bindgen_main()
}
