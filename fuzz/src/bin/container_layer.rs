//! Container image layers: the input is a tar stream applied on top of a fixed lower layer
//! (a file, a directory, and a symlink pointing out of the root), as `rvmm run` unpacks an
//! image. Whatever the entries (paths with `..`, whiteouts, opaque markers, links), nothing
//! outside the root may change: a canary next to the root must survive.
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use std::fs;
use std::os::unix::fs::symlink;

use libfuzzer_sys::fuzz_target;
use rvmm_container::image::layer::{apply, Owners};
use rvmm_fuzz::scratch_dir;
use vmm_sys_util::tempdir::TempDir;

fuzz_target!(|data: &[u8]| {
    let sandbox = TempDir::new_with_prefix(scratch_dir().join("rvmm-fuzz-layer-")).unwrap();
    let outside = sandbox.as_path().join("outside");
    let root = sandbox.as_path().join("root");
    fs::create_dir_all(outside.join("dir")).unwrap();
    fs::write(outside.join("canary"), b"canary").unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    symlink(&outside, root.join("out")).unwrap();
    symlink("../outside/dir", root.join("rel")).unwrap();

    let _ = apply(data, &root, &mut Owners::new());

    assert_eq!(fs::read(outside.join("canary")).unwrap(), b"canary");
    let escaped: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "canary" && n != "dir")
        .collect();
    assert!(escaped.is_empty(), "written outside the root: {escaped:?}");
    assert_eq!(fs::read_dir(outside.join("dir")).unwrap().count(), 0);
});
