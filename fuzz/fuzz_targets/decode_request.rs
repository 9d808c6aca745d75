//! Request decoding: any bytes, for any hook, must give a Runtime SDK response and no panic.
//! Run with `cargo fuzz run decode_request` from the repository root.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use registry_addon::cli::{Cli, Command};
use registry_addon::hooks::{HookConfig, HookContext, Management, dispatch};
use registry_addon::wire::runtime::Hook;

fn context() -> &'static HookContext {
    static CTX: OnceLock<HookContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let Command::Serve(args) = Cli::parse_from(["registry-addon", "serve"]).command else {
            unreachable!()
        };
        let config = HookConfig {
            namespace: args.namespace,
            addon: args.addon,
        };
        // No management cluster: decoding and validation run, nothing is written.
        HookContext::new(config, Management::Unavailable("fuzzing".into()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let hook = Hook::ALL[usize::from(selector) % Hook::ALL.len()];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let response = runtime.block_on(dispatch(context(), hook, body, Duration::from_secs(1)));
    assert_eq!(response.kind, hook.response_kind());
    // The answer always serializes.
    assert!(serde_json::to_vec(&response).is_ok());
});
