//! An OCI bundle's `config.json`: the input is written as the config of a bundle that has a
//! `rootfs/` directory, and goes the way `rvmm-oci create` takes it: `spec::load`, then
//! `spec::plan` as `create` checks it (no console socket, no network) and as the keeper makes
//! it (with a console socket, joining the network when the config names a network namespace),
//! then the guest agent reading the process of the config it is handed, for `exec`. Bind mount
//! sources are looked up on the host (`stat` only). Only panics are findings.
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use libfuzzer_sys::fuzz_target;
use rvmm_agent::bundle::exec_process;
use rvmm_fuzz::scratch_dir;
use rvmm_oci::spec::{self, Wiring};
use vmm_sys_util::tempdir::TempDir;

fuzz_target!(|data: &[u8]| {
    let dir = TempDir::new_in(&scratch_dir()).expect("scratch dir");
    let bundle = dir.as_path();
    std::fs::create_dir(bundle.join("rootfs")).expect("rootfs");
    std::fs::write(bundle.join("config.json"), data).expect("config.json");
    let Ok(config) = spec::load(bundle) else {
        return;
    };
    let keeper = Wiring {
        console: true,
        network: spec::network_namespace(&config).is_some(),
    };
    let _ = spec::plan(bundle, "fuzz", config.clone(), Wiring::default());
    let Ok(plan) = spec::plan(bundle, "fuzz", config, keeper) else {
        return;
    };
    assert!(!plan.shares.is_empty(), "the root is always shared");
    assert_eq!(plan.shares.len(), plan.volumes.len());
    assert!((1..=32).contains(&plan.cpus));
    let argv = ["sh".to_string()];
    exec_process(&plan.spec, &argv, true).expect("the guest reads the process of its config");
});
